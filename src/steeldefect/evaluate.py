"""Running .tflite models with the LiteRT interpreter: predictions, test metrics, size and latency.

Latency follows what a deployed inspection station sees: batch 1, a fixed thread count (recorded),
warm-up invokes first, then the median and p90 of many timed ``invoke()`` calls; turning a uint8
image into the input tensor is timed apart, since a camera pipeline may do it elsewhere.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm


def make_interpreter(model: Path | bytes, threads: int | None = None):
    """A LiteRT interpreter (XNNPACK) for a .tflite file or flatbuffer bytes, tensors allocated."""
    from ai_edge_litert.interpreter import Interpreter

    source = {"model_content": model} if isinstance(model, bytes) else {"model_path": str(model)}
    interpreter = Interpreter(**source, num_threads=threads or os.cpu_count() or 1)
    interpreter.allocate_tensors()
    return interpreter


def delegate_partitions(interpreter) -> int:
    """How many XNNPACK partitions the graph was split into (1 = the whole graph is delegated)."""
    return sum(1 for op in interpreter._get_ops_details() if op["op_name"] == "DELEGATE")


def to_input(image: np.ndarray, detail: dict) -> np.ndarray:
    """A uint8 RGB image (H, W, 3) as the model's batch-1 input tensor, whatever its dtype."""
    dtype = np.dtype(detail["dtype"])
    batch = image[None]
    if dtype == np.float32 or dtype == np.float16:
        return batch.astype(dtype)
    scale, zero_point = detail["quantization"]
    if scale == 1.0 and zero_point == 0 and dtype == np.uint8:
        return np.ascontiguousarray(batch, dtype=np.uint8)  # raw pixels are the quantized input
    info = np.iinfo(dtype)
    return np.clip(np.round(batch / scale + zero_point), info.min, info.max).astype(dtype)


def from_output(raw: np.ndarray, detail: dict) -> np.ndarray:
    """Model output as float class probabilities (dequantized for integer outputs)."""
    if np.issubdtype(raw.dtype, np.integer):
        scale, zero_point = detail["quantization"]
        return (raw.astype(np.float32) - zero_point) * scale
    return raw.astype(np.float32)


def predict_tflite(interpreter, images: np.ndarray, *, progress: bool = False, desc: str = "tflite") -> np.ndarray:
    """Outputs (N, ...) for uint8 images (N, H, W, 3), one invoke per image: class probabilities
    for a classifier, feature maps for a backbone."""
    input_detail = interpreter.get_input_details()[0]
    output_detail = interpreter.get_output_details()[0]
    outputs = []
    for image in tqdm(images, desc=desc, unit="img", disable=not progress, leave=False):
        interpreter.set_tensor(input_detail["index"], to_input(image, input_detail))
        interpreter.invoke()
        outputs.append(from_output(interpreter.get_tensor(output_detail["index"])[0], output_detail))
    return np.stack(outputs) if outputs else np.zeros((0, *output_detail["shape"][1:]), np.float32)


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
    from steeldefect.training import classification_metrics

    threads = threads or os.cpu_count() or 1
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
