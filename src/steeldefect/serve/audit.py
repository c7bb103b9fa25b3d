"""The service's audit log: one SQLite row per answered prediction, so a quality system can show
what was decided about each strip (time, image sha256 and size, client id, top-k, uncertain flag,
model sha256, latency).

SQLite in WAL mode, written by one dedicated thread that commits every waiting row in one
transaction (group commit) and only then releases the requests waiting on them: a request is
answered after its row is committed, so a crash of the server process (even SIGKILL) loses no
answered entry. By default the commit does not wait for the disk (``synchronous=NORMAL``: the row is
in the WAL file, which the operating system writes out even if the process dies); ``fsync=True``
(``synchronous=FULL``) also makes every answered row survive a power cut or kernel crash, at the cost
of one fsync per group commit (bench/serve_throughput.py measures both).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steeldefect.core.options import ServeOptions

log = logging.getLogger(__name__)

DEFAULT_KEEP = ServeOptions().audit_keep  # `serve --audit-keep`, defined with the other options
MAX_GROUP = 256  # rows per transaction at most: bounds the time one commit holds the waiting requests

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    client_id TEXT,
    image_sha256 TEXT NOT NULL,
    image_bytes INTEGER NOT NULL,
    class TEXT NOT NULL,
    probability REAL NOT NULL,
    top_k TEXT NOT NULL,
    uncertain INTEGER,
    confidence REAL,
    model_sha256 TEXT NOT NULL,
    latency_ms REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS predictions_time ON predictions(time);
"""
_COLUMNS = (
    "time",
    "client_id",
    "image_sha256",
    "image_bytes",
    "class",
    "probability",
    "top_k",
    "uncertain",
    "confidence",
    "model_sha256",
    "latency_ms",
)


class AuditError(RuntimeError):
    """The audit log cannot be opened or written (named in the message)."""


@dataclass(frozen=True)
class AuditRow:
    client_id: str | None
    image_sha256: str
    image_bytes: int
    top_k: Sequence[tuple[str, float]]
    uncertain: bool | None
    confidence: float | None
    model_sha256: str
    latency_ms: float


def utc_now() -> str:
    """ISO 8601 UTC with microseconds and a ``Z``: sorts as text in time order."""
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> str:
    """A client's ``since`` (ISO 8601 date or time, with or without offset; naive = UTC) in the stored form."""
    try:
        moment = _dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"since={text!r} is not an ISO 8601 time (e.g. 2026-11-26T08:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.UTC)
    return moment.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AuditLog:
    """Append rows from any thread (:meth:`submit` returns a future done once the row is committed)
    and page through them (:meth:`history`); ``keep`` bounds the table to the newest rows."""

    def __init__(self, path: Path, *, keep: int = DEFAULT_KEEP, fsync: bool = False) -> None:
        if keep < 1:
            raise ValueError(f"audit keep must be >= 1 row, got {keep}")
        self.path = Path(path)
        self.keep = keep
        self.fsync = fsync
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as error:
            raise AuditError(f"{self.path}: cannot open the audit log ({error})") from error
        self._queue: queue.SimpleQueue[tuple[list[AuditRow], Future] | None] = queue.SimpleQueue()
        self._inserted_since_prune = keep  # prune once at start: `keep` may have been lowered since last time
        self._failed: str | None = None
        self._thread = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self._failed is None and self._thread.is_alive()

    def submit(self, rows: Sequence[AuditRow]) -> Future:
        """Queue rows for the writer; the future's result is their ids once committed."""
        future: Future = Future()
        self._queue.put((list(rows), future))
        return future

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < MAX_GROUP:  # everything already waiting goes into the same commit
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # stop after committing what came before it
                    break
                batch.append(more)
            self._commit(batch)

    def _commit(self, batch: list[tuple[list[AuditRow], Future]]) -> None:
        try:
            ids: list[list[int]] = []
            self._db.execute("BEGIN IMMEDIATE")
            for rows, _ in batch:
                ids.append([self._insert(row) for row in rows])
            self._inserted_since_prune += sum(len(rows) for rows, _ in batch)
            if self._inserted_since_prune >= max(1, self.keep // 100):
                self._db.execute(
                    "DELETE FROM predictions WHERE id <= (SELECT MAX(id) FROM predictions) - ?", (self.keep,)
                )
                self._inserted_since_prune = 0
            self._db.execute("COMMIT")
        except sqlite3.Error as error:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._failed = f"{self.path}: audit log write failed ({error})"
            log.error("%s", self._failed)
            for _, future in batch:
                future.set_exception(AuditError(self._failed))
            return
        self._failed = None
        for (_, future), row_ids in zip(batch, ids):
            future.set_result(row_ids)

    def _insert(self, row: AuditRow) -> int:
        values = (
            utc_now(),
            row.client_id,
            row.image_sha256,
            int(row.image_bytes),
            row.top_k[0][0],
            float(row.top_k[0][1]),
            json.dumps([[name, round(float(p), 6)] for name, p in row.top_k]),
            None if row.uncertain is None else int(row.uncertain),
            row.confidence,
            row.model_sha256,
            round(float(row.latency_ms), 3),
        )
        cursor = self._db.execute(
            f"INSERT INTO predictions ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})", values
        )
        assert cursor.lastrowid is not None  # set by every INSERT
        return int(cursor.lastrowid)

    def history(self, *, since: str | None = None, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Rows with ``id > after`` and ``time >= since``, oldest first, at most ``limit``."""
        # A reader connection per call: WAL lets it read while the writer commits.
        with closing(sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True)) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(
                "SELECT * FROM predictions WHERE id > ? AND time >= ? ORDER BY id LIMIT ?",
                (int(after), parse_time(since) if since else "", int(limit)),
            ).fetchall()
        entries = []
        for row in rows:
            entry = dict(row)
            entry["top_k"] = [{"class": name, "probability": p} for name, p in json.loads(entry["top_k"])]
            entry["uncertain"] = None if entry["uncertain"] is None else bool(entry["uncertain"])
            entries.append(entry)
        return entries

    def close(self) -> None:
        """Commit everything queued, then stop the writer."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)
        self._db.close()
