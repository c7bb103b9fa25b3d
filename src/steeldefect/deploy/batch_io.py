"""An archive job's files: the inputs (a folder, a glob or a manifest of paths) and the output file
(Parquet, CSV or JSON lines) with its per-batch parts, its resume state, the final merge and the lock
that keeps two runs off one output. Used by both engines (:mod:`steeldefect.deploy.batch` and
:mod:`steeldefect.deploy.batch_ray`)."""

from __future__ import annotations

import collections
import csv
import io
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from steeldefect.core.files import atomic_write_bytes
from steeldefect.runtime.modelfile import Classifier, Judgement, ModelInfo
from steeldefect.runtime.modelfile import top_k as top_k_classes

log = logging.getLogger(__name__)


OUTPUT_FORMATS = (".parquet", ".csv", ".jsonl")


MANIFEST_SUFFIXES = (".txt", ".csv")


# Columns of the Parquet output, in order (documented in docs/predict.md; checked by a test).
PARQUET_COLUMNS = (
    "path",
    "class",
    "probability",
    "top_classes",
    "top_probabilities",
    "uncertain",
    "error",
    "model_sha256",
)


# `predict --format csv` columns, then the new fields.
# `predict --format csv`'s columns, then the model's hash.
CSV_COLUMNS = ("file", "rank", "class", "probability", "uncertain", "error", "model_sha256")


class OutputError(ValueError):
    """An --out file that cannot be resumed by this command (other model, other format, busy)."""


def read_manifest(manifest: Path) -> list[Path]:
    """Paths listed in a ``.txt`` (one per line; blank lines and ``#`` comments skipped) or a ``.csv``
    (its ``path`` column), relative entries resolved against the manifest's folder."""
    manifest = Path(manifest)
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{manifest}: cannot read manifest ({error})") from None
    if manifest.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        columns = [name.strip() for name in reader.fieldnames or []]
        if "path" not in columns:
            raise ValueError(f"{manifest}: manifest has no `path` column (columns: {', '.join(columns) or 'none'})")
        reader.fieldnames = columns
        entries = [(row.get("path") or "").strip() for row in reader]
    else:
        entries = [line.strip() for line in text.splitlines()]
        entries = [entry for entry in entries if not entry.startswith("#")]
    base = manifest.parent
    return [base / entry if not Path(entry).is_absolute() else Path(entry) for entry in entries if entry]


def collect_inputs(paths: Sequence[Path]) -> list[Path]:
    """Files as given, every image candidate under folders (sorted, as `predict` does), and the
    entries of ``.txt``/``.csv`` manifests, in argument order. Missing files are kept: they become
    error rows, not a failed job."""
    from steeldefect.deploy.predict import collect_images

    found: list[Path] = []
    for path in map(Path, paths):
        if path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file():
            found.extend(read_manifest(path))
        else:
            found.extend(collect_images([path]))
    return found


@dataclass
class Row:
    """One scored image: ``top`` is [(class, probability)] most likely first, empty when ``error``."""

    path: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    uncertain: bool | None = None


def make_row(path: str, judgement: Judgement, info: ModelInfo, top_k: int, index: int = 0) -> Row:
    """The row for image ``index`` of a batch from the classifier's judgement of the batch."""
    top = top_k_classes(judgement.probabilities[index], info.class_names, top_k)
    return Row(path, top, None, None if judgement.uncertain is None else bool(judgement.uncertain[index]))


def judged_rows(
    classifier: Classifier,
    paths: Sequence[Path | str],
    decode: Callable[[int], np.ndarray],
    info: ModelInfo,
    top_k: int,
) -> list[Row]:
    """One row per path: ``decode(i)`` gives image i, and an exception from it is that file's error
    row, not the batch's. Each image is run as soon as it is decoded; the uncertainty rule then
    scores the batch at once (:meth:`Classifier.judge`)."""
    errors: dict[int, str] = {}

    def images() -> Iterator[np.ndarray]:
        for i in range(len(paths)):
            try:
                image = decode(i)
            except Exception as error:  # any unreadable file is that file's problem, not the batch's
                errors[i] = str(error)
                continue
            yield image

    judgement = classifier.judge(images())
    rows, done = [], 0
    for i, path in enumerate(paths):
        if i in errors:
            rows.append(Row(str(path), error=errors[i]))
        else:
            rows.append(make_row(str(path), judgement, info, top_k, done))
            done += 1
    return rows


def parquet_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("path", pa.string()),
            ("class", pa.string()),
            ("probability", pa.float64()),
            ("top_classes", pa.list_(pa.string())),
            ("top_probabilities", pa.list_(pa.float64())),
            ("uncertain", pa.bool_()),
            ("error", pa.string()),
            ("model_sha256", pa.string()),
        ]
    )


def rows_to_table(rows: Sequence[Row], model_sha256: str):
    import pyarrow as pa

    return pa.table(
        {
            "path": [r.path for r in rows],
            "class": [r.top[0][0] if r.top else None for r in rows],
            "probability": [r.top[0][1] if r.top else None for r in rows],
            "top_classes": [[c for c, _ in r.top] if r.top else None for r in rows],
            "top_probabilities": [[p for _, p in r.top] if r.top else None for r in rows],
            "uncertain": [r.uncertain for r in rows],
            "error": [r.error for r in rows],
            "model_sha256": [model_sha256] * len(rows),
        },
        schema=parquet_schema(),
    )


def _csv_text(rows: Sequence[Row], model_sha256: str) -> str:
    """Today's `predict --format csv` rows (one per rank, one for an error) plus the new columns."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for r in rows:
        uncertain = "" if r.uncertain is None else str(r.uncertain).lower()
        if r.error:
            writer.writerow([r.path, "", "", "", "", r.error, model_sha256])
        for rank, (name, probability) in enumerate(r.top, 1):
            writer.writerow([r.path, rank, name, f"{probability:.6f}", uncertain, "", model_sha256])
    return buffer.getvalue()


def _jsonl_text(rows: Sequence[Row], model_sha256: str) -> str:
    """Today's `predict --format json` objects, one per line, plus class/probability/uncertain/sha."""
    lines = []
    for r in rows:
        lines.append(
            json.dumps(
                {
                    "file": r.path,
                    "class": r.top[0][0] if r.top else None,
                    "probability": round(r.top[0][1], 6) if r.top else None,
                    "predictions": [{"class": c, "probability": round(p, 6)} for c, p in r.top],
                    "uncertain": r.uncertain,
                    "error": r.error,
                    "model_sha256": model_sha256,
                }
            )
        )
    return "".join(line + "\n" for line in lines)


def parts_dir(out: Path) -> Path:
    return Path(str(out) + ".parts")


def output_format(out: Path) -> str:
    suffix = Path(out).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ValueError(f"--out {out}: unknown output format {suffix or '(none)'}; use {', '.join(OUTPUT_FORMATS)}")
    return suffix


def _part_files(out: Path) -> list[Path]:
    """Committed parts in commit order: ``part-NNNNNN.<fmt>`` files (either engine writes them)."""
    folder = parts_dir(out)
    if not folder.is_dir():
        return []
    return sorted(folder.glob(f"part-*{output_format(out)}"))


def _read_paths_and_model(path: Path, fmt: str) -> tuple[list[str], str | None]:
    """The image path of each result in one output file or part (errors count), and its model sha."""
    if fmt == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["path", "model_sha256"])
        shas = table.column("model_sha256").unique().to_pylist()
        return table.column("path").to_pylist(), (shas[0] if shas else None)
    text = path.read_text(encoding="utf-8")
    paths, sha = [], None
    if fmt == ".jsonl":
        for line in text.splitlines():
            if line.strip():
                record = json.loads(line)
                paths.append(record["file"])
                sha = sha or record.get("model_sha256")
        return paths, sha
    for row in csv.DictReader(io.StringIO(text), fieldnames=CSV_COLUMNS):
        if row["file"] == "file" and row["rank"] == "rank":
            continue  # the header of a finished output
        if row["rank"] in ("", "1"):  # one row per image: its error row or its rank-1 row
            paths.append(row["file"])
        sha = sha or row["model_sha256"]
    return paths, sha


def _readable_parquet(path: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
        return True
    except Exception:  # noqa: BLE001 - a damaged part (no footer, say) is scored again
        return False


@dataclass
class OutputState:
    """What an --out file and its committed parts already hold."""

    done: collections.Counter = field(default_factory=collections.Counter)
    model_sha256: str | None = None
    next_part: int = 0


def read_output_state(out: Path, model_sha256: str) -> OutputState:
    """Count the results FILE and FILE.parts/ hold per path; refuse (one line) results of another
    model. A Parquet part that cannot be read is removed here: its rows are scored again."""
    out = Path(out)
    fmt = output_format(out)
    if recover_commit(out):
        log.info("%s: finished the merge an interrupted run had committed", out)
    state = OutputState()
    sources = ([out] if out.is_file() else []) + _part_files(out)
    for source in sources:
        if source != out and source.suffix == ".parquet" and not _readable_parquet(source):
            log.warning("%s: unreadable part; its images are scored again", source)
            source.unlink()
            continue
        paths, sha = _read_paths_and_model(source, ".parquet" if source.suffix == ".parquet" else fmt)
        if sha and sha != model_sha256:
            raise OutputError(
                f"{out}: holds results of another model (sha256 {sha[:12]}..., this model {model_sha256[:12]}...); "
                "use another --out or remove it"
            )
        state.model_sha256 = state.model_sha256 or sha
        state.done.update(paths)
    for part in _part_files(out):
        if part.name.startswith("part-"):
            state.next_part = max(state.next_part, int(part.name.split("-")[1].split(".")[0]) + 1)
    return state


def remaining(paths: Sequence[Path | str], done: collections.Counter) -> list[str]:
    """``paths`` without the results already held: the k-th listing of a path is done when the output
    holds at least k results for it (a manifest may list an image several times)."""
    seen: collections.Counter = collections.Counter()
    todo = []
    for path in map(str, paths):
        seen[path] += 1
        if seen[path] > done[path]:
            todo.append(path)
    return todo


def _write_part(out: Path, number: int, rows: Sequence[Row], model_sha256: str) -> Path:
    fmt = output_format(out)
    path = parts_dir(out) / f"part-{number:06d}{fmt}"
    if fmt == ".parquet":
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(rows_to_table(rows, model_sha256), buffer)
        return atomic_write_bytes(path, buffer.getvalue())
    text = _csv_text(rows, model_sha256) if fmt == ".csv" else _jsonl_text(rows, model_sha256)
    return atomic_write_bytes(path, text.encode("utf-8"))


def finalize_output(out: Path, limit: collections.Counter | None = None) -> Path:
    """Merge FILE and its committed parts into FILE (one atomic replace), then drop the parts.

    Two-phase, so that a kill at any point leaves FILE complete and nothing counted twice: the merge
    is written to ``FILE.parts/merged<fmt>``, then ``FILE.parts/COMMIT`` marks it complete, then it
    replaces FILE, then the parts go; a run that finds COMMIT finishes those steps first
    (:func:`recover_commit`). ``limit`` caps the results kept per path at the number of times the
    inputs list it, so a block written twice by a retried Ray task cannot duplicate an image.
    Streams part by part: memory does not grow with the archive.
    """
    out = Path(out)
    fmt = output_format(out)
    folder = parts_dir(out)
    parts = _part_files(out)
    if not parts:
        shutil.rmtree(folder, ignore_errors=True)
        return out
    sources = ([out] if out.is_file() else []) + parts
    kept: collections.Counter = collections.Counter()

    def keep(path: str) -> bool:
        kept[path] += 1
        return limit is None or path not in limit or kept[path] <= limit[path]

    merged = folder / f"merged{fmt}"
    tmp = folder / f".merged{fmt}.tmp"
    try:
        if fmt == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = parquet_schema()
            with pq.ParquetWriter(tmp, schema) as writer:
                for source in sources:
                    table = pq.read_table(source).select(list(PARQUET_COLUMNS)).cast(schema)
                    mask = pa.array([keep(p) for p in table.column("path").to_pylist()], pa.bool_())
                    writer.write_table(table.filter(mask))
            with tmp.open("rb") as written:
                os.fsync(written.fileno())
        else:
            with tmp.open("w", encoding="utf-8", newline="") as handle:
                if fmt == ".csv":
                    handle.write(",".join(CSV_COLUMNS) + "\n")
                for source in sources:
                    _copy_text_rows(source, fmt, handle, keep, skip_header=source == out)
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, merged)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    atomic_write_bytes(folder / "COMMIT", b"merged holds FILE and every part\n")
    recover_commit(out)
    return out


def recover_commit(out: Path) -> bool:
    """Finish a merge that a kill interrupted after it was marked complete; True if there was one."""
    out = Path(out)
    folder = parts_dir(out)
    if not (folder / "COMMIT").is_file():
        return False
    merged = folder / f"merged{output_format(out)}"
    if merged.is_file():
        os.replace(merged, out)
    for entry in folder.iterdir():  # everything but the lock, which the running command holds
        if entry.name != ".lock":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return True


def _copy_text_rows(source: Path, fmt: str, handle, keep: Callable[[str], bool], skip_header: bool) -> None:
    text = source.read_text(encoding="utf-8")
    if fmt == ".jsonl":
        for line in text.splitlines():
            if line.strip() and keep(json.loads(line)["file"]):
                handle.write(line + "\n")
        return
    lines = text.splitlines()
    if skip_header and lines:
        lines = lines[1:]
    keeping = True
    for line, row in zip(lines, csv.reader(lines)):
        if row[1] in ("", "1"):  # a new image starts at its error row or its rank-1 row
            keeping = keep(row[0])
        if keeping:
            handle.write(line + "\n")


class _OutputLock:
    """An exclusive lock on FILE.parts/ so that two runs never write parts of one output."""

    def __init__(self, out: Path) -> None:
        self.path = parts_dir(out) / ".lock"

    def __enter__(self) -> _OutputLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = self.path.open("w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            raise OutputError(
                f"{self.path.parent.parent / self.path.parent.name.removesuffix('.parts')}: "
                "another run is writing this output now"
            ) from None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.close()
        folder = self.path.parent
        if folder.is_dir() and {p.name for p in folder.iterdir()} <= {".lock"}:
            shutil.rmtree(folder, ignore_errors=True)  # a refused or finished run leaves no trace
