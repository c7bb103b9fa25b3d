"""A tiny exported classifier (.tflite + sidecar) for batch-scoring tests: converts in seconds, runs
through the same runtime and model-file code as a real export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CLASSES = ("crazing", "inclusion", "patches", "scratches")


def export_tiny_classifier(
    folder: Path, variant: str = "fp32", size: int = 32, seed: int = 1, extra_metadata: dict | None = None
) -> Path:
    """``folder/tiny.<variant>.tflite`` with its sidecar: a small conv net (random weights, so its
    probabilities vary from image to image), raw uint8 pixels in, probabilities out."""
    import keras

    from steeldefect import training
    from steeldefect.export import export_model

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    backbone = keras.Model(inputs, x)
    head = training.build_head(backbone.output_shape[1:], len(CLASSES))
    model = training.join_model(backbone, head, "tiny")
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
