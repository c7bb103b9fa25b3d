"""Score an image archive: the batch stage beside `predict`, for thousands to millions of images.

Inputs are files, folders and manifests (a ``.txt`` with one path per line, or a ``.csv`` with a
``path`` column; relative entries are resolved against the manifest's folder). Two engines give the
same rows:

* ``local`` (:func:`score_archive`): a bounded thread pool decodes JPEGs (Pillow releases the GIL)
  while interpreter workers, each with its own LiteRT interpreter (an interpreter is not
  thread-safe), classify the images already decoded. Results stream to the output in input order.
* ``ray`` (:func:`score_archive_ray`): the same job on Ray Data - batches of paths to ``map_batches``
  with an actor pool, each actor holding one interpreter and reading, decoding and classifying its
  batch; the rows come back and are committed as parts as the local engine's are - on this machine or
  on a cluster (``address`` or ``RAY_ADDRESS``).

The output (``--out FILE``: ``.parquet``, ``.csv`` or ``.jsonl``) is never half-written: results are
committed as numbered part files in ``FILE.parts/`` (each written atomically), and merged into FILE
by one atomic replace at the end. Re-running the same command reads what FILE and its parts already
hold, skips those images and appends the rest; an interrupted run loses only the batches in flight.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from steeldefect.core.files import atomic_write_bytes, write_json
from steeldefect.runtime.backends import EXPORTED, is_model_file
from steeldefect.runtime.litert import ModelFileError
from steeldefect.runtime.modelfile import Classifier, Judgement, ModelInfo, read_model_info
from steeldefect.runtime.modelfile import top_k as top_k_classes

log = logging.getLogger(__name__)

OUTPUT_FORMATS = (".parquet", ".csv", ".jsonl")
MANIFEST_SUFFIXES = (".txt", ".csv")
# Columns of the Parquet output, in order (documented in the README; checked by a test).
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
DEFAULT_BATCH_SIZE = 64
# Ray pays a fixed cost per block (scheduling, serialising the result table): 256 images per block
# gave 14 % more images/s than 64 on this 2-core box (3,600 NEU images, 2 actors).
DEFAULT_RAY_BATCH_SIZE = 256


class OutputError(ValueError):
    """An --out file that cannot be resumed by this command (other model, other format, busy)."""


# ---------------------------------------------------------------------------------------------------
# Inputs


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


# ---------------------------------------------------------------------------------------------------
# Rows


@dataclass
class Row:
    """One scored image: ``top`` is [(class, probability)] most likely first, empty when ``error``."""

    path: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    uncertain: bool | None = None


def make_row(path: str, judgement: Judgement, info: ModelInfo, top_k: int) -> Row:
    """The row for one image from the classifier's judgement of it (a batch of one)."""
    top = top_k_classes(judgement.probabilities[0], info.class_names, top_k)
    return Row(path, top, None, None if judgement.uncertain is None else bool(judgement.uncertain[0]))


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


# ---------------------------------------------------------------------------------------------------
# The local engine


def default_workers() -> int:
    """Workers of an archive run: one single-thread worker process per core. Decoding is a quarter of
    the CPU work per image and only independent workers keep every core busy through it: 1.36x
    today's loop on the 2-core box, against 1.09x for one interpreter with a decode pool
    (bench/archive_throughput.py, README)."""
    return max(1, os.cpu_count() or 1)


def iter_predictions(
    model_path: Path,
    paths: Sequence[Path | str],
    *,
    top_k: int = 1,
    workers: int | None = None,
    threads: int | None = None,
    decode_threads: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    info: ModelInfo | None = None,
    accept: float | None = None,
) -> Iterator[list[Row]]:
    """Rows for ``paths`` in input order, one list per batch, as soon as each batch is done.

    ``workers=1``: one interpreter (``threads`` threads) in this process classifies while a bounded
    pool of ``decode_threads`` decodes the next batch (Pillow releases the GIL while it decodes).
    ``workers>1``: that many worker processes, each with its own interpreter, each decoding and
    classifying its batches in turn: no GIL handoff between decoding and inference, which costs a
    thread pipeline dearly when the cores are busy. At most two batches per worker are in flight, so
    memory stays flat.
    """
    from steeldefect.data.decode import read_image

    model_path = Path(model_path)
    if not is_model_file(model_path):
        raise ModelFileError(f"{model_path}: batch scoring runs exported models, {EXPORTED} (export the run first)")
    check_options(workers, threads, batch_size)
    info = info or read_model_info(model_path)
    # Default one worker (no process start-up for a few images); its interpreter uses every core, as
    # `predict` always did. Several workers: one core each.
    workers = workers or 1
    threads = threads or (None if workers == 1 else 1)
    decode_threads = decode_threads or max(2, os.cpu_count() or 1)
    classifier = Classifier(model_path, threads, info, accept=accept)  # checks the model before any worker starts

    def decode(path: Path | str) -> np.ndarray | str:
        try:
            return read_image(path, info.input_size)
        except Exception as error:  # any unreadable file is that file's problem, not the batch's
            return str(error)

    def classify(batch: list[Path | str], decoded: list[Future]) -> list[Row]:
        rows = []
        for path, future in zip(batch, decoded):
            image = future.result()
            if isinstance(image, str):
                rows.append(Row(str(path), error=image))
            else:
                rows.append(make_row(str(path), classifier.judge(image[None]), info, top_k))
        return rows

    batches = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    if workers > 1:
        yield from _iter_in_processes(model_path, info, batches, workers, threads, top_k, accept)
        return
    # The one interpreter runs in one thread (it is not thread-safe) while the pool decodes ahead.
    with (
        ThreadPoolExecutor(decode_threads, thread_name_prefix="decode") as decoders,
        ThreadPoolExecutor(1, thread_name_prefix="infer") as inference,
    ):
        in_flight: collections.deque[Future] = collections.deque()
        pending = iter(batches)
        try:
            while True:
                while len(in_flight) <= 1:
                    batch = next(pending, None)
                    if batch is None:
                        break
                    decoded = [decoders.submit(decode, path) for path in batch]
                    in_flight.append(inference.submit(classify, batch, decoded))
                if not in_flight:
                    return
                yield in_flight.popleft().result()
        finally:
            for future in in_flight:
                future.cancel()
            decoders.shutdown(cancel_futures=True)


_WORKER: dict[str, Any] = {}


def _start_worker(
    model_path: Path, threads: int, info: ModelInfo, top_k: int, accept: float | None, parent: int
) -> None:
    import threading

    def exit_with_parent() -> None:
        # A parent killed with SIGKILL cannot stop its pool: a worker must not outlive it.
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    _WORKER.update(classifier=Classifier(model_path, threads, info, accept=accept), info=info, top_k=top_k)


def score_paths(classifier: Classifier, paths: Sequence[Path | str], info: ModelInfo, top_k: int) -> list[Row]:
    """Decode and classify each image in turn (a worker process's or a Ray actor's batch): one bad
    file is an error row, not a failed batch."""
    from steeldefect.data.decode import read_image

    rows = []
    for path in paths:
        try:
            image = read_image(path, info.input_size)
        except Exception as error:  # any unreadable file is that file's problem, not the batch's
            rows.append(Row(str(path), error=str(error)))
            continue
        rows.append(make_row(str(path), classifier.judge(image[None]), info, top_k))
    return rows


def _score_in_worker(batch: list[Path | str]) -> list[Row]:
    """One batch in a worker process."""
    return score_paths(_WORKER["classifier"], batch, _WORKER["info"], _WORKER["top_k"])


def _iter_in_processes(
    model_path: Path,
    info: ModelInfo,
    batches: list[list],
    workers: int,
    threads: int,
    top_k: int,
    accept: float | None,
) -> Iterator[list[Row]]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent holds an interpreter and thread pools that a fork would copy.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_start_worker,
        initargs=(model_path, threads, info, top_k, accept, os.getpid()),
    ) as pool:
        in_flight: collections.deque[Future] = collections.deque()
        pending = iter(batches)
        try:
            while True:
                while len(in_flight) < 2 * workers:
                    batch = next(pending, None)
                    if batch is None:
                        break
                    in_flight.append(pool.submit(_score_in_worker, batch))
                if not in_flight:
                    return
                yield in_flight.popleft().result()
        finally:
            for future in in_flight:
                future.cancel()


# ---------------------------------------------------------------------------------------------------
# The output: FILE plus FILE.parts/ (numbered parts, each committed atomically)


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
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
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


@dataclass
class ArchiveResult:
    """What a run did: images listed, skipped as already done, scored now, failed (in the whole output)."""

    out: Path
    listed: int
    skipped: int
    scored: int
    failed: int
    seconds: float
    engine: str = "local"
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0


def check_options(workers: int | None, threads: int | None, batch_size: int) -> None:
    """Bad numbers are refused before anything is written."""
    for name, value in (("--workers", workers), ("--threads", threads)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 1 (or 0 for the default), got {value}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")


def _prepare(model_path: Path, out: Path) -> tuple[ModelInfo, str]:
    model_path = Path(model_path)
    if not is_model_file(model_path):
        raise ModelFileError(f"{model_path}: batch scoring runs exported models, {EXPORTED} (export the run first)")
    info = read_model_info(model_path)
    fmt = output_format(out)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return info, fmt


def _record_run(out: Path, info: ModelInfo, engine: str) -> None:
    run_file = parts_dir(out) / "run.json"
    if not run_file.is_file():
        write_json(run_file, {"model": str(info.path), "model_sha256": info.sha256, "engine": engine})


def _count_failed(out: Path) -> int:
    fmt = output_format(out)
    if not Path(out).is_file():
        return 0
    if fmt == ".parquet":
        import pyarrow.parquet as pq

        errors = pq.read_table(out, columns=["error"]).column("error")
        return len(errors) - errors.null_count
    text = Path(out).read_text(encoding="utf-8")
    if fmt == ".jsonl":
        return sum(1 for line in text.splitlines() if line.strip() and json.loads(line)["error"])
    return sum(1 for row in csv.DictReader(io.StringIO(text)) if row["error"])


def score_archive(
    model_path: Path,
    inputs: Sequence[Path],
    out: Path,
    *,
    top_k: int = 1,
    workers: int | None = None,
    threads: int | None = None,
    decode_threads: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
    accept: float | None = None,
) -> ArchiveResult:
    """Score every image of ``inputs`` (files, folders, manifests) into ``out`` with the local engine.

    Resumable: images ``out`` already holds are skipped; each batch is committed as a part as soon
    as it is scored; the parts are merged into ``out`` atomically at the end.
    """
    out = Path(out)
    check_options(workers, threads, batch_size)
    workers = workers or default_workers()
    info, _ = _prepare(model_path, out)
    paths = collect_inputs(inputs)
    start = time.perf_counter()
    with _OutputLock(out):
        state = read_output_state(out, info.sha256)
        todo = remaining(paths, state.done)
        _record_run(out, info, "local")
        number = state.next_part
        with tqdm(total=len(todo), desc="predict", unit="img", disable=not progress, smoothing=0.05) as bar:
            for rows in iter_predictions(
                model_path,
                todo,
                top_k=top_k,
                workers=workers,
                threads=threads,
                decode_threads=decode_threads,
                batch_size=batch_size,
                info=info,
                accept=accept,
            ):
                _write_part(out, number, rows, info.sha256)
                number += 1
                bar.update(len(rows))
        seconds = time.perf_counter() - start
        finalize_output(out, collections.Counter(map(str, paths)))
    return ArchiveResult(out, len(paths), len(paths) - len(todo), len(todo), _count_failed(out), seconds)


# ---------------------------------------------------------------------------------------------------
# The Ray engine


class RayMissingError(RuntimeError):
    """Ray is an optional extra."""


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RayMissingError("--engine ray needs Ray: pip install 'steeldefect[ray]'") from None
    return ray


class _RayScorer:
    """An actor of the pool: one LiteRT interpreter, built once and used by this actor only. It reads,
    decodes and classifies its batch of paths in turn (as a local worker process does), so only paths
    and result rows cross Ray's object store, never decoded images."""

    def __init__(self, model_path: str, info: ModelInfo, top_k: int, threads: int, accept: float | None = None) -> None:
        self.classifier = Classifier(Path(model_path), threads, info, accept=accept)
        self.info, self.top_k = info, top_k

    def __call__(self, batch):
        paths = batch.column("path").to_pylist()
        rows = score_paths(self.classifier, paths, self.info, self.top_k)
        return rows_to_table(rows, self.info.sha256)


# DataContext settings of a Ray run: work nobody sees here, switched off (not measured one by one).
# Ray's progress bars and stats are drawn and gathered by the driver's scheduling loop (this module
# shows its own bar, counted from the rows it commits), and the per-task memory poll is a thread in
# every actor reading /proc every second, for a figure this job never reports.
_RAY_DATA_SETTINGS = {
    "enable_progress_bars": False,
    "enable_operator_progress_bars": False,
    "print_on_execution_start": False,
    "enable_auto_log_stats": False,
    "verbose_stats_logs": False,
    "memory_usage_poll_interval_s": None,
}


@contextlib.contextmanager
def _ray_data_settings(ray):
    """Ray Data's context with :data:`_RAY_DATA_SETTINGS` for this run, restored afterwards (a caller
    that uses Ray Data for other work keeps its settings)."""
    context = ray.data.DataContext.get_current()
    saved = {name: getattr(context, name) for name in _RAY_DATA_SETTINGS if hasattr(context, name)}
    for name in saved:
        setattr(context, name, _RAY_DATA_SETTINGS[name])
    try:
        yield context
    finally:
        for name, value in saved.items():
            setattr(context, name, value)


def score_archive_ray(
    model_path: Path,
    inputs: Sequence[Path],
    out: Path,
    *,
    top_k: int = 1,
    address: str | None = None,
    actors: int | None = None,
    threads: int | None = None,
    batch_size: int = DEFAULT_RAY_BATCH_SIZE,
    num_cpus: int | None = None,
    progress: bool = False,
    accept: float | None = None,
) -> ArchiveResult:
    """The same job as :func:`score_archive` on Ray Data; the output is the same file.

    ``address`` (or ``RAY_ADDRESS``) joins a running cluster; otherwise Ray starts on this machine
    with ``num_cpus`` (default: every core) and no dashboard. The model and the images must be
    readable at the same path on every node of a cluster (a shared mount); ``out`` is written by
    this process, one part per scored batch as its results arrive.
    """
    ray = _import_ray()
    out = Path(out)
    check_options(actors, threads, batch_size)
    info, fmt = _prepare(model_path, out)
    if fmt != ".parquet":
        raise ValueError(f"--out {out}: --engine ray writes Parquet; give an --out ending in .parquet")
    paths = collect_inputs(inputs)
    start = time.perf_counter()
    with _OutputLock(out):
        state = read_output_state(out, info.sha256)
        todo = remaining(paths, state.done)
        _record_run(out, info, "ray")
        details: dict[str, Any] = {}
        if todo:
            details = _run_ray(
                ray,
                Path(model_path),
                info,
                todo,
                out,
                state.next_part,
                top_k=top_k,
                address=address,
                actors=actors,
                threads=threads or 1,
                batch_size=batch_size,
                num_cpus=num_cpus,
                progress=progress,
                accept=accept,
            )
        seconds = time.perf_counter() - start
        finalize_output(out, collections.Counter(map(str, paths)))
    result = ArchiveResult(
        out, len(paths), len(paths) - len(todo), len(todo), _count_failed(out), seconds, "ray", details
    )
    return result


def _run_ray(
    ray,
    model_path: Path,
    info: ModelInfo,
    todo: list[str],
    out: Path,
    first_part: int,
    *,
    top_k: int,
    address: str | None,
    actors: int | None,
    threads: int,
    batch_size: int,
    num_cpus: int | None,
    progress: bool,
    accept: float | None = None,
) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    address = address or os.environ.get("RAY_ADDRESS") or None
    started_here = not ray.is_initialized()
    if started_here:
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address is None:
            options["num_cpus"] = num_cpus or os.cpu_count() or 1
        context = ray.init(address=address, **options)
    else:
        context = None
    try:
        with _ray_data_settings(ray):
            logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-operator logs are not ours to show
            cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
            actors = actors or max(1, cluster_cpus)
            n_blocks = max(1, -(-len(todo) // batch_size))
            table = pa.table({"path": todo})
            # from_blocks keeps one block per batch and reads their metadata here; from_arrow would
            # run one remote task per block for it (a worker process started for each run).
            dataset = ray.data.from_blocks([table.slice(i * batch_size, batch_size) for i in range(n_blocks)])
            # One stage: each actor reads, decodes and classifies its paths. Ray Data restarts a killed
            # actor and retries its batch (max_restarts and max_task_retries default to -1 for actor
            # pools); a batch's rows reach this process once, when its task has succeeded. Each actor
            # holds the CPUs its interpreter uses, unless more actors were asked for than there are CPUs.
            dataset = dataset.map_batches(
                _RayScorer,
                fn_constructor_kwargs={
                    "model_path": str(Path(model_path).resolve()),
                    "info": info,
                    "top_k": top_k,
                    "threads": threads,
                    "accept": accept,
                },
                batch_size=batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=min(float(threads), cluster_cpus / actors),
            )
            # Rows come back to this process, which commits each batch as a part as the local engine
            # does (atomic, numbered, resumable): a few hundred bytes per image, where Ray's own
            # write_parquet cost a write task, a worker and a tiny file per batch.
            number = first_part
            with tqdm(total=len(todo), desc="predict", unit="img", disable=not progress, smoothing=0.05) as bar:
                for part in dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                    buffer = io.BytesIO()
                    pq.write_table(part.select(list(PARQUET_COLUMNS)).cast(parquet_schema()), buffer)
                    atomic_write_bytes(parts_dir(out) / f"part-{number:06d}.parquet", buffer.getvalue())
                    number += 1
                    bar.update(part.num_rows)
            return {
                "cluster_cpus": cluster_cpus,
                "actors": actors,
                "address": address or "local",
                "dashboard_url": (context.dashboard_url if context is not None else None) or None,
            }
    finally:
        if started_here:
            ray.shutdown()
