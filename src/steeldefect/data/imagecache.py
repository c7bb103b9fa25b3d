"""The decoded-image cache: a dataset's decoded, resized images as one ``.npy`` keyed by its
fingerprint, with a JSON record beside it (kept files, bad files, per-image info).

A run killed mid-write leaves a cache miss, never a half-written hit; an unreadable or stale entry
is ignored with a warning and recomputed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from steeldefect.core.files import read_json, save_npy, write_json
from steeldefect.data.dataset import Dataset, ImageInfo

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


def write_cache(
    files: tuple[Path, Path],
    dataset: Dataset,
    fingerprint: str,
    image_size: tuple[int, int],
    kept_images: np.ndarray,
    infos: list[ImageInfo | None],
    bad: dict[int, str],
) -> None:
    array_path, meta_path = files
    names = dataset.relative_names
    try:
        # The array first, the JSON last: the JSON marks the entry complete, so a run killed between
        # the two writes leaves a cache miss, never a half-written hit.
        save_npy(array_path, kept_images)
        write_json(
            meta_path,
            {
                "format": CACHE_FORMAT,
                "fingerprint": fingerprint,
                "image_size": list(image_size),
                "layout": dataset.layout,
                "class_names": list(dataset.class_names),
                "files": [names[i] for i in range(len(dataset)) if i not in bad],
                "bad": {names[i]: problem for i, problem in sorted(bad.items())},
                "images": [asdict(info) for info in infos if info is not None],
            },
        )
    except OSError as error:
        # A read-only or full cache disk must not stop training; it only costs the next run a decode.
        logger.warning("could not write image cache %s: %s", array_path, error)


def read_cache(
    files: tuple[Path, Path], dataset: Dataset, fingerprint: str, image_size: tuple[int, int]
) -> tuple[np.ndarray, dict[int, str]] | None:
    array_path, meta_path = files
    if not (meta_path.is_file() and array_path.is_file()):
        return None
    try:
        meta = read_json(meta_path)
        if meta.get("format") != CACHE_FORMAT or meta.get("fingerprint") != fingerprint:
            return None
        index_of = {name: i for i, name in enumerate(dataset.relative_names)}
        bad = {index_of[name]: problem for name, problem in meta["bad"].items()}
        expected_kept = [name for i, name in enumerate(dataset.relative_names) if i not in bad]
        if meta["files"] != expected_kept:
            return None
        # Copy-on-write map: pages come straight from the OS file cache and only the ones used are
        # read (a resumed run with cached features touches a few hundred images, not all of them);
        # writes stay private to the caller and never reach the cache file.
        images = np.load(array_path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("ignoring unreadable image cache %s: %s", meta_path, error)
        return None
    if images.dtype != np.uint8 or images.shape != (len(expected_kept), *image_size, 3):
        logger.warning("ignoring image cache %s: unexpected array %s %s", array_path, images.dtype, images.shape)
        return None
    return images, bad
