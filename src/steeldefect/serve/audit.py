"""The service's audit log: one SQLite row per answered prediction, so a quality system can show
what was decided about each strip (time, image sha256 and size, client id, top-k, uncertain flag,
model sha256, latency, and the image's name in the review store when it was kept there:
serve/review.py adds its tables to the same database).

SQLite in WAL mode, written by one dedicated thread that commits every waiting row in one
transaction (group commit) and only then releases the requests waiting on them: a request is
answered after its row is committed, so a crash of the server process (even SIGKILL) loses no
answered entry. By default the commit does not wait for the disk (``synchronous=NORMAL``: the row is
in the WAL file, which the operating system writes out even if the process dies); ``fsync=True``
(``synchronous=FULL``) also makes every answered row survive a power cut or kernel crash, at the cost
of one fsync per group commit (bench/serve_throughput.py measures both).

Reads (``/v1/history``) run in a pool of their own, ``readers`` threads each with one read-only
connection it keeps (WAL lets them read while the writer commits): the service bounds how many
wait for them, so history readers can neither grow threads nor take the inference threads' place.
The page is turned into JSON bytes in that thread too, not on the server's event loop. ``read_share``
paces them: after a read that took ``t`` seconds the next one starts no sooner than
``t * (1 / read_share - 1)`` later, so reads hold the interpreter's GIL and a core for at most that
share of the time however many clients ask (a bounded queue alone would still let back-to-back
reads take a whole core). Wall time, not the thread's CPU time: on a loaded machine a reader can be
descheduled while it holds the GIL, and the inference threads and the event loop wait that long too.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
    latency_ms REAL NOT NULL,
    review_file TEXT
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
    "review_file",
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
    review_file: str | None = None  # the image's name in the review store (serve/review.py), when kept


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

    def __init__(
        self,
        path: Path,
        *,
        keep: int = DEFAULT_KEEP,
        fsync: bool = False,
        readers: int = 1,
        read_share: float = 1.0,
    ) -> None:
        if keep < 1:
            raise ValueError(f"audit keep must be >= 1 row, got {keep}")
        if readers < 1:
            raise ValueError(f"audit readers must be >= 1, got {readers}")
        if not 0 < read_share <= 1:
            raise ValueError(f"audit read share must be in (0, 1], got {read_share}")
        self.path = Path(path)
        self.keep = keep
        self.fsync = fsync
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(predictions)")}
            if "review_file" not in columns:  # a log written before the review store existed
                self._db.execute("ALTER TABLE predictions ADD COLUMN review_file TEXT")
        except (sqlite3.Error, OSError) as error:
            raise AuditError(f"{self.path}: cannot open the audit log ({error})") from error
        self._queue: queue.SimpleQueue[tuple[list[AuditRow], Future] | None] = queue.SimpleQueue()
        self._inserted_since_prune = keep  # prune once at start: `keep` may have been lowered since last time
        self._failed: str | None = None
        self._thread = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
        self._thread.start()
        self._local = threading.local()  # each thread's read-only connection
        self._read_connections: list[sqlite3.Connection] = []
        self._read_lock = threading.Lock()
        self._readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="audit-read")
        self.readers = readers
        self.read_share = read_share
        self._pace_lock = threading.Lock()
        self._next_read = 0.0  # time.monotonic() before which no read starts
        self.read_interval = 0.0  # seconds between the starts of the last two paced reads

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
            row.review_file,
        )
        cursor = self._db.execute(
            f"INSERT INTO predictions ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})", values
        )
        assert cursor.lastrowid is not None  # set by every INSERT
        return int(cursor.lastrowid)

    def _read_connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            # check_same_thread=False only so that close() can close it from another thread.
            db = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False)
            db.row_factory = sqlite3.Row
            self._local.db = db
            with self._read_lock:
                self._read_connections.append(db)
        return db

    def history(self, *, since: str | None = None, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Rows with ``id > after`` and ``time >= since``, oldest first, at most ``limit``."""
        since_key = parse_time(since) if since else ""  # a bad ``since`` is a ValueError before any read
        rows = (
            self._read_connection()
            .execute(
                "SELECT * FROM predictions WHERE id > ? AND time >= ? ORDER BY id LIMIT ?",
                (int(after), since_key, int(limit)),
            )
            .fetchall()
        )
        entries = []
        for row in rows:
            entry = dict(row)
            entry["top_k"] = [{"class": name, "probability": p} for name, p in json.loads(entry["top_k"])]
            entry["uncertain"] = None if entry["uncertain"] is None else bool(entry["uncertain"])
            entries.append(entry)
        return entries

    def page(self, *, since: str | None = None, after: int = 0, limit: int = 100) -> bytes:
        """``/v1/history``'s JSON body: the :meth:`history` entries and ``next_after`` (the last id
        when the page is full, so the client asks for more, else null)."""
        entries = self.history(since=since, after=after, limit=limit)
        next_after = entries[-1]["id"] if len(entries) == limit else None
        return json.dumps({"entries": entries, "next_after": next_after}, separators=(",", ":")).encode()

    def read_page(self, *, since: str | None = None, after: int = 0, limit: int = 100) -> Future:
        """:meth:`page` in the reader pool; the future's result is the JSON bytes."""
        return self._readers.submit(self._paced_page, since=since, after=after, limit=limit)

    def _paced_page(self, **query: Any) -> bytes:
        with self._pace_lock:
            wait = self._next_read - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        started = time.monotonic()
        try:
            return self.page(**query)
        finally:
            took = time.monotonic() - started
            rest = took * (1 / self.read_share - 1)
            with self._pace_lock:
                self.read_interval = took + rest
                self._next_read = max(self._next_read, time.monotonic()) + rest

    def close(self) -> None:
        """Commit everything queued, then stop the writer and the readers."""
        self._readers.shutdown(wait=True)
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)
        self._db.close()
        with self._read_lock:
            for db in self._read_connections:
                db.close()
            self._read_connections.clear()
