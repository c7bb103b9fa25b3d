"""A deployed model file and what it says about itself: class names, input size, variant,
provenance. `predict`, the batch engines and the HTTP service all load models through here, so a
model means the same thing to each of them.

An exported model carries its description inside (a .tflite in TFLite Model Metadata plus
``steeldefect.json``, see :mod:`steeldefect.runtime.tflite_metadata`; an .onnx in ``metadata_props``;
an OpenVINO .xml in ``rt_info``, see :mod:`steeldefect.runtime.backends`): the model file is the
source of truth. The JSON sidecar
``<model>.json`` (written by `train` and `export`) describes .keras models and older exports
without metadata. Model files from elsewhere are untrusted input: every field read here is checked,
and a problem is reported as one line naming the file.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from steeldefect.core.files import sidecar_path
from steeldefect.runtime.backends import (
    MODEL_SUFFIXES,
    PROBABILITIES,
    TEXTURE,
    model_digest,
    open_backend,
    read_embedded,
)
from steeldefect.runtime.calibration import apply_temperature
from steeldefect.runtime.litert import ModelFileError
from steeldefect.runtime.tflite_metadata import OUR_FILE
from steeldefect.runtime.uncertainty import RULE_FILE, UncertaintyRule


@dataclass(frozen=True)
class ModelInfo:
    """What a model file says about itself (``metadata`` holds every recorded field)."""

    path: Path
    class_names: tuple[str, ...]
    input_size: tuple[int, int]  # (height, width)
    variant: str
    sha256: str
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # Where the description was read: the model file itself (embedded metadata) or its sidecar.
    described_by: Path | None = field(default=None, compare=False)
    # How the model says "uncertain" (carried inside exported deploy models), and its calibration.
    rule: UncertaintyRule | None = field(default=None, compare=False, repr=False)
    temperature: float | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return self.path.name


def read_model_info(model_path: Path) -> ModelInfo:
    """Read and check a model's description; one-line :class:`ModelFileError` on any problem.

    A .tflite's embedded metadata comes first; the sidecar is the fallback for models without it
    (older exports, .keras). When both exist and disagree, the model file wins and a warning names
    the sidecar.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ModelFileError(f"{model_path}: model file not found")
    meta_path = sidecar_path(model_path)
    embedded, rule_bytes = read_embedded(model_path) if model_path.suffix.lower() in MODEL_SUFFIXES else (None, None)
    if embedded is None:
        if not meta_path.is_file():
            raise ModelFileError(
                f"{model_path}: no metadata inside the model file and no sidecar {meta_path.name} beside it "
                "(class names, input size)"
            )
        meta, where, described_by = _read_sidecar(meta_path), str(meta_path), meta_path
    else:
        meta, where, described_by = embedded, f"{model_path} ({OUR_FILE} inside)", model_path
        if meta_path.is_file():
            _warn_if_sidecar_disagrees(meta_path, model_path, embedded)
    names = meta.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ModelFileError(f"{where}: no class_names list in the model metadata")
    try:
        size = (int(meta["input"]["height"]), int(meta["input"]["width"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ModelFileError(f"{where}: no input height/width in the model metadata") from error
    if min(size) < 1:
        raise ModelFileError(f"{where}: input size {size} is not positive")
    variant = str(meta.get("variant") or ("keras" if model_path.suffix == ".keras" else "tflite"))
    rule = _read_rule(model_path, meta, where, rule_bytes) if embedded is not None else None
    temperature = _read_temperature(meta, where)
    return ModelInfo(
        model_path, tuple(names), size, variant, model_digest(model_path), meta, described_by, rule, temperature
    )


def _read_rule(model_path: Path, meta: dict[str, Any], where: str, data: bytes | None) -> UncertaintyRule | None:
    """The uncertainty rule packed in the model file, when its description names one."""
    spec = meta.get("uncertainty")
    if not isinstance(spec, dict) or spec.get("file") != RULE_FILE:
        return None
    if data is None:
        raise ModelFileError(f"{where}: names an uncertainty rule but the model file holds no {RULE_FILE}")
    try:
        return UncertaintyRule.from_npz_bytes(data)
    except ValueError as error:
        raise ModelFileError(f"{model_path}: {error}") from error


def _read_temperature(meta: dict[str, Any], where: str) -> float | None:
    entry = meta.get("confidence")
    if not isinstance(entry, dict) or entry.get("temperature") is None:
        return None
    value = entry["temperature"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1e3:
        raise ModelFileError(f"{where}: confidence.temperature must be a number in (0, 1000]")
    return float(value)


def _read_sidecar(meta_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{meta_path}: not a JSON metadata file ({error})") from error
    if not isinstance(meta, dict):
        raise ModelFileError(f"{meta_path}: metadata must be a JSON object")
    return meta


def _warn_if_sidecar_disagrees(meta_path: Path, model_path: Path, embedded: dict[str, Any]) -> None:
    """Fields both record must match; fields only the sidecar has (e.g. a tensor summary) are not
    a disagreement, and are not used either."""
    try:
        sidecar = _read_sidecar(meta_path)
    except ModelFileError as error:
        warnings.warn(f"{error}; ignored, the metadata inside {model_path.name} is used", stacklevel=3)
        return
    differing = sorted(key for key in embedded.keys() & sidecar.keys() if embedded[key] != sidecar[key])
    if differing:
        warnings.warn(
            f"{meta_path}: disagrees with the metadata inside {model_path.name} on {', '.join(differing)}; "
            "the model file's is used",
            stacklevel=3,
        )


@dataclass(frozen=True)
class Judgement:
    """A classifier's answer for N images: probabilities, and where the model carries them, whether
    each image is uncertain (with its score, a rank in [0, 1]) and the calibrated top-1 confidence."""

    probabilities: np.ndarray  # (N, n_classes)
    uncertain: np.ndarray | None = None  # (N,) bool
    score: np.ndarray | None = None  # (N,)
    confidence: np.ndarray | None = None  # (N,)


class Classifier:
    """One loaded classifier (.tflite, .onnx or OpenVINO .xml, run by the backend its file asks
    for, see :mod:`steeldefect.runtime.backends`) answering queries for uint8 RGB images.

    Not thread-safe (one interpreter/session inside): one instance per thread or worker. ``accept``
    overrides the share of in-distribution images the model's uncertainty rule accepts.
    """

    def __init__(
        self,
        model_path: Path,
        threads: int | None = None,
        info: ModelInfo | None = None,
        *,
        accept: float | None = None,
    ) -> None:
        self.info = info or read_model_info(model_path)
        self.backend = open_backend(Path(model_path), threads)
        self.runtime = self.backend.runtime
        actual = self.backend.input_size
        described_by = self.info.described_by or self.info.path
        if actual != self.info.input_size:
            raise ModelFileError(
                f"{described_by}: input size {self.info.input_size[0]}x{self.info.input_size[1]} "
                f"does not match the model's {actual[0]}x{actual[1]}"
            )
        if "outputs" in self.info.metadata:  # named by the description (exports since issue #27)
            self.backend.name_outputs(self.info.metadata["outputs"], described_by)
        widths = self.backend.output_widths
        n_outputs = widths.get(PROBABILITIES, 0)
        if n_outputs != len(self.info.class_names):
            raise ModelFileError(
                f"{described_by}: {len(self.info.class_names)} class names for a model with {n_outputs} outputs"
            )
        self.rule = self.info.rule
        if self.rule is not None:
            if self.rule.uses_texture and widths.get(TEXTURE) != 2 * sum(self.rule.channels):
                raise ModelFileError(f"{described_by}: the uncertainty rule does not fit the model's outputs")
            if accept is not None:
                self.rule = self.rule.with_accept(accept)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, n_classes) probabilities for uint8 images (N, H, W, 3) of the model's input size."""
        return self.backend.run(images)[PROBABILITIES]

    def judge(self, images: np.ndarray | Iterable[np.ndarray]) -> Judgement:
        """Probabilities, uncertainty and calibrated confidence for uint8 images (N, H, W, 3), or an
        iterable of (H, W, 3) images: each is run as it comes (decoded just before, it is still in
        the CPU cache) and the uncertainty rule then scores them all at once, for half its cost per
        image (0.12 CPU ms at 64 images against 0.26 one by one, on the deploy Lite0)."""
        outputs = self.backend.run(images)
        probabilities = outputs[PROBABILITIES]
        uncertain = score = confidence = None
        if self.rule is not None:
            score = self.rule.scores(probabilities, outputs[TEXTURE] if self.rule.uses_texture else None)
            uncertain = score > self.rule.threshold
        if self.info.temperature is not None:
            confidence = apply_temperature(probabilities, self.info.temperature).max(axis=1)
        return Judgement(probabilities, uncertain, score, confidence)


def top_k(probabilities: np.ndarray, class_names: tuple[str, ...] | list[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` most likely classes with their probabilities, most likely first (ties: lower index)."""
    order = np.argsort(-probabilities, kind="stable")[: max(1, min(k, len(class_names)))]
    return [(class_names[i], float(probabilities[i])) for i in order]
