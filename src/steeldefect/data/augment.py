"""Augmentation for steel-surface images: a shared service under training and fine-tuning.

A steel strip has no "up": a defect seen flipped, transposed (so, with the flips, any of the eight
90-degree rotations and mirror images), slightly shifted, or under a little more or less light is
the same defect. Built from Keras preprocessing layers (maintained, run in-graph for fine-tuning and
eagerly for cached augmented features) plus one transpose, which Keras has no layer for: with both
flips it completes the 8 symmetries of the square, where ``RandomRotation`` would interpolate and
fill corners. Works on raw pixels 0..255 (float), the models' input.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SHIFT = 0.08  # fraction of height/width; NEU defects are not centred, small shifts keep them in frame
BRIGHTNESS = 0.15  # fraction of the 0..255 range
CONTRAST = 0.2


def _random_transpose_layer() -> Any:
    import keras

    class RandomTranspose(keras.layers.Layer):
        """Swap height and width with probability 1/2 (square images only)."""

        def __init__(self, seed: int | None = None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.seed = seed
            self.generator = keras.random.SeedGenerator(seed)

        def call(self, images: Any, training: bool = True) -> Any:
            if not training:
                return images
            ops = keras.ops
            batch = ops.shape(images)[0]
            flip = keras.random.uniform((batch, 1, 1, 1), seed=self.generator) < 0.5
            return ops.where(flip, ops.transpose(images, (0, 2, 1, 3)), images)

        def compute_output_shape(self, input_shape: Any) -> Any:
            return input_shape

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "seed": self.seed}

    return RandomTranspose


def augmentation_model(seed: int, image_size: tuple[int, int] = (224, 224)) -> Any:
    """A Keras model: float images (N, H, W, 3) in 0..255 -> randomly flipped, transposed, shifted,
    brightened and contrasted images of the same size and range. Active only with ``training=True``
    (as Keras preprocessing layers are), so it can sit inside a fine-tuned model's graph."""
    import keras

    height, width = image_size
    layers = [
        keras.layers.RandomFlip("horizontal_and_vertical", seed=seed, name="random_flip"),
    ]
    if height == width:
        layers.append(_random_transpose_layer()(seed=seed + 1, name="random_transpose"))
    layers += [
        keras.layers.RandomTranslation(SHIFT, SHIFT, fill_mode="reflect", seed=seed + 2, name="random_shift"),
        keras.layers.RandomBrightness(BRIGHTNESS, value_range=(0, 255), seed=seed + 3, name="random_brightness"),
        keras.layers.RandomContrast(CONTRAST, value_range=(0, 255), seed=seed + 4, name="random_contrast"),
    ]
    inputs = keras.Input((height, width, 3), name="image")
    x = inputs
    for layer in layers:
        x = layer(x, training=True)
    return keras.Model(inputs, x, name="augmentation")


def augmented_views(images: np.ndarray, k: int, seed: int, *, batch_size: int = 64) -> np.ndarray:
    """``k`` augmented copies of each uint8 image (N, H, W, 3): (N * k, H, W, 3) uint8, ordered view-major
    (all images' first view, then all second views, ...), so row ``v * N + i`` is a view of image ``i``.
    Deterministic for a given ``seed``, images and ``k``."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    model = augmentation_model(seed, (int(images.shape[1]), int(images.shape[2])))
    out = np.empty((len(images) * k, *images.shape[1:]), dtype=np.uint8)
    for view in range(k):
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].astype(np.float32)
            augmented = np.asarray(model(batch, training=True))
            rows = slice(view * len(images) + start, view * len(images) + start + len(batch))
            out[rows] = np.clip(np.rint(augmented), 0, 255).astype(np.uint8)
    return out


def view_sources(n_images: int, k: int) -> np.ndarray:
    """For each row of :func:`augmented_views`' output, the index of the image it was made from."""
    return np.tile(np.arange(n_images), k)


def dihedral_view(images: np.ndarray, view: int) -> np.ndarray:
    """View ``view`` (0..7) of the 8 symmetries of the square: 0 is the image itself, 1-3 its 90, 180
    and 270-degree rotations, 4-7 the same of its left-right mirror image. Exact (no interpolation,
    no fill), for square images (N, S, S, C)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"dihedral views need square images (N, S, S, C), got {images.shape}")
    if not 0 <= view <= 7:
        raise ValueError(f"dihedral view must be 0..7, got {view}")
    if view >= 4:
        images = images[:, :, ::-1]
    return np.ascontiguousarray(np.rot90(images, view % 4, axes=(1, 2)))


def dihedral_average_model(model: Any) -> Any:
    """``model`` answering for the 8 flips/90-degree rotations of each input image at once: every
    output is the mean over the views (test-time augmentation, 8x the compute). Built from transpose
    and reverse ops, which LiteRT runs in float and in full-integer int8; the batch stays dynamic.
    View ``v`` is :func:`dihedral_view` ``v``."""
    import keras

    ops = keras.ops

    def views(images: Any) -> Any:
        mirrored = ops.flip(images, axis=2)
        stacked = []
        for start in (images, mirrored):
            rotated = start
            for _ in range(4):
                stacked.append(rotated)
                # np.rot90(x, 1, axes=(1, 2)): mirror the width axis, then swap height and width.
                rotated = ops.transpose(ops.flip(rotated, axis=2), (0, 2, 1, 3))
        return ops.concatenate(stacked, axis=0)

    # ``inputs[0]``: a model rebuilt around a loaded one (the deploy model with its texture output)
    # reports ``input`` as a one-element list.
    inputs = keras.Input(tuple(model.inputs[0].shape[1:]), name="pixels")
    batched = keras.layers.Lambda(views, name="dihedral_views")(inputs)
    outputs = model(batched)
    single = not isinstance(outputs, (list, tuple))
    averaged = [
        keras.layers.Lambda(
            lambda t: ops.mean(ops.reshape(t, (8, -1, *t.shape[1:])), axis=0), name=f"dihedral_mean_{index}"
        )(output)
        for index, output in enumerate([outputs] if single else outputs)
    ]
    return keras.Model(inputs, averaged[0] if single else averaged, name=f"{model.name}_dihedral")
