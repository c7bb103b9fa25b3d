"""The LiteRT runtime: every .tflite model in steeldefect (a backbone converted for feature
extraction, an exported classifier under evaluation, a deployed model answering `predict` or the
service) is run through this module.

An interpreter is not thread-safe: give each thread (or process) its own, and create it here so that
the thread count, tensor allocation and the uint8/float conversions at the edges are the same for
every caller.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm


class ModelFileError(ValueError):
    """A .tflite file that is missing, empty or not a model LiteRT can load (named in the message)."""


def resolve_threads(threads: int | None) -> int:
    """``None`` or 0 means every core: the documented meaning of ``--threads 0``."""
    if threads is not None and threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = all cores), got {threads}")
    return threads or os.cpu_count() or 1


def make_interpreter(model: Path | bytes, threads: int | None = None):
    """A LiteRT interpreter (XNNPACK) for a .tflite file or flatbuffer bytes, tensors allocated.

    A file that LiteRT cannot load raises :class:`ModelFileError` naming it, instead of the
    runtime's bare "not a valid Flatbuffer buffer".
    """
    from ai_edge_litert.interpreter import Interpreter

    source: dict[str, bytes | str]
    if isinstance(model, bytes):
        source, name = {"model_content": model}, "model bytes"
    else:
        path = Path(model)
        if not path.is_file():
            raise ModelFileError(f"{path}: model file not found")
        if path.stat().st_size == 0:
            raise ModelFileError(f"{path}: model file is empty")
        source, name = {"model_path": str(path)}, str(path)
    try:
        interpreter = Interpreter(**source, num_threads=resolve_threads(threads))
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFileError(f"{name}: not a model LiteRT can load ({first_line})") from error
    return interpreter


def delegate_partitions(interpreter) -> int:
    """How many XNNPACK partitions the graph was split into (1 = the whole graph is delegated)."""
    return sum(1 for op in interpreter._get_ops_details() if op["op_name"] == "DELEGATE")


def input_size(interpreter) -> tuple[int, int]:
    """(height, width) of the model's batch-1 image input."""
    shape = interpreter.get_input_details()[0]["shape"]
    return int(shape[1]), int(shape[2])


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
    """Model output as float values (dequantized for integer outputs)."""
    if np.issubdtype(raw.dtype, np.integer):
        scale, zero_point = detail["quantization"]
        return (raw.astype(np.float32) - zero_point) * scale
    return raw.astype(np.float32)


def output_details(interpreter) -> list[dict]:
    """The model's outputs, narrowest first. A classifier that also carries its texture statistics
    (for the uncertainty score) has two: exports since issue #27 list the class probabilities first,
    older deploy models list them second; either way they are the narrower. (The
    :class:`~steeldefect.runtime.modelfile.Classifier` picks them by the names its model file gives.)"""
    return sorted(interpreter.get_output_details(), key=lambda d: int(np.prod(d["shape"][1:])))


def predict_tflite_outputs(
    interpreter, images: np.ndarray, *, progress: bool = False, desc: str = "tflite"
) -> list[np.ndarray]:
    """Every output (N, ...) for uint8 images (N, H, W, 3), narrowest first (see :func:`output_details`),
    one invoke per image. Models are exported with batch 1 (XNNPACK takes the whole graph only when
    every shape is static)."""
    input_detail = interpreter.get_input_details()[0]
    details = output_details(interpreter)
    collected: list[list[np.ndarray]] = [[] for _ in details]
    for image in tqdm(images, desc=desc, unit="img", disable=not progress, leave=False):
        interpreter.set_tensor(input_detail["index"], to_input(image, input_detail))
        interpreter.invoke()
        for slot, detail in zip(collected, details):
            slot.append(from_output(interpreter.get_tensor(detail["index"])[0], detail))
    return [
        np.stack(slot) if slot else np.zeros((0, *detail["shape"][1:]), np.float32)
        for slot, detail in zip(collected, details)
    ]


def predict_tflite(interpreter, images: np.ndarray, *, progress: bool = False, desc: str = "tflite") -> np.ndarray:
    """The first (narrowest) output (N, ...) for uint8 images (N, H, W, 3): class probabilities for a
    classifier, feature maps for a backbone."""
    return predict_tflite_outputs(interpreter, images, progress=progress, desc=desc)[0]
