"""The int8 guard: a model whose int8 conversion demonstrably loses accuracy is fixed, or reported
plainly as not fixable; off / warn / fix; the records in the model file, its sidecar, summary.json
and the report."""

from __future__ import annotations

import json
import logging

import keras
import numpy as np
import pytest

from steeldefect.deploy import int8guard
from steeldefect.runtime.litert import make_interpreter, predict_tflite

CLASSES = ("dark", "bright")


def _images(rng, low: int, high: int, n: int) -> np.ndarray:
    return rng.integers(low, high, (n, 8, 8, 3)).astype(np.uint8)


def brightness_model() -> keras.Model:
    """Class 'bright' when the mean pixel is above 150. Its hidden activation (the mean) only spans
    the range of the images it is calibrated on: calibrated on dark images, int8 clips every bright
    image's mean to the dark range and calls it 'dark'."""
    pixels = keras.Input((8, 8, 3))
    mean = keras.layers.GlobalAveragePooling2D()(pixels)
    mean = keras.layers.Dense(1, use_bias=False, kernel_initializer=keras.initializers.Constant(1 / 3))(mean)
    logits = keras.layers.Dense(
        2,
        kernel_initializer=keras.initializers.Constant([[-1.0, 1.0]]),
        bias_initializer=keras.initializers.Constant([150.0, -150.0]),
    )(mean)
    return keras.Model(pixels, keras.layers.Softmax()(logits))


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    dark_calibration = _images(rng, 0, 60, 40)
    check_images = np.concatenate([_images(rng, 0, 120, 30), _images(rng, 180, 256, 30)])
    check_labels = np.array([0] * 30 + [1] * 30)
    keras.utils.set_random_seed(0)
    model = brightness_model()
    # The float model is right on every check image: any drop is the conversion's.
    assert (int8guard.float_probabilities(model, check_images).argmax(1) == check_labels).all()
    return model, dark_calibration, check_images, check_labels


def _check(case, training_images: np.ndarray) -> int8guard.CheckData:
    _, _, images, labels = case
    return int8guard.CheckData(images, labels, CLASSES, "the check images", training_images, "the training images")


def _accuracy(flatbuffer: bytes, images: np.ndarray, labels: np.ndarray) -> float:
    return 100 * float(np.mean(predict_tflite(make_interpreter(flatbuffer), images).argmax(1) == labels))


def test_fix_recalibrates_a_conversion_whose_calibration_missed_the_range(case):
    model, dark, images, labels = case
    training = np.concatenate([dark, images])  # the training images do span bright ones
    flatbuffer, record, as_converted = int8guard.guarded_convert(
        model, "int8", dark, _check(case, training), int8guard.GuardSettings("fix")
    )
    # Before: every bright image flips to dark (measured, and checked independently here).
    assert record["before"]["accuracy_drop"] == pytest.approx(50.0)
    assert record["before"]["class_recall_drop"] == {"dark": 0.0, "bright": 100.0}
    assert record["before"]["top1_changed"] == pytest.approx(50.0)
    assert not record["passes_before"]
    assert _accuracy(as_converted, images, labels) == pytest.approx(50.0)
    # After: the recalibrated file ships, is full-integer and is right.
    assert record["shipped"] == "calibration" and record["passes"]
    assert record["after"]["accuracy_drop"] <= 0.5
    assert _accuracy(flatbuffer, images, labels) >= 99.5
    assert np.dtype(make_interpreter(flatbuffer).get_input_details()[0]["dtype"]) == np.uint8
    assert record["guard_seconds"] > 0
    json.dumps(record)  # goes into the model's metadata and the sidecar


def test_fix_says_plainly_when_no_remedy_passes(case, caplog):
    """New images brighter than every training image: recalibrating on the training images cannot
    see that range, and neither float layers chosen on them nor int8-mixed fix it."""
    model, dark, images, labels = case
    with caplog.at_level(logging.WARNING, logger="steeldefect.deploy.int8guard"):
        flatbuffer, record, as_converted = int8guard.guarded_convert(
            model, "int8", dark, _check(case, dark), int8guard.GuardSettings("fix"), name="tiny fold 0"
        )
    assert not record["passes"] and record["shipped"] == "as converted"
    assert [entry["remedy"] for entry in record["remedies"]] == [
        "calibration",
        "float-layers",
        "float-layers",
        "int8-mixed",
    ]
    # Every remedy was converted and scored (none failed to convert) and none passed.
    assert all("error" not in entry and not entry["passes"] for entry in record["remedies"])
    assert all(len(entry["float_layers"]) >= 1 for entry in record["remedies"] if entry["remedy"] == "float-layers")
    assert flatbuffer == as_converted  # the file as converted is written, and said so
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "tiny fold 0 int8" in warning[0] and "no remedy passed" in warning[0]
    assert "50.00 point(s)" in warning[0] and "bright" in warning[0]
    section = "\n".join(
        int8guard.report_section({"tiny": {"int8_check": {"0": {"int8": int8guard.summary_entry(record)}}}})
    )
    assert "FAILS: no remedy passed, shipped as converted" in section


def test_warn_measures_and_warns_without_remedies(case, caplog):
    model, dark, images, labels = case
    with caplog.at_level(logging.WARNING, logger="steeldefect.deploy.int8guard"):
        flatbuffer, record, _ = int8guard.guarded_convert(
            model, "int8", dark, _check(case, np.concatenate([dark, images])), int8guard.GuardSettings("warn")
        )
    assert record["remedies"] == [] and not record["passes"]
    assert "--int8-guard warn" in record["warning"]
    assert any("--int8-guard warn" in r.getMessage() for r in caplog.records)
    assert _accuracy(flatbuffer, images, labels) == pytest.approx(50.0)


def test_a_conversion_within_the_threshold_is_shipped_as_converted(case):
    model, dark, images, _ = case
    training = np.concatenate([dark, images])
    _, record, _ = int8guard.guarded_convert(model, "int8", training, _check(case, training), int8guard.GuardSettings())
    assert record["passes_before"] and record["shipped"] == "as converted" and record["remedies"] == []


def test_thresholds_count_any_class_losing_more_than_two_points():
    settings = int8guard.GuardSettings()
    labels = np.array([0] * 100 + [1] * 100)
    reference = np.eye(2)[labels]
    quantized = reference.copy()
    quantized[:3] = [0, 1]  # 3 of 100 'dark' flip: 1.5 points of accuracy, 3 points of its recall
    figures = int8guard.measure(reference, quantized, labels, CLASSES)
    assert figures["accuracy_drop"] == pytest.approx(1.5)
    assert figures["worst_class"] == "dark" and figures["worst_class_recall_drop"] == pytest.approx(3.0)
    assert not int8guard.passes(figures, settings)
    quantized[:3] = reference[:3]
    quantized[:1] = [0, 1]  # one flip: 0.5 point of accuracy, 1 point of recall: within
    assert int8guard.passes(int8guard.measure(reference, quantized, labels, CLASSES), settings)
    with pytest.raises(ValueError, match="int8 guard mode"):
        int8guard.GuardSettings("always")


def test_export_records_the_check_in_the_model_the_sidecar_the_summary_and_the_report(tiny_env, tmp_path):
    """`export` runs the guard by default (fix); `--int8-guard off` writes no record."""
    from steeldefect.core import runfolder
    from steeldefect.core.files import read_json
    from steeldefect.runtime.tflite_metadata import read_embedded_metadata
    from steeldefect.study import pipeline, report
    from tiny import FAST_TRAIN, TINY

    run = tmp_path / "run"
    pipeline.train(tiny_env, run, backbones=[TINY], **FAST_TRAIN)
    pipeline.export(run, variants=["int8"], calibration_samples=12, workers=1, quant_report=False, progress=False)
    checks = read_json(runfolder.summary_path(run))["backbones"][TINY]["int8_check"]
    assert set(checks) == {"0", "1", runfolder.FINAL}
    assert "out-of-fold validation images" in checks["0"]["int8"]["checked_on"]
    assert "training images" in checks[runfolder.FINAL]["int8"]["checked_on"]
    for fold in (0, 1, runfolder.FINAL):
        path = runfolder.fold_model_path(run, TINY, fold, "int8")
        embedded = read_embedded_metadata(path)["int8_check"]
        assert embedded == read_json(runfolder.sidecar_path(path))["int8_check"]
        for key in ("accuracy_drop", "class_recall_drop", "top1_changed"):
            assert key in embedded["before"] and key in embedded["after"]
        assert embedded["mode"] == "fix"
    text = report.write_report(run).read_text()
    assert "## int8 guard" in text and f"| {TINY} | 0 | int8 |" in text

    off = tmp_path / "off"
    pipeline.train(tiny_env, off, backbones=[TINY], **FAST_TRAIN)
    pipeline.export(off, variants=["int8"], int8_guard="off", calibration_samples=12, workers=1, progress=False)
    assert "int8_check" not in read_json(runfolder.summary_path(off))["backbones"][TINY]
    assert "int8_check" not in read_json(runfolder.sidecar_path(runfolder.fold_model_path(off, TINY, 0, "int8")))
