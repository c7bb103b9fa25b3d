"""A small exported classifier for the service tests: raw pixels in, 6 NEU class probabilities out.

Random weights, but a real LiteRT model with a real sidecar, so the service, `predict` and the page
all go through the same loading and decoding code they use for a trained model.
"""

from __future__ import annotations

from pathlib import Path

NEU_CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]


def export_small_classifier(
    folder: Path, variant: str = "fp32", size: int = 32, extra_meta: dict | None = None
) -> Path:
    import keras
    import numpy as np

    from steeldefect.core.files import write_json
    from steeldefect.deploy.export import export_model
    from steeldefect.models import training
    from steeldefect.runtime.modelfile import sidecar_path

    keras.utils.set_random_seed(3)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    backbone = keras.Model(inputs, x)
    head = training.build_head(backbone.output_shape[1:], len(NEU_CLASSES), kind="pooled")
    model = training.join_model(backbone, head, "small")
    calibration = np.random.default_rng(0).integers(0, 256, (24, size, size, 3), dtype=np.uint8)
    path = export_model(model, variant, Path(folder) / f"small.{variant}.tflite", calibration)
    meta = {
        "class_names": NEU_CLASSES,
        "input": {"height": size, "width": size, "channels": 3},
        "variant": variant,
        "backbone": "small-test",
    }
    write_json(sidecar_path(path), {**meta, **(extra_meta or {})})
    return path
