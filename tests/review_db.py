"""A review store and audit database laid out as the service writes them (the shared contract of
issue #26), for tests of the offline side that must not depend on the service."""

from __future__ import annotations

import hashlib
import sqlite3
from contextlib import closing
from pathlib import Path

REVIEW_SCHEMA = """
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
"""
EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".bmp": "bmp", ".tif": "tif", ".tiff": "tif"}


class ReviewDB:
    """``store(image_path)`` puts an image into the store and the queue; ``decide(sha, ...)`` adds a
    decision row, as the service's review endpoint would."""

    def __init__(self, db: Path, store: Path, *, name_store: bool = True) -> None:
        self.db, self.store = Path(db), Path(store)
        self.store.mkdir(parents=True, exist_ok=True)
        self._seen = 0
        with closing(sqlite3.connect(self.db)) as connection, connection:
            connection.executescript(REVIEW_SCHEMA)
            if name_store:
                connection.execute(
                    "INSERT OR REPLACE INTO review_meta VALUES ('store_dir', ?)", (str(self.store.resolve()),)
                )

    def store_image(self, image: Path, *, reason: str = "uncertain") -> str:
        data = Path(image).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        name = f"{sha}.{EXTENSIONS[Path(image).suffix.lower()]}"
        (self.store / name).write_bytes(data)
        self._seen += 1
        with closing(sqlite3.connect(self.db)) as connection, connection:
            connection.execute(
                "INSERT OR IGNORE INTO review_queue (image_sha256, file, bytes, reason, first_seen, prediction_id) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (sha, name, len(data), reason, f"2026-12-02T10:00:{self._seen % 60:02d}.000000Z", self._seen),
            )
        return sha

    def decide(
        self,
        sha: str,
        decided_class: str,
        *,
        reviewer: str = "ana",
        model_class: str = "crazing",
        probability: float | None = 0.5,
        new_kind: bool = False,
        note: str | None = None,
    ) -> None:
        with closing(sqlite3.connect(self.db)) as connection, connection:
            connection.execute(
                "INSERT INTO review_decisions (image_sha256, time, reviewer, decided_class, new_kind, note, "
                "model_class, model_probability) VALUES (?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), ?, ?, ?, ?, ?, ?)",
                (sha, reviewer, decided_class, int(new_kind), note, model_class, probability),
            )
