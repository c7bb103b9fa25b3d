"""From inspectors' reviews to training data: `steeldefect review export --db AUDIT --out DIR`.

The service (``serve --review STORE``) keeps the bytes of reviewed images under STORE, named by their
sha256, and writes every inspector's decision into its audit SQLite database (tables
``review_meta``, ``review_queue``, ``review_decisions``; the shared contract of issue #26). This
module reads those tables and nothing else of the service, which is why it lives in the data layer
rather than ``serve/``: it imports no service code, and what it writes is a dataset that ``train``
reads (one folder per class).

For each reviewed image the latest decision (highest ``review_decisions.id``) wins. The image is
copied to ``DIR/<decided class>/<sha256>.<ext>``:

- nothing is ever overwritten; an sha256 already exported is skipped, so a re-run (or a run after
  an interruption, each copy being a temporary file renamed into place) resumes; when a later
  decision changed an image's class, its earlier copy is moved to the new class folder;
- a *new kind* (a class the answering model did not know, ``new_kind = 1``) with fewer than
  ``min_images`` images waits in ``DIR/.waiting/<kind>/``: hidden, so ``train`` ignores it. Once it
  has enough it moves into ``DIR/<kind>/`` and is a class like any other. The default minimum is
  the one ``train`` needs per class with its default split (``splits.minimum_class_size``: 7 for a
  15% test share and 5 folds).

``DIR/manifest.csv`` (written atomically, after the copies) has one row per exported image: sha256,
first_seen, decided_at, reviewer, model_class, model_probability, decided_class, new_kind, note (the
contract's columns), then the file's place in DIR and its status (``exported`` or ``waiting``).

Bad input is one line naming what is wrong: a missing database, one without review tables, an
unknown store folder (:class:`ReviewExportError`, nothing written). An image that cannot be exported
(no longer stored, unreadable, bytes not matching its sha256, a class name that cannot be a folder)
is left out with one line in :attr:`ExportResult.problems`; everything else is exported.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steeldefect.core.files import atomic_write_text
from steeldefect.data.decode import BadImage, decode_file
from steeldefect.data.splits import minimum_class_size

WAITING_DIR = ".waiting"
MANIFEST = "manifest.csv"
CONTRACT_COLUMNS = (
    "sha256",
    "first_seen",
    "decided_at",
    "reviewer",
    "model_class",
    "model_probability",
    "decided_class",
    "new_kind",
    "note",
)
MANIFEST_COLUMNS = (*CONTRACT_COLUMNS, "file", "status")
STORED_NAME = re.compile(r"^([0-9a-f]{64})\.(jpg|png|bmp|tif)$")
# A class becomes a folder name: printable, no separators, not hidden (a hidden folder is ignored by
# `train`), not "." or "..", and short enough for any file system.
_BAD_CLASS = re.compile(r"[/\\\x00-\x1f\x7f]")
MAX_CLASS_NAME = 100


def default_min_images() -> int:
    """What `train` needs per class with its default test share and folds."""
    from steeldefect.core.options import DataOptions

    defaults = DataOptions()
    return minimum_class_size(defaults.test_fraction, defaults.n_folds)


class ReviewExportError(ValueError):
    """The export cannot start (the database or the store folder); the message is one line."""


@dataclass(frozen=True)
class Reviewed:
    """One reviewed image with its latest decision."""

    sha256: str
    file: str
    first_seen: str
    decided_at: str
    reviewer: str
    model_class: str
    model_probability: float | None
    decided_class: str
    new_kind: bool
    note: str | None


@dataclass
class ExportResult:
    out: Path
    reviewed: int = 0  # images with a decision
    copied: int = 0
    already: int = 0  # already in place from an earlier export
    moved: int = 0  # moved because a later decision changed the class (or a waiting kind got enough)
    classes: dict[str, int] = field(default_factory=dict)  # exported images per class folder
    waiting: dict[str, int] = field(default_factory=dict)  # new kinds still below the minimum
    problems: list[str] = field(default_factory=list)
    min_images: int = 0

    def lines(self) -> list[str]:
        """What the CLI prints: one summary line, the classes, then each waiting kind."""
        lines = [
            f"{self.out}: {self.reviewed} reviewed images, {self.copied} copied, {self.already} already there, "
            f"{self.moved} moved, {len(self.problems)} left out"
        ]
        if self.classes:
            lines.append("classes: " + ", ".join(f"{name} {count}" for name, count in sorted(self.classes.items())))
        for kind, count in sorted(self.waiting.items()):
            lines.append(f"waiting: {kind} ({count} of {self.min_images} images; in {self.out / WAITING_DIR / kind})")
        return lines


def read_reviews(db: Path) -> tuple[list[Reviewed], str | None]:
    """The latest decision of every reviewed image (in decision order) and the store folder the
    database names (``review_meta.store_dir``), read-only."""
    db = Path(db)
    if not db.is_file():
        raise ReviewExportError(f"{db}: audit database not found")
    try:
        # Read-only, so an export can never change the service's database (or create an empty one).
        connection = sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True)
    except sqlite3.Error as error:
        raise ReviewExportError(f"{db}: cannot open the audit database ({error})") from error
    with closing(connection):
        try:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as error:
            raise ReviewExportError(f"{db}: not an SQLite database ({error})") from error
        missing = [name for name in ("review_queue", "review_decisions") if name not in tables]
        if missing:
            raise ReviewExportError(
                f"{db}: no review tables ({', '.join(missing)} missing); was the service started with --review?"
            )
        store = None
        if "review_meta" in tables:
            found = connection.execute("SELECT value FROM review_meta WHERE key = 'store_dir'").fetchone()
            store = found[0] if found else None
        try:
            rows = connection.execute(
                """
                SELECT d.image_sha256, q.file, q.first_seen, d.time, d.reviewer, d.model_class,
                       d.model_probability, d.decided_class, d.new_kind, d.note
                FROM review_decisions AS d
                JOIN (SELECT image_sha256, MAX(id) AS id FROM review_decisions GROUP BY image_sha256) AS latest
                  ON d.id = latest.id
                LEFT JOIN review_queue AS q ON q.image_sha256 = d.image_sha256
                ORDER BY d.id
                """
            ).fetchall()
        except sqlite3.Error as error:
            raise ReviewExportError(f"{db}: review tables do not have the expected columns ({error})") from error
    return [
        Reviewed(
            sha256=str(sha),
            file=file or "",
            first_seen=first_seen or "",
            decided_at=str(decided_at),
            reviewer=str(reviewer),
            model_class=str(model_class),
            model_probability=None if probability is None else float(probability),
            decided_class=str(decided_class),
            new_kind=bool(new_kind),
            note=note,
        )
        for sha, file, first_seen, decided_at, reviewer, model_class, probability, decided_class, new_kind, note in rows
    ], store


def export_reviews(db: Path, out: Path, *, images: Path | None = None, min_images: int | None = None) -> ExportResult:
    """Copy every reviewed image into ``out/<decided class>/`` and write ``out/manifest.csv``.

    ``images`` is the review store (default: the folder the database names); ``min_images`` the
    images a new kind needs before it becomes a class folder (default :func:`default_min_images`).
    """
    min_images = default_min_images() if min_images is None else int(min_images)
    if min_images < 1:
        raise ReviewExportError(f"--min-images: must be an integer >= 1, got {min_images}")
    reviews, named_store = read_reviews(Path(db))
    store = Path(images) if images is not None else (Path(named_store) if named_store else None)
    if store is None:
        raise ReviewExportError(f"{db}: the database names no review store (review_meta.store_dir); give --images")
    if not store.is_dir():
        raise ReviewExportError(f"{store}: review store folder not found (--images, or review_meta.store_dir in {db})")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReviewExportError(f"{out}: --out exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)

    result = ExportResult(out=out, reviewed=len(reviews), min_images=min_images)
    usable = [review for review in reviews if _usable(review, store, result.problems)]
    placed = _existing(out)
    kinds = _new_kinds(usable, out)
    per_class = Counter(review.decided_class for review in usable)
    rows = []
    for review in usable:
        kind = review.decided_class
        waiting = kind in kinds and per_class[kind] < min_images
        folder = out / WAITING_DIR / kind if waiting else out / kind
        target = folder / review.file
        try:
            outcome = _place(store / review.file, target, placed.get(review.sha256, []))
        except (OSError, BadImage) as error:
            result.problems.append(f"{store / review.file}: {error}")
            continue
        setattr(result, outcome, getattr(result, outcome) + 1)
        bucket = result.waiting if waiting else result.classes
        bucket[kind] = bucket.get(kind, 0) + 1
        rows.append(_manifest_row(review, target.relative_to(out).as_posix(), "waiting" if waiting else "exported"))
    _write_manifest(out / MANIFEST, rows)
    return result


def _usable(review: Reviewed, store: Path, problems: list[str]) -> bool:
    """A decision whose image can be exported; otherwise one line into ``problems``."""
    match = STORED_NAME.match(review.file)
    if not review.file:
        problems.append(f"{review.sha256}: reviewed but not in review_queue (no stored file); left out")
        return False
    if match is None or match.group(1) != review.sha256:
        problems.append(f"{review.sha256}: stored name {review.file!r} is not <sha256>.<jpg|png|bmp|tif>; left out")
        return False
    name = review.decided_class
    bad_name = not name or name != name.strip() or name.startswith(".") or _BAD_CLASS.search(name)
    if bad_name or len(name) > MAX_CLASS_NAME:
        problems.append(f"{review.sha256}: decided class {name!r} cannot be a class folder name; left out")
        return False
    path = store / review.file
    if not path.is_file():
        problems.append(f"{path}: reviewed image no longer in the review store (evicted?); left out")
        return False
    return True


def _existing(out: Path) -> dict[str, list[Path]]:
    """Where each sha256 already sits in ``out`` (class folders and waiting folders), checked by content."""
    found: dict[str, list[Path]] = {}
    for pattern in ("*/*", f"{WAITING_DIR}/*/*"):
        for path in out.glob(pattern):
            match = STORED_NAME.match(path.name)
            if match and path.is_file() and (pattern != "*/*" or not path.parent.name.startswith(".")):
                # Only a file whose bytes are its name is an earlier export; any other is not ours to move.
                if _sha256_of(path) == match.group(1):
                    found.setdefault(match.group(1), []).append(path)
    return found


def _sha256_of(path: Path) -> str | None:
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return None


def _new_kinds(reviews: Sequence[Reviewed], out: Path) -> set[str]:
    """Decided classes that may have to wait: named as a new kind, never decided by a reviewer of a
    model that knew them (new_kind = 0), and not already a class folder in ``out``."""
    named_new = {r.decided_class for r in reviews if r.new_kind}
    known = {r.decided_class for r in reviews if not r.new_kind}
    return {kind for kind in named_new - known if not (out / kind).is_dir()}


def _place(source: Path, target: Path, already: list[Path]) -> str:
    """Put ``source``'s bytes at ``target``: "already" there, "moved" from an earlier place in the
    export, or "copied" (verified: decodes, bytes match the name). Never overwrites a file."""
    if target in already:
        for old in already:  # a move interrupted between its link and its unlink left a second name
            if old != target:
                old.unlink(missing_ok=True)
                _remove_if_empty(old.parent)
        return "already"
    if target.exists():
        raise OSError(f"{target} exists and is not this image's earlier export; not overwritten")
    target.parent.mkdir(parents=True, exist_ok=True)
    if already:  # a later decision (or a new kind now big enough) moved it
        _rename_no_overwrite(already[0], target)
        for old in already:
            old.unlink(missing_ok=True)
            _remove_if_empty(old.parent)
        return "moved"
    data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != target.name.split(".")[0]:
        raise BadImage(f"stored bytes have sha256 {digest[:16]}..., not the name's; left out")
    decode_file(source)  # an image train could not read is refused here, not at training time
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _rename_no_overwrite(Path(temporary), target)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return "copied"


def _rename_no_overwrite(temporary: Path, target: Path) -> None:
    """link() then unlink: unlike rename() it fails when the target appeared meanwhile (another
    export racing this one), so nothing is ever overwritten; file systems without hard links fall
    back to a checked rename."""
    try:
        os.link(temporary, target)
    except FileExistsError:
        raise OSError(f"{target} appeared while exporting; not overwritten") from None
    except OSError:
        if target.exists():
            raise OSError(f"{target} appeared while exporting; not overwritten") from None
        os.replace(temporary, target)


def _remove_if_empty(folder: Path) -> None:
    """An emptied class folder would make `train` refuse the dataset ("contains no image files")."""
    try:
        folder.rmdir()  # only succeeds when empty
    except OSError:
        pass


def _manifest_row(review: Reviewed, file: str, status: str) -> dict[str, Any]:
    return {
        "sha256": review.sha256,
        "first_seen": review.first_seen,
        "decided_at": review.decided_at,
        "reviewer": review.reviewer,
        "model_class": review.model_class,
        "model_probability": "" if review.model_probability is None else f"{review.model_probability:.6f}",
        "decided_class": review.decided_class,
        "new_kind": int(review.new_kind),
        "note": review.note or "",
        "file": file,
        "status": status,
    }


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(MANIFEST_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
