"""Evaluation of exported .tflite models: test metrics, size on disk and latency.

Latency follows what a deployed inspection station sees: batch 1, a fixed thread count (recorded),
warm-up invokes first, then the median and p90 of many timed ``invoke()`` calls; turning a uint8
image into the input tensor is timed apart, since a camera pipeline may do it elsewhere.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from steeldefect.core.metrics import classification_metrics
from steeldefect.runtime.litert import delegate_partitions, make_interpreter, predict_tflite, resolve_threads, to_input


def measure_latency(interpreter, image: np.ndarray, *, warmup: int = 10, runs: int = 50) -> dict[str, float]:
    """Median / p90 / mean milliseconds of ``invoke()`` at batch 1, and of input preparation."""
    if warmup < 1 or runs < 1:
        raise ValueError("warmup and runs must be at least 1")
    input_detail = interpreter.get_input_details()[0]
    prep_times = []
    for _ in range(runs):
        started = time.perf_counter()
        tensor = to_input(image, input_detail)
        prep_times.append(time.perf_counter() - started)
    interpreter.set_tensor(input_detail["index"], tensor)
    for _ in range(warmup):
        interpreter.invoke()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        interpreter.invoke()
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


def evaluate_tflite(
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
    """Test metrics, size on disk and latency of one .tflite model."""
    threads = resolve_threads(threads)
    interpreter = make_interpreter(model_path, threads)
    probabilities = predict_tflite(interpreter, images, progress=progress, desc=Path(model_path).name)
    metrics = classification_metrics(labels, probabilities.argmax(axis=1), n_classes)
    latency = measure_latency(interpreter, images[0], warmup=warmup, runs=runs)
    return {
        **metrics,
        **latency,
        "size_mib": Path(model_path).stat().st_size / 2**20,
        "threads": threads,
        "xnnpack_partitions": delegate_partitions(interpreter),
    }
