"""The data module on the real NEU-DET images (../shared/data/NEU-DET); skipped when they are absent."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from steeldefect.data.dataset import CLASS_NAMES_NEU, scan_dataset
from steeldefect.data.inspection import format_inspection, inspect_dataset
from steeldefect.data.loading import load_images
from steeldefect.data.splits import make_splits

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def neu(neu_dir):
    return scan_dataset(neu_dir, min_per_class=5)


def test_checksums_match(neu_dir: Path):
    sums = neu_dir / "SHA256SUMS"
    if not sums.is_file():
        pytest.skip(f"{sums} not present")
    expected = dict(reversed(line.split(maxsplit=1)) for line in sums.read_text().splitlines() if line.strip())
    assert len(expected) == 1800
    mismatched = [
        name
        for name, digest in expected.items()
        if hashlib.sha256((neu_dir / name.strip()).read_bytes()).hexdigest() != digest
    ]
    assert mismatched == []


def test_scan_finds_the_six_canonical_classes(neu):
    assert neu.layout == "neu-det"
    assert len(neu) == 1800
    assert neu.class_names == CLASS_NAMES_NEU
    assert neu.counts() == {name: 300 for name in CLASS_NAMES_NEU}
    assert neu.relative_names[:3] == ("IMAGES/crazing_1.jpg", "IMAGES/crazing_2.jpg", "IMAGES/crazing_3.jpg")


def test_split_holds_out_45_per_class(neu):
    splits = make_splits(neu.labels, test_fraction=0.15, n_folds=5, seed=42)
    assert len(splits.test_indices) == 270 and len(splits.train_indices) == 1530
    assert np.bincount(neu.labels[splits.test_indices]).tolist() == [45] * 6
    assert [len(val) for _, val in splits.folds] == [306] * 5


def test_inspect_finds_the_known_duplicate_pair(neu_dir):
    report = inspect_dataset(neu_dir, test_fraction=0.15, n_folds=5, seed=42)

    assert report["bad_files"] == {}
    assert report["image_sizes"] == {"200x200": 1800}
    assert [group["files"] for group in report["duplicate_groups"]] == [
        ["IMAGES/patches_101.jpg", "IMAGES/patches_105.jpg"]
    ]
    text = format_inspection(report)
    assert "patches_101.jpg" in text and "patches_105.jpg" in text


def test_load_a_few_real_images(neu):
    # A small subset keeps this fast; the full load is measured by bench/data_cache.py.
    subset = neu.subset(np.arange(0, 1800, 300))
    loaded, images = load_images(subset, image_size=(224, 224), cache_dir=False, progress=False)
    assert images.shape == (6, 224, 224, 3) and images.dtype == np.uint8
    # NEU images are grey pictures stored as 3-channel JPEGs: the channels agree within JPEG noise.
    assert np.abs(images[..., 0].astype(int) - images[..., 1].astype(int)).max() <= 8
    assert 20 < images.mean() < 235
