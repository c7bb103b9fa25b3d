"""A tiny exported classifier (.tflite + sidecar) for batch-scoring tests: converts in seconds, runs
through the same runtime and model-file code as a real export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CLASSES = ("crazing", "inclusion", "patches", "scratches")


def _tiny_model(size: int, seed: int):
    """A small conv net (random weights, so its probabilities vary from image to image), raw uint8
    pixels in, probabilities out."""
    import keras

    from steeldefect.models import training

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    backbone = keras.Model(inputs, x)
    head = training.build_head(backbone.output_shape[1:], len(CLASSES))
    return training.join_model(backbone, head, "tiny")


def export_tiny_classifier(
    folder: Path, variant: str = "fp32", size: int = 32, seed: int = 1, extra_metadata: dict | None = None
) -> Path:
    """``folder/tiny.<variant>.tflite`` with its sidecar: a small conv net (random weights, so its
    probabilities vary from image to image), raw uint8 pixels in, probabilities out."""

    from steeldefect.deploy.export import export_model

    model = _tiny_model(size, seed)
    calibration = np.random.default_rng(0).integers(0, 256, (16, size, size, 3), dtype=np.uint8)
    path = export_model(model, variant, Path(folder) / f"tiny.{variant}.tflite", calibration)
    meta = {
        "class_names": list(CLASSES),
        "input": {"height": size, "width": size, "channels": 3},
        "variant": variant,
        **(extra_metadata or {}),
    }
    Path(str(path) + ".json").write_text(json.dumps(meta))
    return path


def export_tiny_with_rule(
    folder: Path, variant: str = "fp32", size: int = 32, seed: int = 1, accept: float = 0.5, temperature=None
) -> Path:
    """``folder/tiny_rule.<variant>.tflite``: the tiny classifier with its description and an
    uncertainty rule embedded the way `export` embeds the deploy model's (softmax score only: the tiny
    net has no texture layers), fitted on 40 generated images in 4 folds with the model's own
    probabilities standing in for the out-of-fold ones; ``accept`` = 0.5 flags about half of
    similar images, so tests see both answers."""

    from steeldefect.deploy.export import RuleData, export_model
    from steeldefect.runtime.litert import make_interpreter, predict_tflite

    model = _tiny_model(size, seed)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (40, size, size, 3), dtype=np.uint8)
    labels = np.arange(40) % len(CLASSES)
    order = rng.permutation(40)
    folds = [(np.setdiff1d(order, part), part) for part in np.array_split(order, 4)]
    plain = export_model(model, "fp32", Path(folder) / "plain.fp32.tflite")
    probabilities = predict_tflite(make_interpreter(plain), images)
    meta = {
        "class_names": list(CLASSES),
        "input": {"height": size, "width": size, "channels": 3},
        "variant": variant,
    }
    if temperature is not None:
        meta["confidence"] = {"temperature": temperature}
    path = export_model(
        model,
        variant,
        Path(folder) / f"tiny_rule.{variant}.tflite",
        images[:16],
        metadata=meta,
        rule_data=RuleData(images, labels, folds, probabilities, accept=accept),
    )
    plain.unlink()
    return path
