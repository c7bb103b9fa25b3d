"""A dataset's images as one array, through the decoded-image cache: :func:`load_images` for
training, :func:`image_infos` / :func:`decode_infos` for ``data inspect``. Every bad file is
collected and reported together (or skipped with ``skip_bad``)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from steeldefect.core.files import default_cache_dir
from steeldefect.data.dataset import (
    BadImageWarning,
    Dataset,
    DatasetError,
    ImageInfo,
    count_problems,
    fingerprint_of,
    hash_files,
)
from steeldefect.data.decode import BadImage, decode_file, pixel_hash, to_array
from steeldefect.data.imagecache import read_cache, write_cache


def _decode_all(
    dataset: Dataset,
    image_size: tuple[int, int] | None,
    *,
    progress: bool,
    known_bad: dict[int, str] | None = None,
) -> tuple[np.ndarray | None, list[ImageInfo | None], dict[int, str]]:
    """Decode every file; ``image_size=None`` collects infos only. Bad files never stop the loop."""
    bad = dict(known_bad or {})
    infos: list[ImageInfo | None] = [None] * len(dataset)
    images = None
    if image_size is not None:
        height, width = image_size
        images = np.zeros((len(dataset), height, width, 3), dtype=np.uint8)
    names = dataset.relative_names
    for i, path in enumerate(tqdm(dataset.paths, desc="decoding images", unit="img", disable=not progress)):
        if i in bad:
            continue
        try:
            image = decode_file(path)
            info = ImageInfo(names[i], image.width, image.height, image.mode, pixel_hash(image))
            if images is not None:
                images[i] = to_array(image, (height, width))
        except BadImage as problem:
            bad[i] = str(problem)
        else:
            infos[i] = info
    return images, infos, bad


def decode_infos(dataset: Dataset, *, progress: bool = False) -> tuple[list[ImageInfo | None], dict[int, str]]:
    """Every file's :class:`ImageInfo` (None where bad) and the bad files (index -> problem), without
    raising: for reports that describe a dataset as it is."""
    _, infos, bad = _decode_all(dataset, None, progress=progress)
    return infos, bad


def image_infos(dataset: Dataset, *, skip_bad: bool = False, progress: bool = False) -> list[ImageInfo]:
    """Size, stored mode and pixel hash of every image at its original size, in dataset order.

    Bad files raise one :class:`DatasetError` listing them all, or with ``skip_bad`` are left out
    (with a :class:`BadImageWarning`).
    """
    _, infos, bad = _decode_all(dataset, None, progress=progress)
    _report_bad(dataset, bad, skip_bad)
    return [info for info in infos if info is not None]


def load_images(
    dataset: Dataset,
    *,
    image_size: tuple[int, int] = (224, 224),
    cache_dir: str | os.PathLike | bool | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    min_per_class: int = 1,
) -> tuple[Dataset, np.ndarray]:
    """Decode every image to RGB uint8, resized (bilinear) to ``image_size = (height, width)``.

    Returns the dataset actually loaded (the input, or with ``skip_bad`` the input minus bad files) and
    an array of shape (N, height, width, 3). Bad files raise one :class:`DatasetError` listing all of
    them, ``"<path>: <problem>"`` per line; with ``skip_bad`` they are dropped with a
    :class:`BadImageWarning`, and the class counts are checked again (empty, or below ``min_per_class``).

    The result is cached under ``<cache_dir>/images/<fingerprint[:16]>-<H>x<W>.npy`` with a ``.json``
    beside it (full fingerprint, kept files, bad files, and an :class:`ImageInfo` per kept image under
    ``"images"``). The key is :func:`dataset_fingerprint`, so changed bytes, names or labels miss the
    cache. A cache hit returns a copy-on-write :class:`numpy.memmap` of the ``.npy`` (an ndarray
    subclass: writable, but changes stay in memory). ``cache_dir=None`` (or ``True``) uses
    :func:`steeldefect.core.files.default_cache_dir`; ``False`` disables it.
    """
    height, width = (int(image_size[0]), int(image_size[1]))
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size must be two positive integers (height, width), got {image_size!r}")

    digests, unreadable = hash_files(dataset.paths)
    fingerprint = fingerprint_of(dataset, (height, width), digests)
    cache_files = None
    if cache_dir is not False:
        # True is accepted as "on, default place" because callers pass a --cache/--no-cache flag.
        base = default_cache_dir() if cache_dir is None or cache_dir is True else Path(cache_dir)
        stem = f"{fingerprint[:16]}-{height}x{width}"
        cache_files = (base / "images" / f"{stem}.npy", base / "images" / f"{stem}.json")

    cached = read_cache(cache_files, dataset, fingerprint, (height, width)) if cache_files else None
    if cached is not None:
        kept_images, bad = cached
    else:
        images, infos, bad = _decode_all(dataset, (height, width), progress=progress, known_bad=unreadable)
        assert images is not None
        keep = np.array([i not in bad for i in range(len(dataset))], dtype=bool)
        kept_images = images if keep.all() else images[keep]
        if cache_files:
            # Cached even when bad files are present, so a rerun with skip_bad=True is instant.
            write_cache(cache_files, dataset, fingerprint, (height, width), kept_images, infos, bad)

    _report_bad(dataset, bad, skip_bad)
    if not bad:
        return dataset, kept_images
    loaded = dataset.subset([i for i in range(len(dataset)) if i not in bad])
    problems = count_problems(loaded, min_per_class, after_skip=True)
    if problems:
        raise DatasetError(problems)
    return loaded, kept_images


def _report_bad(dataset: Dataset, bad: dict[int, str], skip_bad: bool) -> None:
    if not bad:
        return
    lines = [f"{dataset.paths[i]}: {problem}" for i, problem in sorted(bad.items())]
    if not skip_bad:
        raise DatasetError(lines)
    warnings.warn(
        f"skipping {len(lines)} unreadable image file(s):\n" + "\n".join(lines), BadImageWarning, stacklevel=3
    )
