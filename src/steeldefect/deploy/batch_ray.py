"""The Ray engine of `predict --engine ray`: the archive job of :func:`steeldefect.deploy.batch.score_archive`
on Ray Data (actors each holding one classifier), writing the same output file with the same resume."""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from steeldefect.core.files import atomic_write_bytes
from steeldefect.deploy.batch import ArchiveResult, _count_failed, _prepare, _record_run, check_options, score_paths
from steeldefect.deploy.batch_io import (
    PARQUET_COLUMNS,
    _OutputLock,
    collect_inputs,
    finalize_output,
    parquet_schema,
    parts_dir,
    read_output_state,
    remaining,
    rows_to_table,
)
from steeldefect.runtime.modelfile import Classifier, ModelInfo

# Ray pays a fixed cost per block (scheduling, serialising the result table): 256 images per block
# gave 14 % more images/s than 64 on this 2-core box (3,600 NEU images, 2 actors).
DEFAULT_RAY_BATCH_SIZE = 256


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
