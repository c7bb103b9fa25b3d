"""Interoperability on real NEU images: MediaPipe Tasks' ImageClassifier, which knows a model only
from its embedded TFLite Model Metadata, read as its examples read it (``classifications[0]``),
names the same class as `predict` for fp32, fp16, int8 and int8-mixed files of fold 0 and the deploy
model and for the int8 file of every other fold model (the deploy model's second output, the
texture statistics, is no class head: issue #27).

Uses the ``pooled_neu_run`` fixture (``$STEELDEFECT_POOLED_RUN``, or a small real-NEU run trained
for the session): its Keras models are exported again into a temporary folder by
``bench/mediapipe_interop.py``'s code; the run is only read.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from steeldefect.runtime.modelfile import sidecar_path

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench" / "mediapipe_interop.py"
CALIBRATION = 60  # int8 calibration images, as the pooled_neu_run fixture's own export (16 files here)


def load_bench():
    spec = importlib.util.spec_from_file_location("mediapipe_interop", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_folder(pooled_neu_run):
    return pooled_neu_run


@pytest.fixture(scope="module")
def loaded(run_folder):
    from steeldefect.study.rundata import load_run_data

    return load_run_data(run_folder, progress=False)


def check_models(bench, paths: dict, prepared, *, texture: bool) -> None:
    """Each file, read with nothing but itself: MediaPipe's first head is the class probabilities, with
    our class names, naming the class `predict` names; a deploy model's texture statistics come
    second and report no category. MediaPipe gets the pixels `predict` classifies: its own resize of
    the 200x200 images tips borderline ones (the bench measures that, 1 of 270 on a full run; on
    this run's 135 test images it was 2 for the deploy model's int8-mixed in CI)."""
    test = prepared.splits.test_indices
    images = [prepared.dataset.paths[i] for i in test]
    truth = [prepared.dataset.class_names[label] for label in prepared.dataset.labels[test]]
    expected_heads = [(0, "probabilities", 1), *([(1, "texture_statistics", 0)] if texture else [])]
    for path in paths.values():
        assert not sidecar_path(path).exists()  # both runtimes get nothing but the model file
        result = bench.compare(path, images, truth, same_pixels=True)
        assert result["mediapipe_heads"] == [tuple(expected_heads)], (path.name, result["mediapipe_heads"])
        assert result["agreement"] >= 0.99, (path.name, result["disagreements"])
        # Our label strings, from the labels file inside the model; and a real classifier, not a constant.
        assert set(result["mediapipe_labels"]) == set(prepared.dataset.class_names), path.name
        assert result["accuracy_mediapipe"] >= 0.85, path.name


def test_mediapipe_first_head_is_the_probabilities_of_every_fold_model(run_folder, loaded, tmp_path):
    pytest.importorskip("mediapipe.tasks.python.vision", reason="mediapipe is not installed")
    bench = load_bench()
    prepared = loaded[0]
    # Fold 0 in every variant, exported again here; the other folds' int8 files as the run's own export
    # wrote them (copied without their sidecars), so every fold model is read and CI converts 4 files,
    # not 12 (every variant's output order is also checked on the tiny model, tests/unit/test_model_outputs.py).
    import shutil

    from steeldefect.core import runfolder

    paths, _ = bench.export_fold(
        run_folder, 0, bench.VARIANTS, tmp_path / "fold0", loaded=loaded, calibration_samples=CALIBRATION
    )
    check_models(bench, paths, prepared, texture=False)
    backbone = next(iter(runfolder.load_summary(run_folder)["backbones"]))
    for fold in range(1, len(prepared.splits.folds)):
        copy = tmp_path / f"fold{fold}.int8.tflite"
        shutil.copyfile(runfolder.fold_model_path(run_folder, backbone, fold, "int8"), copy)
        check_models(bench, {"int8": copy}, prepared, texture=False)


def test_mediapipe_first_head_is_the_probabilities_of_the_deploy_model(run_folder, loaded, tmp_path):
    """The final model exported as `export` exports RUN/deploy/model.*.tflite: texture statistics
    output and uncertainty rule inside, every variant."""
    pytest.importorskip("mediapipe.tasks.python.vision", reason="mediapipe is not installed")
    from steeldefect.runtime.litert import make_interpreter

    bench = load_bench()
    paths, _ = bench.export_fold(
        run_folder, "final", bench.VARIANTS, tmp_path / "final", loaded=loaded, calibration_samples=CALIBRATION
    )
    for path in paths.values():
        assert len(make_interpreter(path).get_output_details()) == 2, path.name
    check_models(bench, paths, loaded[0], texture=True)


def test_the_runs_own_deploy_model_has_the_probabilities_first(run_folder, loaded, tmp_path):
    """RUN/deploy/model.int8.tflite as `export` wrote it (the fixture's run, or $STEELDEFECT_POOLED_RUN)."""
    pytest.importorskip("mediapipe.tasks.python.vision", reason="mediapipe is not installed")
    import shutil

    from steeldefect.core.runfolder import deployable_model
    from steeldefect.runtime.tflite_metadata import read_embedded_metadata

    model = tmp_path / "model.int8.tflite"
    shutil.copyfile(deployable_model(run_folder), model)  # the model file alone, no sidecar
    if "outputs" not in read_embedded_metadata(model):
        pytest.skip(f"{run_folder} was exported before issue #27 (texture statistics first); re-export it")
    check_models(load_bench(), {"int8": model}, loaded[0], texture=True)
