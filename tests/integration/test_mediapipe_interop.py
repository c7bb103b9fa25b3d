"""Interoperability on real NEU images: MediaPipe Tasks' ImageClassifier, which knows a model only
from its embedded TFLite Model Metadata, names the same class as `predict` for fp32, fp16, int8
and int8-mixed files.

Uses the trained run named by ``$STEELDEFECT_INTEROP_RUN`` (its fold 0, all its test images) when
set; otherwise trains a small real-NEU run here (50 images per class). Either way the models are
exported again into a temporary folder by ``bench/mediapipe_interop.py``'s code, the run is only read.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from steeldefect.data import CLASS_NAMES_NEU
from steeldefect.modelfile import sidecar_path

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench" / "mediapipe_interop.py"
PER_CLASS = 50


def load_bench():
    spec = importlib.util.spec_from_file_location("mediapipe_interop", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_folder(neu_dir, tmp_path_factory):
    given = os.environ.get("STEELDEFECT_INTEROP_RUN")
    if given:
        if not (Path(given) / "config.json").is_file():
            pytest.fail(f"STEELDEFECT_INTEROP_RUN={given} is not a run folder")
        yield Path(given)
        return
    from steeldefect import pipeline

    root = tmp_path_factory.mktemp("interop")
    images = neu_dir / "IMAGES" if (neu_dir / "IMAGES").is_dir() else neu_dir
    subset = root / "neu"
    subset.mkdir()
    for name in CLASS_NAMES_NEU:
        for index in range(1, PER_CLASS + 1):
            (subset / f"{name}_{index}.jpg").symlink_to(images / f"{name}_{index}.jpg")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_HOME", str(root / "keras"))  # converts the .pth from the installed package
        patch.setenv("STEELDEFECT_CACHE", str(root / "cache"))
        # The pooled head at the run's chosen rate: a model as confident as a real one, so that the
        # two runtimes' slightly different resizing does not decide borderline images.
        pipeline.train(
            subset,
            root / "run",
            backbones=["efficientnet_lite0"],
            head="pooled",
            learning_rates=[0.01],
            epochs=15,
            n_folds=3,
            progress=False,
        )
        yield root / "run"


def test_mediapipe_image_classifier_agrees_with_predict(run_folder, tmp_path):
    pytest.importorskip("mediapipe.tasks.python.vision", reason="mediapipe is not installed")
    bench = load_bench()
    paths, prepared = bench.export_fold(run_folder, 0, bench.VARIANTS, tmp_path / "models")
    test = prepared.splits.test_indices
    images = [prepared.dataset.paths[i] for i in test]
    truth = [prepared.dataset.class_names[label] for label in prepared.dataset.labels[test]]
    for variant, path in paths.items():
        assert not sidecar_path(path).exists()  # both runtimes get nothing but the model file
        result = bench.compare(path, images, truth)
        assert result["agreement"] >= 0.99, (variant, result["disagreements"])
        # Our label strings, from the labels file inside the model; and a real classifier, not a constant.
        assert set(result["mediapipe_labels"]) == set(prepared.dataset.class_names), variant
        assert result["accuracy_mediapipe"] >= 0.85, variant
