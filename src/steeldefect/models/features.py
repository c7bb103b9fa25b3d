"""Backbone features, computed once per image and cached on disk.

The backbone is frozen, so its output for an image never changes across learning rates, folds and
epochs: the reference recomputed it 3 x 5 x 15 times. It runs once per image on the LiteRT
interpreter (XNNPACK, float32), the runtime the exported models deploy on: 2.5-3.8x the images per
second of Keras on the 2-core machine here, after a one-off conversion of 8-26 s
(``bench/feature_throughput.py``). The cache key holds everything that could change the numbers
(dataset fingerprint, backbone, weights identity, preprocessing, input size, engine), so a stale
cache cannot be picked up by mistake.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import keras
import numpy as np

from steeldefect.core.files import save_npy, write_json

log = logging.getLogger(__name__)

EXTRACTION_ENGINE = "litert-fp32"


def feature_cache_key(
    dataset_fingerprint: str, backbone: str, weights_id: str, preprocessing: str, image_size: tuple[int, int]
) -> str:
    description = json.dumps(
        {
            "dataset": dataset_fingerprint,
            "backbone": backbone,
            "weights": weights_id,
            "preprocessing": preprocessing,
            "image_size": list(image_size),
            "engine": EXTRACTION_ENGINE,
            "format": 2,
        },
        sort_keys=True,
    )
    return hashlib.sha256(description.encode()).hexdigest()[:20]


def extract_features(
    model: keras.Model, images: np.ndarray, *, progress: bool = True, desc: str = "features"
) -> np.ndarray:
    """Run ``model`` over uint8 images (N, H, W, 3); returns float32 features (N, ...).

    The model is converted to a float32 LiteRT flatbuffer (batch 1, weights unchanged) and run on
    XNNPACK with every core, one image per invoke (larger batches were no faster here).
    """
    from steeldefect.models.conversion import convert
    from steeldefect.runtime.litert import make_interpreter, predict_tflite

    if len(images) == 0:
        return np.zeros((0, *model.output_shape[1:]), dtype=np.float32)
    interpreter = make_interpreter(convert(model, "fp32"))
    return predict_tflite(interpreter, images, progress=progress, desc=desc)


def cached_features(
    model_factory,
    images: np.ndarray,
    *,
    dataset_fingerprint: str,
    backbone: str,
    weights_id: str,
    preprocessing: str,
    cache_dir: Path | None,
    progress: bool = True,
) -> tuple[np.ndarray, Path | None, bool]:
    """Features for ``images`` from the cache, or computed with ``model_factory()`` and cached.

    ``model_factory`` is only called on a cache miss, so a warm run never builds the backbone.
    Returns (features, cache file or None, whether it was a cache hit).
    """
    image_size = (int(images.shape[1]), int(images.shape[2]))
    key = feature_cache_key(dataset_fingerprint, backbone, weights_id, preprocessing, image_size)
    path = Path(cache_dir) / "features" / f"{backbone}-{key}.npy" if cache_dir else None
    if path is not None and path.is_file():
        features = np.load(path)
        if len(features) == len(images):
            log.info("features for %s read from cache %s", backbone, path)
            return features, path, True
        log.warning("feature cache %s has %d rows for %d images; recomputing", path, len(features), len(images))
    model = model_factory()
    features = extract_features(model, images, progress=progress, desc=f"{backbone} features")
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
                "shape": list(features.shape),
            },
        )
        log.info("features for %s cached in %s", backbone, path)
    return features, path, False
