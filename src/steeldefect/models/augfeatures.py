"""Backbone features of augmented training images, extracted once and cached per view.

With a frozen backbone an augmented copy of an image is just more features: K views of every
training image become K extra training rows for the heads. Only the images passed in as
``sources`` (a run's training indices) are augmented, never validation or test images.

Each view is cached in its own file under a key holding everything that changes its numbers
(dataset fingerprint, backbone, weights, preprocessing, input size, the augmentation's settings,
the seed, the exact source images, pooled or whole maps) plus the view's number. View ``v`` is
drawn with its own seed, so K = 8 reuses the first four views a K = 4 run cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from steeldefect.core.files import save_npy, write_json
from steeldefect.data import augment
from steeldefect.models.features import EXTRACTION_ENGINE

log = logging.getLogger(__name__)

# Whole 7x7x1280 maps are 49x a pooled vector: above this many bytes of augmented float32 rows,
# training refuses instead of swapping the machine (1,530 NEU training images x 7x7x1280 floats is
# 384 MB per view, so the Flatten head takes --augment <= 3 on NEU).
FLATTEN_AUGMENT_BUDGET_BYTES = 1_500_000_000


@dataclass(frozen=True)
class AugmentedFeatures:
    """``features[r]`` is the backbone output of a view of image ``sources[r]`` (a dataset index)."""

    features: np.ndarray
    sources: np.ndarray
    extracted_views: int  # how many views had to be computed (0 = all from the cache)


def augmentation_settings(views: str = "random") -> dict[str, Any]:
    """What the augmentation does, as recorded in the cache key."""
    if views == "dihedral":
        return {"layers": ["dihedral"]}
    if views != "random":
        raise ValueError(f"views must be 'random' or 'dihedral', got {views!r}")
    return {
        "layers": ["flip_hv", "transpose", "shift", "brightness", "contrast"],
        "shift": augment.SHIFT,
        "brightness": augment.BRIGHTNESS,
        "contrast": augment.CONTRAST,
    }


def augmented_cache_key(
    dataset_fingerprint: str,
    backbone: str,
    weights_id: str,
    preprocessing: str,
    image_size: tuple[int, int],
    sources: np.ndarray,
    *,
    seed: int,
    pooled: bool,
    views: str = "random",
) -> str:
    description = json.dumps(
        {
            "dataset": dataset_fingerprint,
            "backbone": backbone,
            "weights": weights_id,
            "preprocessing": preprocessing,
            "image_size": list(image_size),
            "engine": EXTRACTION_ENGINE,
            "augmentation": augmentation_settings(views),
            "seed": int(seed),
            "sources": hashlib.sha256(np.asarray(sources, dtype=np.int64).tobytes()).hexdigest(),
            "pooled": bool(pooled),
            "format": 1,
        },
        sort_keys=True,
    )
    return hashlib.sha256(description.encode()).hexdigest()[:20]


def view_seed(seed: int, view: int) -> int:
    text = f"{seed}/augment-view/{view}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def check_memory(k: int, n_sources: int, feature_shape: tuple[int, ...], *, pooled: bool) -> None:
    """Refuse, in one line, augmented whole feature maps that would not fit the budget."""
    if pooled or k == 0:
        return
    per_view = n_sources * int(np.prod(feature_shape)) * 4
    if k * per_view > FLATTEN_AUGMENT_BUDGET_BYTES:
        most = max(FLATTEN_AUGMENT_BUDGET_BYTES // per_view, 0)
        raise ValueError(
            f"--augment {k} with --head flatten needs {k * per_view / 1e9:.1f} GB of augmented feature maps "
            f"({k} x {n_sources} views x {'x'.join(map(str, feature_shape))} float32, limit "
            f"{FLATTEN_AUGMENT_BUDGET_BYTES / 1e9:.1f} GB); use --head pooled (1 value per channel) "
            f"or --augment {most} or less"
        )


def augmented_features(
    model_factory: Callable[[], Any],
    images: np.ndarray,
    sources: np.ndarray,
    *,
    k: int,
    seed: int,
    pooled: bool,
    dataset_fingerprint: str,
    backbone: str,
    weights_id: str,
    preprocessing: str,
    cache_dir: Path | None,
    progress: bool = True,
    views: str = "random",
) -> AugmentedFeatures:
    """Features of ``k`` augmented views of ``images[sources]`` (rows view-major: view 0 of every
    source, then view 1, ...), each view read from the cache or extracted on the LiteRT runtime
    like the plain features. ``pooled`` stores one value per channel (the pooled head's input)
    instead of whole maps (a backbone whose output is already a vector is taken as it is).
    ``views="dihedral"``: view ``v`` is the exact flip/rotation ``v + 1`` of
    :func:`steeldefect.data.augment.dihedral_view` (k <= 7), with no randomness.
    ``model_factory`` (the backbone) is called only on a cache miss."""
    from steeldefect.models.conversion import convert
    from steeldefect.runtime.litert import make_interpreter, predict_tflite

    sources = np.asarray(sources, dtype=np.int64)
    if k < 1:
        raise ValueError(f"--augment must be >= 1 here, got {k}")
    if views == "dihedral" and k > 7:
        raise ValueError(f"--augment-views dihedral: --augment must be 1..7, got {k}")
    image_size = (int(images.shape[1]), int(images.shape[2]))
    key = augmented_cache_key(
        dataset_fingerprint,
        backbone,
        weights_id,
        preprocessing,
        image_size,
        sources,
        seed=seed,
        pooled=pooled,
        views=views,
    )
    folder = Path(cache_dir) / "features" / "augmented" if cache_dir else None
    interpreter = None
    parts, extracted = [], 0
    for view in range(k):
        path = folder / f"{backbone}-{key}-view{view}.npy" if folder else None
        if path is not None and path.is_file():
            cached = np.load(path)
            if len(cached) == len(sources):
                parts.append(cached)
                continue
            log.warning(
                "augmented feature cache %s has %d rows for %d images; recomputing", path, len(cached), len(sources)
            )
        if interpreter is None:
            model = model_factory()
            if pooled and len(model.output.shape) == 4:
                import keras

                model = keras.Model(model.input, keras.layers.GlobalAveragePooling2D()(model.output))
            interpreter = make_interpreter(convert(model, "fp32"))
        if views == "dihedral":
            pixels = augment.dihedral_view(images[sources], view + 1)
        else:
            pixels = augment.augmented_views(images[sources], 1, view_seed(seed, view))
        features = predict_tflite(
            interpreter, pixels, progress=progress, desc=f"{backbone} augmented view {view + 1}/{k}"
        )
        del pixels
        extracted += 1
        if path is not None:
            save_npy(path, features)
            write_json(
                path.with_suffix(".json"),
                {
                    "dataset_fingerprint": dataset_fingerprint,
                    "backbone": backbone,
                    "weights": weights_id,
                    "preprocessing": preprocessing,
                    "image_size": list(image_size),
                    "engine": EXTRACTION_ENGINE,
                    "augmentation": augmentation_settings(views),
                    "seed": seed,
                    "view": view,
                    "pooled": pooled,
                    "n_sources": len(sources),
                    "shape": list(features.shape),
                },
            )
        parts.append(features)
    log.info(
        "augmented features for %s: %d views x %d images (%d extracted, %d from the cache)",
        backbone,
        k,
        len(sources),
        extracted,
        k - extracted,
    )
    return AugmentedFeatures(np.concatenate(parts), np.tile(sources, k), extracted)


def training_rows(
    features: np.ndarray,
    labels: np.ndarray,
    train_indices: np.ndarray,
    augmented: AugmentedFeatures | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The rows a head trains on: the images ``train_indices`` and, with ``augmented``, the views
    made from exactly those images (a fold's validation images are in the pool that was augmented,
    but their views are left out here)."""
    train_indices = np.asarray(train_indices)
    x, y = features[train_indices], labels[train_indices]
    if augmented is None:
        return x, y
    rows = np.flatnonzero(np.isin(augmented.sources, train_indices))
    return (
        np.concatenate([x, augmented.features[rows].reshape(len(rows), *x.shape[1:])]),
        np.concatenate([y, labels[augmented.sources[rows]]]),
    )
