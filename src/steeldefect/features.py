"""Backbone features, computed once per image and cached on disk.

The backbone is frozen, so its output for an image never changes across learning rates, folds and
epochs: the reference recomputed it 3 x 5 x 15 times. The cache key holds everything that could
change the numbers (dataset fingerprint, backbone, weights identity, preprocessing, input size), so a
stale cache cannot be picked up by mistake.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import keras
import numpy as np
from tqdm.auto import tqdm

from steeldefect.files import save_npy, write_json

log = logging.getLogger(__name__)


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
            "format": 1,
        },
        sort_keys=True,
    )
    return hashlib.sha256(description.encode()).hexdigest()[:20]


def extract_features(
    model: keras.Model, images: np.ndarray, *, batch_size: int = 32, progress: bool = True, desc: str = "features"
) -> np.ndarray:
    """Run ``model`` over uint8 images (N, H, W, 3) in batches; returns float32 features."""
    outputs = []
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].astype(np.float32)
            outputs.append(np.asarray(model.predict_on_batch(batch), dtype=np.float32))
            bar.update(len(batch))
    if not outputs:
        return np.zeros((0, *model.output_shape[1:]), dtype=np.float32)
    return np.concatenate(outputs)


def cached_features(
    model_factory,
    images: np.ndarray,
    *,
    dataset_fingerprint: str,
    backbone: str,
    weights_id: str,
    preprocessing: str,
    cache_dir: Path | None,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[np.ndarray, Path | None, bool]:
    """Features for ``images`` from the cache, or computed with ``model_factory()`` and cached.

    ``model_factory`` is only called on a cache miss, so a warm run never builds the backbone.
    Returns (features, cache file or None, whether it was a cache hit).
    """
    image_size = tuple(int(v) for v in images.shape[1:3])
    key = feature_cache_key(dataset_fingerprint, backbone, weights_id, preprocessing, image_size)
    path = Path(cache_dir) / "features" / f"{backbone}-{key}.npy" if cache_dir else None
    if path is not None and path.is_file():
        features = np.load(path)
        if len(features) == len(images):
            log.info("features for %s read from cache %s", backbone, path)
            return features, path, True
        log.warning("feature cache %s has %d rows for %d images; recomputing", path, len(features), len(images))
    model = model_factory()
    features = extract_features(model, images, batch_size=batch_size, progress=progress, desc=f"{backbone} features")
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
                "shape": list(features.shape),
            },
        )
        log.info("features for %s cached in %s", backbone, path)
    return features, path, False
