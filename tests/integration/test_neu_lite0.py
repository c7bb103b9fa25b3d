"""Real NEU images + real EfficientNet-Lite0 ImageNet weights (from the pip package), on a subset.

Held-out accuracy far above chance proves the pretrained weights are really loaded: the same
pipeline with random weights (also checked here) does much worse.
"""

from __future__ import annotations

import numpy as np
import pytest

from steeldefect.core.files import read_json
from steeldefect.data.dataset import CLASS_NAMES_NEU
from steeldefect.deploy import export as quantize
from steeldefect.study import evaluate, pipeline, rundata

pytestmark = pytest.mark.integration

PER_CLASS = 30
FAST = dict(learning_rates=[0.001], epochs=15, n_folds=3, progress=False)


@pytest.fixture(scope="module")
def neu_subset(neu_images, tmp_path_factory):
    """30 images per class as symlinks (the images themselves stay in ../shared)."""
    from conftest import link_neu_subset

    return link_neu_subset(neu_images, tmp_path_factory.mktemp("neu30"), PER_CLASS)


@pytest.fixture(scope="module")
def lite0_run(neu_subset, tmp_path_factory):
    root = tmp_path_factory.mktemp("lite0")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_HOME", str(root / "keras"))  # converts the .pth from the installed package
        patch.setenv("STEELDEFECT_CACHE", str(root / "cache"))
        summary = pipeline.train(neu_subset, root / "run", backbones=["efficientnet_lite0"], **FAST)
        yield root / "run", summary


def test_lite0_on_real_neu_is_far_above_chance(lite0_run):
    run, summary = lite0_run
    entry = summary["backbones"]["efficientnet_lite0"]
    assert entry["weights"].startswith("sha256:579344248a93")
    assert entry["variants"]["keras"]["n_models"] == 3
    # 27 test images, 6 classes: chance is 16.7%.
    assert entry["variants"]["keras"]["accuracy"]["mean"] >= 85.0
    meta = read_json(run / "efficientnet_lite0" / "models" / "fold0.keras.json")
    assert meta["verified"] and meta["class_names"] == list(CLASS_NAMES_NEU)


def test_random_weights_do_much_worse(neu_subset, lite0_run, tmp_path, monkeypatch):
    monkeypatch.setenv("STEELDEFECT_CACHE", str(tmp_path / "cache"))
    random = pipeline.train(neu_subset, tmp_path / "run", backbones=["efficientnet_lite0"], weights="none", **FAST)
    pretrained = lite0_run[1]["backbones"]["efficientnet_lite0"]["variants"]["keras"]["accuracy"]["mean"]
    assert random["backbones"]["efficientnet_lite0"]["variants"]["keras"]["accuracy"]["mean"] < pretrained - 10


def test_lite0_int8_keeps_accuracy_on_real_images(lite0_run, tmp_path, monkeypatch):
    import keras

    run, summary = lite0_run
    monkeypatch.setenv("STEELDEFECT_CACHE", str(run.parent / "cache"))
    prepared, options = rundata.load_run_data(run, progress=False)
    calibration = quantize.calibration_indices(prepared.dataset.labels, prepared.splits.train_indices, 60, seed=42)
    assert not set(calibration) & set(prepared.splits.test_indices.tolist())
    model = keras.models.load_model(run / "efficientnet_lite0" / "models" / "fold0.keras")
    path = quantize.export_model(model, "int8", tmp_path / "fold0.int8.tflite", prepared.images[calibration])
    test = prepared.splits.test_indices
    result = evaluate.evaluate_tflite(path, prepared.images[test], prepared.dataset.labels[test], 6, warmup=2, runs=5)
    float_accuracy = summary["backbones"]["efficientnet_lite0"]["variants"]["keras"]
    fold0 = read_json(run / "efficientnet_lite0" / "test_metrics_keras.json")["per_model"][0]["accuracy"]
    assert result["accuracy"] >= fold0 - 7.5  # at most two of 27 test images may flip
    assert result["xnnpack_partitions"] == 1
    assert np.dtype(quantize.tensor_summary(path)["inputs"][0]["dtype"]) == np.uint8
    assert float_accuracy["n_models"] == 3
