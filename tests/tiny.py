"""A tiny registered backbone and generated datasets, so pipeline tests run in seconds.

The tiny backbone goes through the same code path as the real ones: an on-disk weight file in
Keras' cache, checked by size and md5 before it is loaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import keras
import numpy as np
from PIL import Image

from steeldefect.models import backbones
from steeldefect.models import weights as weight_files

TINY = "tiny"
# The cache identity the augmented-feature tests give `augfeatures.augmented_features` (plus cache_dir).
AUGMENT_KEY = dict(
    seed=3,
    pooled=True,
    dataset_fingerprint="f" * 64,
    backbone="tiny",
    weights_id="w",
    preprocessing="model",
    progress=False,
)
# Training options that make a tiny-backbone run take seconds.
FAST_TRAIN = dict(learning_rates=[0.01], epochs=3, batch_size=8, n_folds=2, image_size=32, progress=False)
CLASSES = ("dots", "stripes", "flat")


def build_tiny(weights_path, preprocessing, input_shape):
    inputs = keras.Input(shape=input_shape, name="pixels")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs) if preprocessing else inputs
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="tiny_conv1")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="tiny_conv2")(x)
    model = keras.Model(inputs, x, name="tiny")
    if weights_path is not None:
        model.load_weights(weights_path)
    return model


def register_tiny_backbone(monkeypatch, keras_home: Path, *, in_all: bool = True) -> backbones.BackboneSpec:
    """Write the tiny backbone's 'pretrained' weights into keras_home and register it."""
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    keras.utils.set_random_seed(0)
    path = Path(keras_home) / "models" / "tiny.weights.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    build_tiny(None, True, (32, 32, 3)).save_weights(path)
    spec = backbones.BackboneSpec(
        name=TINY,
        display_name="Tiny",
        feature_shape=(8, 8, 16),
        weights=weight_files.WeightFile(
            path.name, "tiny/" + path.name, path.stat().st_size, hashlib.md5(path.read_bytes()).hexdigest()
        ),
        _build=build_tiny,
        multilayer=("tiny_conv1", "tiny_conv2"),
    )
    monkeypatch.setitem(backbones.REGISTRY, TINY, spec)
    if in_all:
        monkeypatch.setattr(backbones, "ALL_BACKBONES", (*backbones.REFERENCE_BACKBONES, TINY))
    return spec


def make_pattern_image(cls: int, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """Grey images whose class is visible to a random conv net: dots, stripes or flat noise."""
    image = rng.normal(128, 12, (size, size)).clip(0, 255)
    if cls == 0:
        for _ in range(12):
            y, x = rng.integers(2, size - 2, 2)
            image[y - 2 : y + 2, x - 2 : x + 2] = 250
    elif cls == 1:
        image[:, ::6] = 20
        image[:, 1::6] = 20
    return image.astype(np.uint8)


def make_dataset(root: Path, per_class: int = 12, seed: int = 0, size: int = 40) -> Path:
    rng = np.random.default_rng(seed)
    for cls, name in enumerate(CLASSES):
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(make_pattern_image(cls, rng, size)).save(folder / f"{name}_{i}.png")
    return Path(root)


def write_hdf5(path: Path, seed: int = 0) -> Path:
    """A small but real HDF5 weights file (two arrays), like a Keras .h5 in structure."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as h5:
        h5.attrs["layer_names"] = [b"conv1"]
        h5.create_dataset("conv1/kernel", data=rng.normal(size=(3, 3, 3, 8)).astype("float32"))
        h5.create_dataset("conv1/bias", data=np.zeros(8, "float32"))
    return path


def curve_args(data, out, *extra) -> list[str]:
    """`learning-curve` CLI arguments that make a tiny-backbone curve take seconds."""
    return [
        "--quiet",
        "learning-curve",
        "--data",
        str(data),
        "--backbone",
        TINY,
        "--image-size",
        "32",
        "--folds",
        "2",
        "--steps",
        "20",
        "--batch-size",
        "8",
        "--out",
        str(out),
        *extra,
    ]
