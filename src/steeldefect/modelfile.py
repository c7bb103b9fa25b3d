"""A deployed model file and what it says about itself: class names, input size, variant,
provenance. `predict`, the batch engines and the HTTP service all load models through here, so a
model means the same thing to each of them.

Today a model's description is its JSON sidecar ``<model>.json`` (written by `train` and `export`).
Model files from elsewhere are untrusted input: every field read here is checked, and a problem is
reported as one line naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from steeldefect.files import file_digest
from steeldefect.runtime import ModelFileError, input_size, make_interpreter, predict_tflite


def sidecar_path(model_path: Path) -> Path:
    """Metadata file that travels with a model: class names, input size, provenance."""
    return Path(str(model_path) + ".json")


@dataclass(frozen=True)
class ModelInfo:
    """What a model file says about itself (``metadata`` holds every recorded field)."""

    path: Path
    class_names: tuple[str, ...]
    input_size: tuple[int, int]  # (height, width)
    variant: str
    sha256: str
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.path.name


def read_model_info(model_path: Path) -> ModelInfo:
    """Read and check a model's description; one-line :class:`ModelFileError` on any problem."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ModelFileError(f"{model_path}: model file not found")
    meta_path = sidecar_path(model_path)
    if not meta_path.is_file():
        raise ModelFileError(
            f"{meta_path}: metadata missing; it must travel with the model (class names, input size)"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{meta_path}: not a JSON metadata file ({error})") from error
    if not isinstance(meta, dict):
        raise ModelFileError(f"{meta_path}: metadata must be a JSON object")
    names = meta.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ModelFileError(f"{meta_path}: no class_names list in the model metadata")
    try:
        size = (int(meta["input"]["height"]), int(meta["input"]["width"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ModelFileError(f"{meta_path}: no input height/width in the model metadata") from error
    if min(size) < 1:
        raise ModelFileError(f"{meta_path}: input size {size} is not positive")
    variant = str(meta.get("variant") or ("keras" if model_path.suffix == ".keras" else "tflite"))
    return ModelInfo(model_path, tuple(names), size, variant, file_digest(model_path), meta)


class Classifier:
    """One loaded .tflite classifier answering probability queries for uint8 RGB images.

    Not thread-safe (one LiteRT interpreter inside): one instance per thread or worker.
    """

    def __init__(self, model_path: Path, threads: int | None = None, info: ModelInfo | None = None) -> None:
        self.info = info or read_model_info(model_path)
        self.interpreter = make_interpreter(Path(model_path), threads)
        actual = input_size(self.interpreter)
        if actual != self.info.input_size:
            raise ModelFileError(
                f"{sidecar_path(self.info.path)}: input size {self.info.input_size[0]}x{self.info.input_size[1]} "
                f"does not match the model's {actual[0]}x{actual[1]}"
            )
        n_outputs = int(self.interpreter.get_output_details()[0]["shape"][-1])
        if n_outputs != len(self.info.class_names):
            raise ModelFileError(
                f"{sidecar_path(self.info.path)}: {len(self.info.class_names)} class names for a model "
                f"with {n_outputs} outputs"
            )

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, n_classes) probabilities for uint8 images (N, H, W, 3) of the model's input size."""
        return predict_tflite(self.interpreter, images)


def top_k(probabilities: np.ndarray, class_names: tuple[str, ...] | list[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` most likely classes with their probabilities, most likely first (ties: lower index)."""
    order = np.argsort(-probabilities, kind="stable")[: max(1, min(k, len(class_names)))]
    return [(class_names[i], float(probabilities[i])) for i in order]
