"""Interoperability on real NEU images: MediaPipe Tasks' ImageClassifier, which knows a model only
from its embedded TFLite Model Metadata, names the same class as `predict` for fp32, fp16, int8
and int8-mixed files.

Uses the ``pooled_neu_run`` fixture (``$STEELDEFECT_POOLED_RUN``, or a small real-NEU run trained
for the session): its fold 0 is exported again into a temporary folder by
``bench/mediapipe_interop.py``'s code; the run is only read.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from steeldefect.runtime.modelfile import sidecar_path

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench" / "mediapipe_interop.py"
PER_CLASS = 50


def load_bench():
    spec = importlib.util.spec_from_file_location("mediapipe_interop", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_folder(pooled_neu_run):
    return pooled_neu_run


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


def test_mediapipe_reads_the_deploy_model_with_its_second_output(run_folder, tmp_path):
    """RUN/deploy/model.int8.tflite also outputs texture statistics: MediaPipe still finds the
    probabilities head by its metadata and agrees with `predict`."""
    pytest.importorskip("mediapipe.tasks.python.vision", reason="mediapipe is not installed")
    import shutil

    from steeldefect.core.runfolder import deployable_model
    from steeldefect.runtime.litert import make_interpreter
    from steeldefect.study.rundata import load_run_data

    bench = load_bench()
    model = tmp_path / "model.int8.tflite"
    shutil.copyfile(deployable_model(run_folder), model)  # the model file alone, no sidecar
    assert len(make_interpreter(model).get_output_details()) == 2
    prepared, _ = load_run_data(run_folder, progress=False)
    test = prepared.splits.test_indices
    images = [prepared.dataset.paths[i] for i in test]
    truth = [prepared.dataset.class_names[label] for label in prepared.dataset.labels[test]]
    result = bench.compare(model, images, truth)
    assert result["agreement"] >= 0.99, result["disagreements"]
    assert set(result["mediapipe_labels"]) == set(prepared.dataset.class_names)
