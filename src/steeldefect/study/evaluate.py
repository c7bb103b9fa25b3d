"""Evaluation of exported models (.tflite, .onnx, OpenVINO .xml): test metrics, size on disk and
latency, each through the runtime its file asks for (:mod:`steeldefect.runtime.backends`).

Latency follows what a deployed inspection station sees: batch 1, a fixed thread count (recorded),
warm-up invokes first, then the median and p90 of many timed invokes; turning a uint8 image into
the input tensor is timed apart, since a camera pipeline may do it elsewhere. Besides the run's
thread count, the median is also measured at 1 and 2 threads, so every format and variant can be
compared at both in one table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from steeldefect.core.metrics import classification_metrics
from steeldefect.runtime.backends import PROBABILITIES, Backend, LiteRTBackend, open_backend, size_on_disk
from steeldefect.runtime.litert import resolve_threads

COMPARED_THREADS = (1, 2)


def measure_latency(backend, image: np.ndarray, *, warmup: int = 10, runs: int = 50) -> dict[str, float]:
    """Median / p90 / mean milliseconds of one invoke at batch 1, and of input preparation.
    ``backend``: a :class:`Backend`, or a LiteRT interpreter (the benches time those directly)."""
    if warmup < 1 or runs < 1:
        raise ValueError("warmup and runs must be at least 1")
    if not isinstance(backend, Backend):
        backend = LiteRTBackend(None, None, interpreter=backend)
    prep_times = []
    for _ in range(runs):
        started = time.perf_counter()
        prepared = backend.prepare(image)
        prep_times.append(time.perf_counter() - started)
    for _ in range(warmup):
        backend.invoke(prepared)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        backend.invoke(prepared)
        times.append(time.perf_counter() - started)
    times_ms = 1000.0 * np.asarray(times)
    return {
        "latency_ms_median": float(np.median(times_ms)),
        "latency_ms_p90": float(np.percentile(times_ms, 90)),
        "latency_ms_mean": float(times_ms.mean()),
        "input_prep_ms_median": float(1000.0 * np.median(prep_times)),
        "warmup": warmup,
        "runs": runs,
    }


def evaluate_model(
    model_path: Path,
    images: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    *,
    threads: int | None = None,
    warmup: int = 10,
    runs: int = 50,
    progress: bool = False,
) -> dict[str, Any]:
    """Test metrics, size on disk and latency (at ``threads`` and at 1 and 2 threads) of one model."""
    from tqdm.auto import tqdm

    threads = resolve_threads(threads)
    backend = open_backend(model_path, threads)
    probabilities = np.stack(
        [
            backend.run_one(image)[PROBABILITIES]
            for image in tqdm(images, desc=Path(model_path).name, unit="img", disable=not progress, leave=False)
        ]
    )
    metrics = classification_metrics(labels, probabilities.argmax(axis=1), n_classes)
    latency = measure_latency(backend, images[0], warmup=warmup, runs=runs)
    for count in COMPARED_THREADS:
        timed = backend if count == threads else open_backend(model_path, count)
        median = latency if count == threads else measure_latency(timed, images[0], warmup=warmup, runs=runs)
        latency[f"latency_ms_median_{count}t"] = median["latency_ms_median"]
    return {
        **metrics,
        **latency,
        "size_mib": size_on_disk(model_path) / 2**20,
        "threads": threads,
        "runtime": backend.runtime,
        **backend.details(),
    }


# The name `evaluate` used when every model was a .tflite.
evaluate_tflite = evaluate_model
