"""Few-image learning on real NEU images with the real Lite0 weights: the multi-layer features with the
7 flips/rotations, single-view and with the 8-view average, through `learning-curve` on a subset.

The README's figures come from the full data (5 draws); this checks on 60 images per class that the
methods run end to end on real images and classify far above chance from 5 images per class.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from steeldefect import cli
from steeldefect.data.dataset import CLASS_NAMES_NEU
from steeldefect.models import backbones

pytestmark = pytest.mark.integration

PER_CLASS = 60


@pytest.fixture(scope="module")
def neu_subset(neu_images, tmp_path_factory):
    from conftest import link_neu_subset

    return link_neu_subset(neu_images, tmp_path_factory.mktemp("neu60"), PER_CLASS)


def test_multilayer_backbone_with_real_weights_is_the_means_of_its_layers(neu_images):
    import keras

    from steeldefect.data.decode import read_image

    pixels = np.stack([read_image(neu_images / f"{name}_1.jpg", (224, 224)) for name in CLASS_NAMES_NEU])
    model = backbones.build_backbone("efficientnet_lite0", features="multilayer")
    layers = backbones.get_backbone("efficientnet_lite0").multilayer
    maps = keras.Model(model.input, [model.get_layer(name).output for name in layers]).predict(
        pixels.astype(np.float32), verbose=0
    )
    expected = np.concatenate([np.asarray(m).mean(axis=(1, 2)) for m in maps], axis=1)
    got = np.asarray(model.predict(pixels.astype(np.float32), verbose=0))
    assert got.shape == (6, 4736)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_learning_curve_multilayer_methods_on_real_images(neu_subset, tmp_path, monkeypatch):
    monkeypatch.setenv("STEELDEFECT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "curve"
    args = ["--quiet", "learning-curve", "--data", str(neu_subset), "--per-class", "5", "--draws", "2"]
    args += ["--methods", "frozen", "multilayer", "multilayer-tta", "--steps", "300", "--out", str(out)]
    assert cli.main(args) == 0
    rows = list(csv.DictReader((out / "learning_curve.csv").open()))
    assert {r["method"] for r in rows} == {"frozen", "multilayer", "multilayer-tta"} and len(rows) == 6
    for row in rows:
        # 54 test images, 6 classes: chance is 17%; five real images per class give far more.
        assert float(row["accuracy"]) >= 80.0, row
    multilayer = [r for r in rows if r["method"] == "multilayer"]
    assert all(int(r["n_train_rows"]) == 8 * 30 for r in multilayer)  # 30 images and their 7 views each
    assert "multilayer + dihedral K=7" in (out / "report.md").read_text()
