"""Fine-tuning the backbone's top blocks (steeldefect.models.finetune, `train --fine-tune N`), on a tiny
backbone with BatchNormalization and on generated images: it learns beyond its frozen start, moves
only the top blocks' weights and never the BatchNormalization statistics, resumes after a killed
fold, and refuses more blocks than the backbone has."""

from __future__ import annotations

import hashlib

import keras
import numpy as np
import pytest

from steeldefect import cli
from steeldefect.core import runfolder
from steeldefect.core.files import read_json
from steeldefect.models import backbones, finetune, training
from steeldefect.models import weights as weight_files
from steeldefect.study import pipeline
from tiny import CLASSES, make_dataset, make_pattern_image

TINY_BN = "tinybn"
FAST = dict(
    learning_rates=[0.01],
    epochs=3,
    batch_size=8,
    n_folds=2,
    image_size=32,
    fine_tune=2,
    fine_tune_epochs=3,
    fine_tune_lr=1e-3,
    progress=False,
)


def build_tiny_bn(weights_path, preprocessing, input_shape):
    """Three conv blocks (conv -> BatchNormalization -> ReLU) and a 1x1 head conv, named like Lite0's."""
    inputs = keras.Input(shape=input_shape, name="pixels")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="rescaling")(inputs) if preprocessing else inputs
    for block, (filters, stride) in enumerate([(8, 2), (12, 2), (16, 1)]):
        x = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"block{block}_conv")(
            x
        )
        x = keras.layers.BatchNormalization(name=f"block{block}_bn")(x)
        x = keras.layers.ReLU(name=f"block{block}_relu")(x)
    x = keras.layers.Conv2D(16, 1, use_bias=False, name="head_conv")(x)
    x = keras.layers.BatchNormalization(name="head_bn")(x)
    x = keras.layers.ReLU(name="head_relu")(x)
    model = keras.Model(inputs, x, name=TINY_BN)
    if weights_path is not None:
        model.load_weights(weights_path)
    return model


@pytest.fixture()
def tiny_bn(tmp_path, monkeypatch):
    """The tiny BatchNormalization backbone registered with 'pretrained' weights whose moving statistics
    are not the initial 0 / 1 (so a changed statistic would show)."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("STEELDEFECT_CACHE", str(tmp_path / "cache"))
    keras.utils.set_random_seed(0)
    model = build_tiny_bn(None, True, (32, 32, 3))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.1, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))
    path = tmp_path / "keras" / "models" / "tinybn.weights.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save_weights(path)
    spec = backbones.BackboneSpec(
        name=TINY_BN,
        display_name="Tiny with BatchNormalization",
        feature_shape=(8, 8, 16),
        weights=weight_files.WeightFile(
            path.name, "tiny/" + path.name, path.stat().st_size, hashlib.md5(path.read_bytes()).hexdigest()
        ),
        _build=build_tiny_bn,
    )
    monkeypatch.setitem(backbones.REGISTRY, TINY_BN, spec)
    return spec


def pattern_set(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASSES)), n_per_class)
    images = np.stack([np.repeat(make_pattern_image(int(c), rng, 32)[..., None], 3, axis=-1) for c in labels])
    return images, labels


def frozen_start(images, labels, train_idx, *, epochs: int):
    backbone = backbones.build_backbone(TINY_BN, image_size=(32, 32))
    features = np.asarray(backbone.predict(images.astype(np.float32), verbose=0))
    head, _ = training.fit_head(
        features[train_idx],
        labels[train_idx],
        n_classes=len(CLASSES),
        kind="pooled",
        learning_rate=0.01,
        epochs=epochs,
        batch_size=16,
        seed=0,
    )
    return backbone, head, features


def test_blocks_are_named_after_the_backbone_and_include_the_head_conv(tiny_bn):
    blocks = finetune.backbone_blocks(backbones.build_backbone(TINY_BN, image_size=(32, 32)))
    assert [block.name for block in blocks] == ["block0", "block1", "block2"]
    assert [layer.name for layer in blocks[-1].layers] == [
        "block2_conv",
        "block2_bn",
        "block2_relu",
        "head_conv",
        "head_bn",
        "head_relu",
    ]
    lite0 = finetune.backbone_blocks(backbones.build_backbone("efficientnet_lite0", weights="none"))
    assert len(lite0) == 16 and lite0[-1].name == "block15" and lite0[-1].layers[-1].name == "head_relu"
    assert lite0[0].layers[0].name == "block0_dwconv"  # the stem is never fine-tuned


def test_fine_tuned_model_beats_its_frozen_start_and_keeps_batch_norm_and_bottom(tiny_bn):
    images, labels = pattern_set(40, seed=1)
    held_out, held_labels = pattern_set(30, seed=2)
    train_idx = np.arange(len(images))
    # A head trained for one epoch: a weak but real frozen start, as a few-image run would give.
    backbone, head, _ = frozen_start(images, labels, train_idx, epochs=1)
    frozen = training.join_model(backbone, head, "frozen")
    details: dict = {}
    tuned = finetune.fine_tune_model(
        TINY_BN,
        images,
        labels,
        train_idx,
        head_model=head,
        blocks=2,
        learning_rate=1e-2,
        epochs=10,
        seed=0,
        class_weight=None,
        progress=False,
        details=details,
    )

    def loss_and_accuracy(model):
        p = np.asarray(model.predict(held_out.astype(np.float32), verbose=0))
        loss = -np.mean(np.log(p[np.arange(len(p)), held_labels] + 1e-9))
        return loss, float((p.argmax(1) == held_labels).mean())

    frozen_loss, frozen_accuracy = loss_and_accuracy(frozen)
    tuned_loss, tuned_accuracy = loss_and_accuracy(tuned)
    assert tuned_loss < 0.8 * frozen_loss and tuned_accuracy > frozen_accuracy, (
        frozen_loss,
        frozen_accuracy,
        tuned_loss,
        tuned_accuracy,
    )
    assert details["trained_layers"] == ["block1_conv", "block2_conv", "head_conv"]

    fresh = backbones.build_backbone(TINY_BN, image_size=(32, 32))
    for layer in fresh.layers:
        before = [np.asarray(w) for w in layer.weights]
        after = [np.asarray(w) for w in tuned.get_layer(layer.name).weights]
        changed = any(not np.array_equal(b, a) for b, a in zip(before, after, strict=True))
        # Only the top 2 blocks' convolutions move; every BatchNormalization (its scale, offset and
        # moving statistics) and the bottom block stay as pretrained.
        assert changed == (layer.name in details["trained_layers"]), layer.name
    # The head started from the frozen one and was trained too.
    assert not np.allclose(head.get_weights()[0], tuned.layers[-1].get_weights()[0])


def test_fine_tuning_refuses_more_blocks_than_the_backbone_has(tiny_bn, tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    argv = [
        "--quiet",
        "train",
        "--data",
        str(data),
        "--backbone",
        TINY_BN,
        "--image-size",
        "32",
        "--folds",
        "2",
        "--fine-tune",
        "4",
        "--out",
        str(out),
    ]
    assert cli.main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--fine-tune 4" in err and "3 blocks" in err and "Traceback" not in err
    assert not (out / "summary.json").exists()  # refused before any work


def test_killed_fine_tuning_resumes_at_the_next_fold_with_the_same_numbers(tiny_bn, tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", per_class=14, size=32)
    reference = pipeline.train(data, tmp_path / "uninterrupted", backbones=[TINY_BN], **FAST)["backbones"][TINY_BN]

    real = finetune.fine_tune_model
    calls: list[int] = []

    def killed_in_second_model(*args, **kwargs):
        calls.append(len(calls))
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while fold 1 is fine-tuning
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune, "fine_tune_model", killed_in_second_model)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(data, run, backbones=[TINY_BN], **FAST)
    fold0 = runfolder.fold_model_path(run, TINY_BN, 0, "keras")
    assert fold0.is_file() and not runfolder.fold_model_path(run, TINY_BN, 1, "keras").exists()
    fold0_bytes = fold0.read_bytes()

    calls.clear()
    monkeypatch.setattr(finetune, "fine_tune_model", lambda *a, **k: calls.append(0) or real(*a, **k))
    entry = pipeline.train(data, run, backbones=[TINY_BN], **FAST)["backbones"][TINY_BN]
    assert len(calls) == 2  # fold 1 and the final model; fold 0 was kept
    assert fold0.read_bytes() == fold0_bytes
    assert entry["variants"]["keras"] == reference["variants"]["keras"]
    assert entry["final"]["keras"] == reference["final"]["keras"]

    # What the run records: the fine-tuned figures where the report and export read them, the frozen
    # ones beside them, and the models' sidecars say what was trained.
    assert entry["fine_tune"]["blocks"] == 2 and entry["fine_tune"]["trained_layers"] == [
        "block1_conv",
        "block2_conv",
        "head_conv",
    ]
    assert set(entry["frozen"]) == {"variants", "final"} and "accuracy" in entry["frozen"]["variants"]["keras"]
    assert read_json(run / "config.json")["commands"]["train"]["options"]["fine_tune"] == 2
    assert read_json(runfolder.sidecar_path(fold0))["fine_tune"]["blocks"] == 2
    assert (run / TINY_BN / "test_metrics_frozen-keras.json").is_file()

    # Exported like a frozen run: the float LiteRT model of each fold is the fine-tuned model.
    pipeline.export(run, variants=["fp32", "int8"], calibration_samples=12, quant_report=False, progress=False)
    evaluated = pipeline.evaluate(run, threads=1, warmup=1, runs=2, progress=False)["backbones"][TINY_BN]
    fp32 = [m["accuracy"] for m in read_json(run / TINY_BN / "test_metrics_fp32.json")["per_model"]]
    keras_per_model = [m["accuracy"] for m in read_json(run / TINY_BN / "test_metrics_keras.json")["per_model"]]
    assert fp32 == pytest.approx(keras_per_model, abs=1e-6)
    assert evaluated["variants"]["int8"]["n_models"] == 2


def test_fine_tuned_joined_model_matches_its_cached_activations(tiny_bn):
    images, labels = pattern_set(6, seed=3)
    _, head, _ = frozen_start(images, labels, np.arange(len(images)), epochs=1)
    split = finetune.build_split(TINY_BN, 1, image_size=(32, 32))
    activations = finetune.compute_activations(
        split.bottom, images, np.arange(len(images)), np.arange(len(images)), views=2, seed=0, progress=False
    )
    again = finetune.compute_activations(
        split.bottom, images, np.arange(len(images)), np.arange(0), views=2, seed=0, progress=False
    )
    assert np.array_equal(activations.views, again.views)  # same seed, same views: what resuming relies on
    assert not np.array_equal(activations.views[0], activations.views[1])  # two views differ
    tuned = finetune.fine_tune_model(
        TINY_BN,
        images,
        labels,
        np.arange(len(images)),
        head_model=head,
        blocks=1,
        learning_rate=1e-3,
        epochs=2,
        seed=0,
        class_weight=np.ones(3, np.float32),
        progress=False,
        activations=activations,
    )
    agreement = finetune.check_fine_tuned_agrees(tuned, 1, images, activations.plain)
    assert agreement["prediction_agreement"] == 1.0
    partial = finetune.compute_activations(
        split.bottom, images, np.arange(3), np.arange(0), views=1, seed=0, progress=False
    )
    with pytest.raises(ValueError, match=r"no augmented activations cached for image\(s\) \[5\]"):
        finetune.fine_tune_model(
            TINY_BN,
            images,
            labels,
            np.array([0, 5]),
            head_model=head,
            blocks=1,
            epochs=1,
            progress=False,
            activations=partial,
        )


def test_unflat_backbones_are_refused_in_one_line():
    inner = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3, name="block0_conv")], name="inner")
    inputs = keras.Input((8, 8, 3))
    wrapped = keras.Model(inputs, inner(inputs), name="wrapped")
    with pytest.raises(finetune.FineTuneError, match="one flat model"):
        finetune.backbone_blocks(wrapped)
