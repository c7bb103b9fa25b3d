"""Heatmaps of where a classifier looked: Grad-CAM and its variants on a run's Keras model.

A `.tflite` file has no gradients, so heatmaps need the run's `fold<k>.keras` (raw RGB 0..255 in,
probabilities out). Gradients are taken of the class *logit*: the final softmax is bypassed while
the gradients are computed, since a saturated probability (0.999...) has gradients near zero.

Methods (``method=``):
- ``gradcam``: ReLU(sum_k mean(dS/dA_k) A_k) (Selvaraju et al. 2017);
- ``gradcam++``: pixel-weighted gradients (Chattopadhay et al. 2018);
- ``layercam``: ReLU(sum_k ReLU(dS/dA_k) * A_k) per position (Jiang et al. 2021), which stays
  meaningful on earlier, higher-resolution layers.
Several ``layers`` are fused by averaging their maps, each upsampled and scaled to [0, 1].
- ``attention``: for a model with an attention head (``train --head attention --boxes DIR``), its
  own attention weights over the feature-map cells. The head's answer is the attention-weighted
  sum of the cells' class logits, so the map is what the answer was made of, not an estimate from
  gradients; it is the default for such models (:func:`default_method`), and the only method here that
  reaches the pointing game's targets (docs/results.md, "Heatmaps (pointing game)"). It is shown
  as attention *density* (:data:`ATTENTION_SMOOTHING`, :func:`smooth`): how much of the weight lies
  near each pixel, none outside the image.
:func:`occlusion` needs no gradients (any runtime's probabilities). The default is plain Grad-CAM
on the last 7x7 map: against the NEU-DET defect boxes (`bench/pointing_game.py`; docs/results.md)
occlusion is clearly worse, and the best SmoothGrad variant gains 8 images of 187 at eight times
the cost, picked among 55 variants on those same images.

For files (`predict --explain`, the report): :func:`steeldefect.deploy.explain_files.explain_paths`
and :func:`steeldefect.deploy.explain_files.write_gallery`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("gradcam", "gradcam++", "layercam")
ATTENTION = "attention"
# See the module docstring and bench/pointing_game.py for why the plain method is the default.
DEFAULT_LAYERS = ("head_relu",)
DEFAULT_METHOD = "gradcam"
# Gaussian sigma, in feature-map cells, of the attention density (attention_maps). Chosen by
# bench/pointing_game_models.py on out-of-fold validation images, never test images: the value with
# the best pointing game among those whose maps still pass the head-randomisation sanity check
# (median Spearman < 0.5 on every fold's validation images). docs/results.md, "Heatmaps (pointing game)".
ATTENTION_SMOOTHING = 0.25


def _final_dense(model: Any) -> Any:
    layer = model.layers[-1]
    while hasattr(layer, "layers"):  # a nested head model
        layer = layer.layers[-1]
    return layer


def attention_head(model: Any) -> Any | None:
    """The nested head of a joined model when it is an attention head (has a layer ``attention``)."""
    head = model.layers[-1] if model.layers else None
    if head is not None and hasattr(head, "layers") and any(layer.name == ATTENTION for layer in head.layers):
        return head
    return None


def default_method(model: Any) -> str:
    """``attention`` for a model with an attention head, else :data:`DEFAULT_METHOD`."""
    return ATTENTION if attention_head(model) is not None else DEFAULT_METHOD


def method_for_file(keras_path: str | Path) -> str:
    """:func:`default_method` of a saved model, from its sidecar's ``head`` (without loading it)."""
    from steeldefect.core.files import read_json
    from steeldefect.runtime.modelfile import sidecar_path

    sidecar = sidecar_path(Path(keras_path))
    head = read_json(sidecar).get("head") if sidecar.is_file() else None
    return ATTENTION if head == "attention" else DEFAULT_METHOD


def attention_maps(
    model: Any, images: np.ndarray, *, smoothing: float = ATTENTION_SMOOTHING, batch_size: int = 16
) -> np.ndarray:
    """(N, H, W) in [0, 1]: an attention head's weights over the feature-map cells, upsampled
    (bilinear) to the input size, then as a density (:func:`smooth`, Gaussian sigma ``smoothing``
    cells; 0: the upsampled weights themselves). The same map whatever the class asked about: it says
    where the model looked, and the answer is a weighted sum over exactly those cells.

    Why a density: bilinear upsampling holds a border cell's weight flat out to the image edge and
    a single cell's weight decides the maximum; the density counts the weight of the neighbouring
    cells too and none outside the image, so its maximum sits where the attention is concentrated
    (out-of-fold validation of the NEU attention run: 0.922 -> 0.944 of maxima on a defect box)."""
    import keras
    import tensorflow as tf

    rows, cols = attention_grid(model)  # refuses a model without an attention head
    head = attention_head(model)
    assert head is not None  # attention_grid found it
    # A joined model is the backbone's layers followed by the head, one nested model as the last layer.
    features = keras.Model(model.inputs, model.layers[-2].output)
    weights = keras.Model(head.inputs, head.get_layer(ATTENTION).output)
    images = np.asarray(images, dtype=np.float32)
    height, width = images.shape[1:3]
    out = []
    for start in range(0, len(images), batch_size):
        cells = np.asarray(weights(features(images[start : start + batch_size], training=False), training=False))
        grid = cells.reshape(-1, rows, cols, 1)
        upsampled = np.asarray(tf.image.resize(grid, (height, width), method="bilinear"))[..., 0]
        # Scaled to [0, 1] before the blur, as every map here: the weights' common floor (a softmax
        # never reaches 0) would otherwise blur into the same border-dark vignette for any model.
        out.append(density(_normalise(upsampled), smoothing, (rows, cols)))
    if not out:
        return np.zeros((0, height, width), np.float32)
    return np.concatenate(out).astype(np.float32)


def attention_grid(model: Any) -> tuple[int, int]:
    """(rows, columns) of the feature-map cells an attention head weighs."""
    head = attention_head(model)
    if head is None:
        raise ValueError(f"model {model.name} has no attention head (train --head attention)")
    rows, cols = (int(v) for v in head.inputs[0].shape[1:3])
    return rows, cols


def density(maps: np.ndarray, smoothing: float, grid: tuple[int, int] | None) -> np.ndarray:
    """Upsampled attention maps (N, H, W) in [0, 1] of a ``grid`` of cells as a density: :func:`smooth`
    with sigma ``smoothing`` cells; ``smoothing`` 0 returns ``maps`` as they are. So
    ``density(heatmaps(model, x, smoothing=0), s, attention_grid(model))`` equals
    ``heatmaps(model, x, smoothing=s)`` without another pass through the model."""
    if smoothing <= 0:
        return maps
    if grid is None:
        raise ValueError("attention density needs the grid of cells (attention_grid)")
    height, width = maps.shape[1:3]
    return smooth(maps, (smoothing * height / grid[0], smoothing * width / grid[1]))


def smooth(maps: np.ndarray, sigma: float | tuple[float, float]) -> np.ndarray:
    """(N, H, W) maps blurred by a Gaussian of ``sigma`` pixels with nothing outside the image (zero
    padding: a map's mass at the border is not mirrored back in), each scaled to [0, 1]."""
    from scipy.ndimage import gaussian_filter

    maps = np.asarray(maps, dtype=np.float32)
    blurred = np.stack([gaussian_filter(m, sigma, mode="constant", cval=0.0) for m in maps]) if len(maps) else maps
    return _normalise(blurred)


def heatmaps(
    model: Any,
    images: np.ndarray,
    class_index: int | Sequence[int] | None = None,
    layer: str | Sequence[str] | None = None,
    *,
    method: str | None = None,
    smoothing: float = ATTENTION_SMOOTHING,
    batch_size: int = 16,
) -> np.ndarray:
    """Heatmaps (N, H, W) in [0, 1] by ``method`` (None: :func:`default_method` of ``model``):
    :func:`attention_maps` (with ``smoothing``) or :func:`grad_cam`."""
    method = method or default_method(model)
    if method == ATTENTION:
        return attention_maps(model, images, smoothing=smoothing, batch_size=batch_size)
    return grad_cam(model, images, class_index, layer, method=method, batch_size=batch_size)


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


def occlusion(
    probabilities: Any,
    images: np.ndarray,
    class_index: int | Sequence[int] | None = None,
    *,
    patch: int = 48,
    stride: int = 16,
    fill: str = "blur",
    flip: bool = False,
    progress: bool = False,
) -> np.ndarray:
    """Occlusion sensitivity (Zeiler and Fergus 2014) maps (N, H, W) in [0, 1] for uint8 images
    (N, H, W, 3): a ``patch`` x ``patch`` square slides with ``stride``, replaced by the image's
    blurred copy (``fill="blur"``: texture removed, brightness kept) or its mean colour
    (``"mean"``); each pixel's value is the mean drop of log p(class) over the windows covering it.
    ``probabilities`` maps uint8 images (M, H, W, 3) to (M, C) probabilities, so any runtime
    answers it (a LiteRT fp32 model is the fast one here); no gradients are needed. ``flip``
    averages the map with that of the mirrored image (test-time augmentation)."""
    images = np.asarray(images, dtype=np.uint8)
    if fill not in ("blur", "mean"):
        raise ValueError(f"fill must be 'blur' or 'mean', got {fill!r}")
    n, height, width = images.shape[:3]
    starts_y = _window_starts(height, patch, stride)
    starts_x = _window_starts(width, patch, stride)
    classes = None if class_index is None else np.broadcast_to(np.asarray(class_index), (n,))
    maps = np.zeros((n, height, width), np.float32)
    from tqdm.auto import tqdm

    for i, image in enumerate(tqdm(images, desc=f"occlusion ({fill})", unit="img", disable=not progress)):
        views = [image, image[:, ::-1]] if flip else [image]
        for v, view in enumerate(views):
            base = np.asarray(probabilities(view[None]))[0]
            c = int(np.argmax(base)) if classes is None else int(classes[i])
            filler = (
                _blurred(view, patch)
                if fill == "blur"
                else np.broadcast_to(view.reshape(-1, 3).mean(axis=0).astype(np.uint8), view.shape)
            )
            occluded = np.repeat(view[None], len(starts_y) * len(starts_x), axis=0)
            windows = [(y, x) for y in starts_y for x in starts_x]
            for k, (y, x) in enumerate(windows):
                occluded[k, y : y + patch, x : x + patch] = filler[y : y + patch, x : x + patch]
            scores = np.asarray(probabilities(occluded))[:, c]
            drop = np.log(max(float(base[c]), 1e-12)) - np.log(np.maximum(scores, 1e-12))
            total = np.zeros((height, width), np.float64)
            count = np.zeros((height, width), np.float64)
            for (y, x), d in zip(windows, drop):
                total[y : y + patch, x : x + patch] += d
                count[y : y + patch, x : x + patch] += 1
            heat = np.maximum(total / np.maximum(count, 1), 0)
            maps[i] += heat[:, ::-1] if v == 1 else heat
    return _normalise(maps).astype(np.float32)


def _window_starts(size: int, patch: int, stride: int) -> list[int]:
    starts = list(range(0, max(size - patch, 0) + 1, stride))
    if starts[-1] != max(size - patch, 0):  # the last window reaches the edge
        starts.append(max(size - patch, 0))
    return starts


def _blurred(image: np.ndarray, patch: int) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(image.astype(np.float32), sigma=(patch / 4, patch / 4, 0)).round().astype(np.uint8)


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
            rng.normal(0, 1 / np.sqrt(np.prod(w.shape[:-1])), w.shape).astype(w.dtype) if w.ndim > 1 else w * 0
            for w in head.get_weights()
        ]
    )
    return copy


def peak(heatmap: np.ndarray) -> tuple[int, int]:
    """(row, column) of a heatmap's maximum. When several pixels share it, the one nearest their
    centre: bilinear upsampling holds a border cell's value flat out to the image edge, and the
    first tied pixel (``argmax``) would put the mark on the edge, up to half a cell from the cell."""
    heatmap = np.asarray(heatmap)
    flat = heatmap.ravel()
    tied = np.flatnonzero(flat == flat.max())
    rows, cols = np.divmod(tied, heatmap.shape[1])
    nearest = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
    return int(rows[nearest]), int(cols[nearest])
