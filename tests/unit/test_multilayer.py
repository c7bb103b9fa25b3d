"""Few-image features: dihedral views (`--augment-views dihedral`), multi-layer features
(`--features multilayer`), their refusals, and both end to end in `train` and `learning-curve` on the
tiny backbone (the NEU figures are the README's)."""

from __future__ import annotations

import csv
from pathlib import Path

import keras
import numpy as np
import pytest

from steeldefect import cli
from steeldefect.core.options import TrainOptions
from steeldefect.data import augment
from steeldefect.models import augfeatures, backbones, training
from steeldefect.study import pipeline, rundata
from tiny import AUGMENT_KEY, FAST_TRAIN, TINY, build_tiny, curve_args

FAST = FAST_TRAIN


def test_dihedral_views_are_the_eight_exact_symmetries_of_the_square():
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(1, 4, 4, 3)  # no symmetry of its own
    views = [augment.dihedral_view(image, v) for v in range(8)]
    np.testing.assert_array_equal(views[0], image)
    assert len({v.tobytes() for v in views}) == 8  # all different
    for view in views:  # exact: the same pixels, moved
        assert sorted(view.ravel().tolist()) == sorted(image.ravel().tolist())
    np.testing.assert_array_equal(views[1][0, :, :, 0], np.rot90(image[0, :, :, 0]))
    np.testing.assert_array_equal(views[4][0, :, :, 0], image[0, :, ::-1, 0])
    with pytest.raises(ValueError, match="square"):
        augment.dihedral_view(np.zeros((1, 4, 6, 3), np.uint8), 1)
    with pytest.raises(ValueError, match="0..7"):
        augment.dihedral_view(image, 8)


def test_multilayer_backbone_outputs_the_channel_means_of_its_layers(tiny_env):
    model = backbones.build_backbone(TINY, image_size=(32, 32), features="multilayer")
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.float32)
    maps = keras.Model(model.input, [model.get_layer(n).output for n in ("tiny_conv1", "tiny_conv2")])
    conv1, conv2 = (np.asarray(m) for m in maps.predict(images, verbose=0))
    expected = np.concatenate([conv1.mean(axis=(1, 2)), conv2.mean(axis=(1, 2))], axis=1)
    np.testing.assert_allclose(np.asarray(model.predict(images, verbose=0)), expected, rtol=1e-5, atol=1e-6)
    assert backbones.feature_name(TINY, "multilayer") == "tiny+multilayer"
    assert backbones.feature_name(TINY, "maps") == TINY


def test_dihedral_augmented_features_are_the_backbone_on_the_exact_views(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    model = build_tiny(None, True, (32, 32, 3))
    settings = dict(AUGMENT_KEY, cache_dir=tmp_path)
    sources = np.array([0, 2, 5])
    dihedral = augfeatures.augmented_features(lambda: model, images, sources, k=7, views="dihedral", **settings)
    assert dihedral.features.shape == (21, 16) and dihedral.extracted_views == 7
    pooled = keras.Model(model.input, keras.layers.GlobalAveragePooling2D()(model.output))
    for view in range(7):
        wanted = pooled.predict(augment.dihedral_view(images[sources], view + 1).astype(np.float32), verbose=0)
        np.testing.assert_allclose(dihedral.features[3 * view : 3 * view + 3], wanted, rtol=1e-4, atol=1e-5)
    # Random views are another cache entry, not the dihedral ones read back.
    random_views = augfeatures.augmented_features(lambda: model, images, sources, k=2, **settings)
    assert random_views.extracted_views == 2
    with pytest.raises(ValueError, match="1..7"):
        augfeatures.augmented_features(lambda: model, images, sources, k=8, views="dihedral", **settings)


def test_dihedral_average_model_answers_the_mean_over_the_eight_views_in_keras_and_litert():
    from steeldefect.models.conversion import convert
    from steeldefect.runtime.litert import make_interpreter, predict_tflite

    backbone = build_tiny(None, True, (32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(backbone.output)
    model = keras.Model(backbone.input, [keras.layers.Dense(3, activation="softmax")(pooled), pooled])
    # As export builds it: a model around another one's input (the deploy model with its texture output).
    model = keras.Model(model.inputs, model.outputs)
    averaged = augment.dihedral_average_model(model)
    images = np.random.default_rng(2).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    views = [model.predict(augment.dihedral_view(images, v).astype(np.float32), verbose=0)[0] for v in range(8)]
    wanted = np.mean(views, axis=0)
    assert np.abs(views[0] - wanted).max() > 1e-3  # the views do change the answer: the test can fail
    got, texture = averaged.predict(images.astype(np.float32), verbose=0)
    np.testing.assert_allclose(got, wanted, atol=1e-6)
    assert texture.shape == (5, 16)
    for variant, tolerance in (("fp32", 1e-5), ("int8", 0.02)):
        flatbuffer = convert(averaged, variant, images.astype(np.float32))
        probabilities = predict_tflite(make_interpreter(flatbuffer, threads=1), images, progress=False)
        np.testing.assert_allclose(probabilities, wanted, atol=tolerance)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(features="multilayer", head="pooled"), "--head pooled: multilayer features are already"),
        (dict(features="multilayer", fine_tune=2), "--fine-tune needs --features maps"),
        (dict(augment_views="dihedral"), "--augment-views dihedral: --augment must be 1..7, got 0"),
        (dict(augment=8, augment_views="dihedral"), "--augment must be 1..7, got 8"),
    ],
)
def test_option_combinations_that_cannot_work_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        TrainOptions(**options)


def test_cli_refuses_multilayer_for_a_backbone_without_it_in_one_line(tiny_env, tmp_path, capsys):
    args = ["--quiet", "train", "--data", str(tiny_env), "--out", str(tmp_path / "run"), "--backbone", "mobilenet"]
    assert cli.main([*args, "--weights", "none", "--features", "multilayer"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"error: --features multilayer is defined for efficientnet_lite0, {TINY} only, not mobilenet"
    assert not (tmp_path / "run").exists()


def test_train_multilayer_with_dihedral_views_end_to_end(tiny_env, tmp_path, monkeypatch):
    rows = []
    real_rows = training.training_rows

    def spy_rows(features, labels, train_indices, augmented):
        x, y = real_rows(features, labels, train_indices, augmented)
        rows.append((len(train_indices), x.shape))
        return x, y

    monkeypatch.setattr(training, "training_rows", spy_rows)
    run = tmp_path / "run"
    options = dict(features="multilayer", augment=7, augment_views="dihedral", **FAST)
    summary = pipeline.train(tiny_env, run, backbones=[TINY], **options)
    entry = summary["backbones"][TINY]
    assert entry["status"] == "done" and entry["features"] == "multilayer"
    # Every head trained on 8 rows per image (itself and its 7 flips/rotations) of 8 + 16 channel means.
    assert rows and all(shape == (8 * n, 24) for n, shape in rows)
    cache = tmp_path / "cache" / "features"
    assert len(list(cache.glob("tiny+multilayer-*.npy"))) == 1
    assert len(list((cache / "augmented").glob("tiny+multilayer-*-view6.npy"))) == 1
    # Exported like any run: the deploy file answers for test images as the .keras model does.
    from steeldefect.core import runfolder
    from steeldefect.runtime.modelfile import Classifier

    pipeline.export(run, variants=["fp32"], calibration_samples=12, quant_report=False, progress=False)
    deploy = runfolder.deploy_model_path(run, "fp32")
    prepared, _ = rundata.load_run_data(run, progress=False)
    images = prepared.images[prepared.splits.test_indices[:4]]
    keras_model = keras.models.load_model(run / "deploy" / "model.keras", compile=False)
    expected = np.asarray(keras_model.predict(images.astype(np.float32), verbose=0))
    if isinstance(expected, list):
        expected = expected[0]
    got = Classifier(deploy, threads=1).probabilities(images)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    from steeldefect.study.report import write_report

    text = Path(write_report(run)).read_text()
    assert "- Training: head flatten, features multilayer, 7 dihedral augmented views per training image" in text


def test_export_tta_writes_files_that_answer_the_mean_over_the_views(tiny_env, tmp_path):
    from steeldefect.core import runfolder
    from steeldefect.runtime.modelfile import Classifier, read_model_info

    run = tmp_path / "run"
    pipeline.train(tiny_env, run, backbones=[TINY], **FAST)
    pipeline.export(run, variants=["fp32"], tta=True, calibration_samples=12, quant_report=False, progress=False)
    deploy = runfolder.deploy_model_path(run, "fp32")
    assert read_model_info(deploy).metadata["test_time_augmentation"] == "dihedral-8"
    prepared, _ = rundata.load_run_data(run, progress=False)
    images = prepared.images[prepared.splits.test_indices[:4]]
    keras_model = keras.models.load_model(run / "deploy" / "model.keras", compile=False)
    views = [
        np.asarray(keras_model.predict(augment.dihedral_view(images, v).astype(np.float32), verbose=0))
        for v in range(8)
    ]
    got = Classifier(deploy, threads=1).probabilities(images)
    np.testing.assert_allclose(got, np.mean(views, axis=0), atol=1e-4)
    # the file does not answer as the single-view .keras model does
    assert np.abs(got - views[0]).max() > 1e-3
    from steeldefect.study.report import write_report

    assert "exported files average the 8 flips/rotations of each image" in Path(write_report(run)).read_text()
    # Files with and without the average are never mixed in one run folder.
    with pytest.raises(ValueError, match=r"tta: True -> False"):
        pipeline.export(run, variants=["fp32", "int8"], calibration_samples=12, quant_report=False, progress=False)


def test_cli_learning_curve_multilayer_method(tiny_env, tmp_path):
    out = tmp_path / "curve"
    args = curve_args(tiny_env, out, "--per-class", "2", "4", "--draws", "2")
    args += ["--methods", "frozen", "multilayer", "multilayer-tta"]
    assert cli.main(args) == 0
    rows = list(csv.DictReader((out / "learning_curve.csv").open()))
    multilayer = [r for r in rows if r["method"] == "multilayer"]
    assert len(multilayer) == 4 and all(r["augment"] == "7" for r in multilayer)
    # each sampled image and its 7 views, 3 classes
    assert all(int(r["n_train_rows"]) == 8 * 3 * int(r["point"]) for r in multilayer)
    report = (out / "report.md").read_text()
    assert "multilayer + dihedral K=7" in report and "8-view test average" in report
    averaged = {(r["point"], r["draw"]): r for r in rows if r["method"] == "multilayer-tta"}
    assert len(averaged) == 4  # the same heads as 'multilayer' (same seeds), scored on 8 views per test image
    assert all(r["n_train_rows"] == averaged[(r["point"], r["draw"])]["n_train_rows"] for r in multilayer)
