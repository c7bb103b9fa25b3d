"""Score an image archive: the batch stage beside `predict`, for thousands to millions of images.

Inputs are files, folders and manifests (a ``.txt`` with one path per line, or a ``.csv`` with a
``path`` column; relative entries are resolved against the manifest's folder). Two engines give the
same rows:

* ``local`` (:func:`score_archive`): a bounded thread pool decodes JPEGs (Pillow releases the GIL)
  while interpreter workers, each with its own LiteRT interpreter (an interpreter is not
  thread-safe), classify the images already decoded. Results stream to the output in input order.
* ``ray`` (:func:`steeldefect.deploy.batch_ray.score_archive_ray`): the same job on Ray Data -
  batches of paths to ``map_batches`` with an actor pool, each actor holding one interpreter and
  reading, decoding and classifying its batch; the rows come back and are committed as parts as the
  local engine's are - on this machine or on a cluster (``address`` or ``RAY_ADDRESS``).

The output (``--out FILE``: ``.parquet``, ``.csv`` or ``.jsonl``) is never half-written: results are
committed as numbered part files in ``FILE.parts/`` (each written atomically), and merged into FILE
by one atomic replace at the end. Re-running the same command reads what FILE and its parts already
hold, skips those images and appends the rest; an interrupted run loses only the batches in flight.

This module holds the local engine and the archive job; the inputs and the output file are in
:mod:`steeldefect.deploy.batch_io`, the Ray engine in :mod:`steeldefect.deploy.batch_ray`.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from steeldefect.core.files import write_json
from steeldefect.deploy.batch_io import (
    Row,
    _OutputLock,
    _write_part,
    collect_inputs,
    finalize_output,
    judged_rows,
    output_format,
    parts_dir,
    read_output_state,
    remaining,
)
from steeldefect.runtime.backends import EXPORTED, is_model_file
from steeldefect.runtime.litert import ModelFileError
from steeldefect.runtime.modelfile import Classifier, ModelInfo, read_model_info

DEFAULT_BATCH_SIZE = 64


# ---------------------------------------------------------------------------------------------------
# The local engine


def default_workers() -> int:
    """Workers of an archive run: one single-thread worker process per core. Decoding is a quarter of
    the CPU work per image and only independent workers keep every core busy through it: 1.36x
    today's loop on the 2-core box, against 1.09x for one interpreter with a decode pool
    (bench/archive_throughput.py, docs/results.md "Archive throughput")."""
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

    def decode(path: Path | str) -> np.ndarray:
        return read_image(path, info.input_size)

    def classify(batch: list[Path | str], decoded: list[Future]) -> list[Row]:
        # A decoding error comes out of future.result(): that file's error row.
        return judged_rows(classifier, batch, lambda i: decoded[i].result(), info, top_k)

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
    model_path: Path, threads: int | None, info: ModelInfo, top_k: int, accept: float | None, parent: int
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

    return judged_rows(classifier, paths, lambda i: read_image(paths[i], info.input_size), info, top_k)


def _score_in_worker(batch: list[Path | str]) -> list[Row]:
    """One batch in a worker process."""
    return score_paths(_WORKER["classifier"], batch, _WORKER["info"], _WORKER["top_k"])


def _iter_in_processes(
    model_path: Path,
    info: ModelInfo,
    batches: list[list],
    workers: int,
    threads: int | None,
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
