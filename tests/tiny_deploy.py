"""A tiny deploy model: probabilities and texture statistics out, an uncertainty rule inside, exported
the way `export` exports RUN/deploy/model.*.tflite. Converts in seconds.

Also a script (``python tests/tiny_deploy.py FOLDER [--ridge R] VARIANT...``) that uses only API the
code before issue #27 had too (``--ridge`` aside), so a test can run it against that code
(``PYTHONPATH`` = an old ``src``) and compare the old files with today's.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CLASSES = ("crazing", "inclusion", "patches", "scratches")
SIZE = 32
TEXTURE_LAYERS = ("tiny_conv1", "tiny_conv2")
CHANNELS = (8, 16)
VARIANTS = ("fp32", "fp16", "int8", "int8-mixed")


def tiny_classifier(seed: int = 1):
    """A small conv net with random weights (probabilities vary from image to image), raw uint8
    pixels in, probabilities out; its two conv layers carry the texture statistics."""
    import keras

    from steeldefect.models import training

    keras.backend.clear_session()  # tensor names (and bytes) independent of what ran before
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="tiny_conv1")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="tiny_conv2")(x)
    backbone = keras.Model(inputs, x)
    head = training.build_head(backbone.output_shape[1:], len(CLASSES))
    return training.join_model(backbone, head, "tiny")


def with_texture(model):
    """As `export` builds the deploy model: Keras outputs [probabilities, texture statistics]."""
    import keras

    from steeldefect.runtime import uncertainty

    stats = uncertainty.texture_statistics_model(model, TEXTURE_LAYERS)
    return keras.Model(model.input, [model.output, stats.output], name=f"{model.name}_with_texture")


def rule_images(seed: int = 1) -> tuple[np.ndarray, np.ndarray, list]:
    """40 generated images, their labels and 4 folds: what the rule is fitted on."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (40, SIZE, SIZE, 3), dtype=np.uint8)
    labels = np.arange(40) % len(CLASSES)
    order = rng.permutation(40)
    return images, labels, [(np.setdiff1d(order, part), part) for part in np.array_split(order, 4)]


def export_tiny_deploy(
    folder: Path,
    variants: Sequence[str] = VARIANTS,
    seed: int = 1,
    accept: float = 0.5,
    ridge: float | None = None,
):
    """``folder/deploy.<variant>.tflite`` for each variant, with the description and rule embedded
    (the model's own fp32 probabilities stand in for the out-of-fold ones; ``accept`` = 0.5 flags
    about half of similar images, so both answers occur). ``ridge``: the texture score's, fixed
    (None lets the rule choose it, and is the only value code before the choice accepts).
    Returns {variant: path}."""
    from steeldefect.deploy.export import RuleData, export_model
    from steeldefect.runtime.litert import make_interpreter, predict_tflite

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_classifier(seed)
    images, labels, folds = rule_images(seed)
    plain = export_model(model, "fp32", folder / "plain.fp32.tflite")
    probabilities = predict_tflite(make_interpreter(plain), images)
    plain.unlink()
    deploy = with_texture(model)
    paths: dict[str, Path] = {}
    for variant in sorted(variants, key=lambda v: v != "int8"):  # int8-mixed reuses int8's conversion
        meta = {
            "class_names": list(CLASSES),
            "input": {"height": SIZE, "width": SIZE, "channels": 3},
            "variant": variant,
        }
        paths[variant] = export_model(
            deploy,
            variant,
            folder / f"deploy.{variant}.tflite",
            images[:16],
            int8_flatbuffer=paths["int8"].read_bytes() if variant == "int8-mixed" and "int8" in paths else None,
            metadata=meta,
            rule_data=RuleData(
                images, labels, folds, probabilities, accept=accept, **({} if ridge is None else {"shrinkage": ridge})
            ),
            channels=CHANNELS,
        )
    return paths


if __name__ == "__main__":
    arguments = sys.argv[2:]
    fixed_ridge = None
    if arguments[:1] == ["--ridge"]:
        fixed_ridge, arguments = float(arguments[1]), arguments[2:]
    export_tiny_deploy(Path(sys.argv[1]), arguments or VARIANTS, ridge=fixed_ridge)
