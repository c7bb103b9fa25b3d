"""The review store (`serve --review DIR`): the images an inspector should look at, and their decisions.

The service keeps the bytes of every answer flagged uncertain, and a seeded random share
(``sample``, default 1%) of the confident ones so reviewers also see the model's confident
mistakes. Files are ``DIR/<sha256>.<ext>`` (ext from the sniffed content: jpg, png, bmp, tif), written
atomically; nothing a client sends becomes a path. The state lives in the audit SQLite database beside
the ``predictions`` table (the contract with `steeldefect review export`):

- ``review_meta(key, value)``: ``store_dir`` = the absolute path of DIR;
- ``review_queue``: one row per stored image (reason, first time seen, the audit id of its first
  answer, whether it was evicted);
- ``review_decisions``: every decision (who, when, which class, a new kind or not, note, the model's
  answer); the latest per image wins, all are kept; an ``idempotency_key`` makes a retried decision one row.

``max_bytes`` caps the store: the oldest unreviewed images go first; a reviewed image is never evicted
(export still needs it), so a store full of reviewed images keeps no more until some are exported.
Writing never fails a prediction: a full disk or any other OSError is one log line and the answer
goes out as usual.
"""

from __future__ import annotations

import logging
import random
import re
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steeldefect.core.files import atomic_write_bytes
from steeldefect.serve.audit import utc_now

log = logging.getLogger(__name__)

DEFAULT_SAMPLE = 0.01
SHA256 = re.compile(r"[0-9a-f]{64}")
# A new kind becomes a class folder in `review export`: letters, digits, '_' and '-' only, like NEU's names.
KIND_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
MAX_REVIEWER_CHARS = 64
MAX_NOTE_CHARS = 1000
MAX_KEY_CHARS = 128
MEDIA_TYPES = {"jpg": "image/jpeg", "png": "image/png", "bmp": "image/bmp", "tif": "image/tiff"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS review_meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS review_queue (
    image_sha256 TEXT PRIMARY KEY,
    file TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    reason TEXT NOT NULL,
    first_seen TEXT NOT NULL,
    prediction_id INTEGER,
    evicted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS review_decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    image_sha256 TEXT NOT NULL,
    time TEXT NOT NULL,
    reviewer TEXT NOT NULL,
    decided_class TEXT NOT NULL,
    new_kind INTEGER NOT NULL,
    note TEXT,
    model_class TEXT NOT NULL,
    model_probability REAL,
    idempotency_key TEXT UNIQUE
);
CREATE INDEX IF NOT EXISTS review_decisions_image ON review_decisions(image_sha256);
"""


class ReviewError(ValueError):
    """A review request the store refuses: ``status`` is the HTTP status, the message names the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def sniff_extension(data: bytes) -> str | None:
    """The file extension of an image's content (the formats the service decodes), or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"BM"):
        return "bmp"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "tif"
    return None


@dataclass(frozen=True)
class Kept:
    """An image the store holds for review: its name inside DIR, and whether this answer stored it."""

    file: str
    new: bool
    reason: str


class ReviewStore:
    """The folder of kept images and the review tables of the audit database (thread-safe)."""

    def __init__(
        self, folder: Path, db_path: Path, *, sample: float = DEFAULT_SAMPLE, max_bytes: int | None = None, seed=0
    ) -> None:
        if not 0 <= sample <= 1:
            raise ValueError(f"--review-sample must be a share in [0, 1], got {sample}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"--review-max-mb must be positive, got {max_bytes} bytes")
        self.folder = Path(folder).resolve()
        self.sample, self.max_bytes = sample, max_bytes
        self._rng = random.Random(seed)  # seeded: which confident answers are sampled repeats run to run
        self._lock = threading.Lock()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._db.execute(
            "INSERT INTO review_meta(key, value) VALUES ('store_dir', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (str(self.folder),),
        )
        (total,) = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM review_queue WHERE evicted = 0").fetchone()
        self.stored_bytes = int(total)

    # -- keeping images (called from the prediction path: never raises) --------------------------------

    def reason(self, uncertain: bool | None) -> str | None:
        """Why an answer's image should be kept: ``'uncertain'``, ``'sample'`` (the seeded share), or None."""
        if uncertain:
            return "uncertain"
        with self._lock:
            return "sample" if self.sample > 0 and self._rng.random() < self.sample else None

    def keep(self, data: bytes, sha256: str, reason: str) -> Kept | None:
        """Store the image (once per sha256) and queue it; None when it cannot be kept (logged)."""
        extension = sniff_extension(data)
        if extension is None:
            log.warning("review store: image %s is not JPEG/PNG/BMP/TIFF; not kept", sha256[:12])
            return None
        name = f"{sha256}.{extension}"
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT file, evicted, reason FROM review_queue WHERE image_sha256 = ?", (sha256,)
                ).fetchone()
                if row is not None and not row[1] and (self.folder / row[0]).is_file():
                    return Kept(row[0], False, row[2])
                if not self._make_room(len(data)):
                    log.warning("review store %s: full of reviewed images (--review-max-mb); not kept", self.folder)
                    return None
                atomic_write_bytes(self.folder / name, data)
                if row is None:
                    self._db.execute(
                        "INSERT INTO review_queue(image_sha256, file, bytes, reason, first_seen) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (sha256, name, len(data), reason, utc_now()),
                    )
                else:  # evicted earlier (or its file vanished) and seen again: stored anew
                    self._db.execute(
                        "UPDATE review_queue SET file = ?, bytes = ?, evicted = 0 WHERE image_sha256 = ?",
                        (name, len(data), sha256),
                    )
                self.stored_bytes += len(data)
            except (OSError, sqlite3.Error) as error:
                log.warning(
                    "review store %s: cannot keep image %s (%s); answered as usual", self.folder, sha256[:12], error
                )
                return None
        return Kept(name, True, reason)

    def link(self, sha256: str, prediction_id: int) -> None:
        """Name the audit row of the image's first answer (after that row is committed)."""
        with self._lock:
            try:
                self._db.execute(
                    "UPDATE review_queue SET prediction_id = ? WHERE image_sha256 = ? AND prediction_id IS NULL",
                    (int(prediction_id), sha256),
                )
            except sqlite3.Error as error:
                log.warning(
                    "review store: cannot link image %s to audit row %d (%s)", sha256[:12], prediction_id, error
                )

    def link_all(self, pairs: Sequence[tuple[str, int]]) -> None:
        """:meth:`link` for each (sha256, audit id)."""
        for sha256, prediction_id in pairs:
            self.link(sha256, prediction_id)

    def _make_room(self, size: int) -> bool:
        """Evict the oldest unreviewed images until ``size`` more bytes fit under the cap."""
        if self.max_bytes is None:
            return True
        if size > self.max_bytes:
            return False
        while self.stored_bytes + size > self.max_bytes:
            oldest = self._db.execute(
                "SELECT image_sha256, file, bytes FROM review_queue q WHERE evicted = 0 AND NOT EXISTS "
                "(SELECT 1 FROM review_decisions d WHERE d.image_sha256 = q.image_sha256) "
                "ORDER BY first_seen, rowid LIMIT 1"
            ).fetchone()
            if oldest is None:
                return False
            sha256, name, size_of = oldest
            (self.folder / name).unlink(missing_ok=True)
            self._db.execute("UPDATE review_queue SET evicted = 1 WHERE image_sha256 = ?", (sha256,))
            self.stored_bytes -= int(size_of)
        return True

    # -- the reviewers' side ----------------------------------------------------------------------------

    def queue(self, *, status: str = "pending", limit: int = 100, after: str = "") -> list[dict[str, Any]]:
        """Stored images oldest first, with their first answer and latest decision.

        ``status``: ``pending`` (no decision yet), ``decided`` or ``all``; ``after``: a ``first_seen``
        to page from.
        """
        if status not in ("pending", "decided", "all"):
            raise ReviewError(422, f"status must be pending, decided or all, got {status!r}")
        where = {
            "pending": "AND latest.id IS NULL",
            "decided": "AND latest.id IS NOT NULL",
            "all": "",
        }[status]
        with self._lock:
            self._db.row_factory = sqlite3.Row
            try:
                rows = self._db.execute(
                    "SELECT q.*, p.time AS answered_at, p.client_id, p.class, p.probability, p.top_k, p.uncertain, "
                    "p.confidence, p.model_sha256, latest.id AS decision_id, latest.time AS decided_at, "
                    "latest.reviewer, latest.decided_class, latest.new_kind, latest.note, "
                    "(SELECT COUNT(*) FROM review_decisions d WHERE d.image_sha256 = q.image_sha256) AS decisions "
                    "FROM review_queue q LEFT JOIN predictions p ON p.id = q.prediction_id "
                    "LEFT JOIN review_decisions latest ON latest.id = "
                    "(SELECT MAX(id) FROM review_decisions d WHERE d.image_sha256 = q.image_sha256) "
                    f"WHERE q.evicted = 0 AND q.first_seen > ? {where} ORDER BY q.first_seen, q.rowid LIMIT ?",
                    (after, int(limit)),
                ).fetchall()
            finally:
                self._db.row_factory = None
        import json

        entries = []
        for row in rows:
            entry = {
                "sha256": row["image_sha256"],
                "bytes": row["bytes"],
                "reason": row["reason"],
                "first_seen": row["first_seen"],
                "audit_id": row["prediction_id"],
                "client_id": row["client_id"],
                "answer": None,
                "decision": None,
                "decisions": row["decisions"],
            }
            if row["class"] is not None:
                entry["answer"] = {
                    "class": row["class"],
                    "probability": row["probability"],
                    "top_k": [{"class": c, "probability": p} for c, p in json.loads(row["top_k"])],
                    "uncertain": None if row["uncertain"] is None else bool(row["uncertain"]),
                    "confidence": row["confidence"],
                    "model_sha256": row["model_sha256"],
                    "time": row["answered_at"],
                }
            if row["decision_id"] is not None:
                entry["decision"] = {
                    "id": row["decision_id"],
                    "time": row["decided_at"],
                    "reviewer": row["reviewer"],
                    "decided_class": row["decided_class"],
                    "new_kind": bool(row["new_kind"]),
                    "note": row["note"],
                }
            entries.append(entry)
        return entries

    def image(self, sha256: str) -> tuple[bytes, str]:
        """A stored image's bytes and media type; ReviewError 404/410 when it is not (or no longer) kept."""
        row = self._stored(sha256)
        try:
            data = (self.folder / row[0]).read_bytes()
        except OSError:
            raise ReviewError(410, f"image {sha256} is no longer in the review store") from None
        return data, MEDIA_TYPES[row[0].rsplit(".", 1)[1]]

    def _stored(self, sha256: str) -> tuple[str, int | None]:
        if not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
            raise ReviewError(422, "image id must be a sha256: 64 lowercase hex characters")
        with self._lock:
            row = self._db.execute(
                "SELECT file, evicted, prediction_id FROM review_queue WHERE image_sha256 = ?", (sha256,)
            ).fetchone()
        if row is None:
            raise ReviewError(404, f"image {sha256} is not in the review store")
        if row[1] or not (self.folder / row[0]).is_file():
            raise ReviewError(410, f"image {sha256} is no longer in the review store (evicted by --review-max-mb)")
        return row[0], row[2]

    def decide(self, sha256: str, body: Any, class_names: Sequence[str]) -> dict[str, Any]:
        """Record one reviewer's decision on a stored image; the same ``idempotency_key`` twice is one row."""
        if not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
            raise ReviewError(422, "image id must be a sha256: 64 lowercase hex characters")
        if not isinstance(body, dict):
            raise ReviewError(
                422, "a review is a JSON object: reviewer, decided_class, new_kind, note, idempotency_key"
            )
        unknown = set(body) - {"reviewer", "decided_class", "new_kind", "note", "idempotency_key"}
        if unknown:
            raise ReviewError(422, f"unknown review field(s): {', '.join(sorted(unknown))}")
        reviewer, decided, new_kind = body.get("reviewer"), body.get("decided_class"), body.get("new_kind", False)
        note, key = body.get("note"), body.get("idempotency_key")
        if not isinstance(reviewer, str) or not reviewer.strip() or len(reviewer) > MAX_REVIEWER_CHARS:
            raise ReviewError(422, f"reviewer must be a name of 1 to {MAX_REVIEWER_CHARS} characters")
        if not reviewer.isprintable():
            raise ReviewError(422, "reviewer must be printable characters")
        if not isinstance(new_kind, bool):
            raise ReviewError(422, "new_kind must be true or false")
        if not isinstance(decided, str) or not decided:
            raise ReviewError(422, "decided_class must be a class name")
        if decided in class_names:
            new_kind = False  # a class the model knows is never a new kind
        elif not new_kind:
            raise ReviewError(
                422,
                f"decided_class {decided!r} is not one of the model's classes ({', '.join(class_names)}); "
                "send new_kind: true to name a new kind",
            )
        elif not KIND_NAME.fullmatch(decided):
            raise ReviewError(422, "a new kind's name is 1 to 64 letters, digits, '_' or '-' (it becomes a folder)")
        if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE_CHARS):
            raise ReviewError(422, f"note must be text of at most {MAX_NOTE_CHARS} characters")
        if key is not None and (not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS):
            raise ReviewError(422, f"idempotency_key must be 1 to {MAX_KEY_CHARS} characters")
        if key is not None:
            earlier = self._decision(key=key)
            if earlier is not None:
                if earlier["image_sha256"] != sha256:
                    raise ReviewError(409, f"idempotency_key {key!r} was already used for another image")
                return {**earlier, "repeated": True}
        _, prediction_id = self._stored(sha256)
        with self._lock:
            answer = self._db.execute(
                "SELECT class, probability FROM predictions WHERE id = ? OR image_sha256 = ? "
                "ORDER BY id = ? DESC, id LIMIT 1",
                (prediction_id, sha256, prediction_id),
            ).fetchone()
            model_class, model_probability = answer if answer is not None else ("unknown", None)
            try:
                cursor = self._db.execute(
                    "INSERT INTO review_decisions(image_sha256, time, reviewer, decided_class, new_kind, note, "
                    "model_class, model_probability, idempotency_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        sha256,
                        utc_now(),
                        reviewer.strip(),
                        decided,
                        int(new_kind),
                        note,
                        model_class,
                        model_probability,
                        key,
                    ),
                )
            except sqlite3.IntegrityError:  # the same key from a concurrent retry got in first
                cursor = None
            except sqlite3.Error as error:
                raise ReviewError(503, f"cannot record the review ({error})") from None
        decision = self._decision(key=key) if cursor is None else self._decision(row_id=cursor.lastrowid)
        if decision is None:  # only if the database lost the row it just wrote
            raise ReviewError(503, "the review was not recorded; send it again")
        return {**decision, "repeated": cursor is None}

    def _decision(self, *, key: str | None = None, row_id: int | None = None) -> dict[str, Any] | None:
        with self._lock:
            self._db.row_factory = sqlite3.Row
            try:
                if key is not None and row_id is None:
                    row = self._db.execute(
                        "SELECT * FROM review_decisions WHERE idempotency_key = ?", (key,)
                    ).fetchone()
                else:
                    row = self._db.execute("SELECT * FROM review_decisions WHERE id = ?", (row_id,)).fetchone()
            finally:
                self._db.row_factory = None
        if row is None:
            return None
        decision = dict(row)
        decision["new_kind"] = bool(decision["new_kind"])
        return decision

    def close(self) -> None:
        with self._lock:
            self._db.close()
