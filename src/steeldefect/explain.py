"""Heatmaps of where a classifier looked: Grad-CAM and its variants on a run's Keras model.

A `.tflite` file has no gradients, so heatmaps need the run's `fold<k>.keras` (raw RGB 0..255 in,
probabilities out). Gradients are taken of the class *logit*: the final softmax is bypassed while
the gradients are computed, since a saturated probability (0.999...) has gradients near zero.

Methods (``method=``):
- ``gradcam``: ReLU(sum_k mean(dS/dA_k) A_k) (Selvaraju et al. 2017);
- ``gradcam++``: pixel-weighted gradients (Chattopadhay et al. 2018);
- ``layercam``: ReLU(sum_k ReLU(dS/dA_k) * A_k) per position (Jiang et al. 2021), which stays
  meaningful on earlier, higher-resolution layers.
Several ``layers`` are fused by averaging their maps, each upsampled and scaled to [0, 1]. The
default is plain Grad-CAM on the last 7x7 map: against the NEU-DET defect boxes no variant measured
by `bench/pointing_game.py` beat it by more than one image in 187 (README, "Trust").
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("gradcam", "gradcam++", "layercam")
# See the module docstring and bench/pointing_game.py for why the plain method is the default.
DEFAULT_LAYERS = ("head_relu",)
DEFAULT_METHOD = "gradcam"


def _final_dense(model: Any) -> Any:
    layer = model.layers[-1]
    while hasattr(layer, "layers"):  # a nested head model
        layer = layer.layers[-1]
    return layer


def _normalise(maps: np.ndarray) -> np.ndarray:
    low = maps.min(axis=(1, 2), keepdims=True)
    high = maps.max(axis=(1, 2), keepdims=True)
    return np.where(high > low, (maps - low) / np.maximum(high - low, 1e-12), 0.0)


def grad_cam(
    model: Any,
    images: np.ndarray,
    class_index: int | Sequence[int] | None = None,
    layer: str | Sequence[str] | None = None,
    *,
    method: str = DEFAULT_METHOD,
    batch_size: int = 16,
) -> np.ndarray:
    """Heatmaps (N, H, W) in [0, 1] at the model's input resolution for images (N, H, W, 3) of raw
    pixels; ``class_index`` None explains each image's predicted class. ``layer`` names one layer or
    several (fused by averaging); default :data:`DEFAULT_LAYERS`, or the last 4-D layer when the
    model has none of them."""
    names = [layer] if isinstance(layer, str) else list(layer or DEFAULT_LAYERS)
    if layer is None and not set(names) <= {item.name for item in model.layers}:
        names = [next(item.name for item in reversed(model.layers) if len(item.output.shape) == 4)]
    maps = layer_maps(model, images, names, (method,), class_index=class_index, batch_size=batch_size)
    return _normalise(np.mean([maps[name, method] for name in names], axis=0)).astype(np.float32)


def layer_maps(
    model: Any,
    images: np.ndarray,
    layers: Sequence[str],
    methods: Sequence[str] = (DEFAULT_METHOD,),
    *,
    class_index: int | Sequence[int] | None = None,
    batch_size: int = 16,
) -> dict[tuple[str, str], np.ndarray]:
    """Every (layer, method) map, each upsampled to the input size and scaled to [0, 1], from one
    forward and backward pass per batch (what the pointing-game bench compares)."""
    import keras
    import tensorflow as tf

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"method must be one of {METHODS}, got {unknown[0]!r}")
    available = {item.name for item in model.layers}
    missing = [name for name in layers if name not in available]
    if missing:
        raise ValueError(f"model {model.name} has no layer {', '.join(missing)}")
    probe = keras.Model(model.inputs, [model.get_layer(name).output for name in layers] + [model.outputs[0]])
    final = _final_dense(model)
    images = np.asarray(images, dtype=np.float32)
    height, width = images.shape[1:3]
    classes = None if class_index is None else np.broadcast_to(np.asarray(class_index), (len(images),))
    out: dict[tuple[str, str], list[np.ndarray]] = {(name, m): [] for name in layers for m in methods}
    saved_activation = final.activation
    final.activation = keras.activations.linear  # logits instead of probabilities, restored below
    try:
        for start in range(0, len(images), batch_size):
            batch = tf.constant(images[start : start + batch_size])
            with tf.GradientTape() as tape:
                *activations, logits = probe(batch, training=False)
                if classes is None:
                    picked = tf.argmax(logits, axis=1)
                else:
                    picked = tf.constant(classes[start : start + batch_size], dtype=tf.int64)
                score = tf.gather(logits, picked, axis=1, batch_dims=1)
            gradients = tape.gradient(score, activations)
            for name, activation, gradient in zip(layers, activations, gradients):
                for m in methods:
                    cam = _combine(np.asarray(activation), np.asarray(gradient), m)
                    resized = tf.image.resize(cam[..., None], (height, width), method="bilinear")[..., 0]
                    out[name, m].append(_normalise(np.asarray(resized)).astype(np.float32))
    finally:
        final.activation = saved_activation
    return {key: np.concatenate(parts) for key, parts in out.items()}


def _combine(a: np.ndarray, g: np.ndarray, method: str) -> np.ndarray:
    """One layer's map (N, h, w) from activations and gradients (N, h, w, C)."""
    if method == "gradcam":
        weights = g.mean(axis=(1, 2), keepdims=True)
        return np.maximum((weights * a).sum(axis=3), 0)
    if method == "gradcam++":
        g2, g3 = g**2, g**3
        denominator = 2 * g2 + a.sum(axis=(1, 2), keepdims=True) * g3
        alpha = g2 / np.where(np.abs(denominator) > 1e-12, denominator, 1e-12)
        weights = (alpha * np.maximum(g, 0)).sum(axis=(1, 2), keepdims=True)
        return np.maximum((weights * a).sum(axis=3), 0)
    return np.maximum((np.maximum(g, 0) * a).sum(axis=3), 0)


def randomize_head(model: Any, seed: int = 0) -> Any:
    """A copy of ``model`` whose classifier head (the layers after the backbone) has fresh random
    weights: the model-parameter randomisation sanity check (Adebayo et al. 2018)."""
    import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    head = copy.layers[-1]
    rng = np.random.default_rng(seed)
    head.set_weights(
        [
            rng.normal(0, 1 / np.sqrt(w.shape[0]), w.shape).astype(w.dtype) if w.ndim > 1 else w * 0
            for w in head.get_weights()
        ]
    )
    return copy


def save_overlay(image: np.ndarray, heatmap: np.ndarray, title: str, path: str | Path, *, alpha: float = 0.45) -> Path:
    """PNG: the image with the heatmap (jet colours, ``alpha`` opacity) over it and ``title`` above."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from steeldefect.files import atomic_write_bytes

    image = np.asarray(image)
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.shape != image.shape[:2]:
        import tensorflow as tf

        heatmap = np.asarray(tf.image.resize(heatmap[..., None], image.shape[:2], method="bilinear")[..., 0])
    fig = Figure(figsize=(3.4, 3.7))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.86))
    ax.imshow(image)
    ax.imshow(heatmap, cmap="jet", alpha=alpha, vmin=0, vmax=1)
    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    ax.plot(peak[1], peak[0], marker="+", color="white", markersize=14, markeredgewidth=2)
    ax.set_axis_off()
    fig.suptitle(title, fontsize=9, y=0.97)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return atomic_write_bytes(path, buffer.getvalue())
