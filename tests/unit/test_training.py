"""Heads, the grid, metrics and the joined model, on synthetic features."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from steeldefect.core import metrics
from steeldefect.models import training


def separable(n_per_class=40, classes=3, shape=(2, 2, 8), seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, *shape))
    labels = np.repeat(np.arange(classes), n_per_class)
    features = centres[labels] + rng.normal(0, 1, (len(labels), *shape))
    return features.astype(np.float32), labels


def test_heads_have_the_reference_layers():
    flatten = training.build_head((7, 7, 1024), 6)
    kinds = [type(layer).__name__ for layer in flatten.layers]
    assert kinds == ["InputLayer", "Flatten", "Dense", "Dropout", "Dense", "Dense"]
    assert [layer.units for layer in flatten.layers if hasattr(layer, "units")] == [128, 64, 6]
    assert flatten.layers[3].rate == 0.2
    pooled = training.build_head((7, 7, 1024), 6, kind="pooled")
    assert type(pooled.layers[1]).__name__ == "GlobalAveragePooling2D"
    # The Flatten head holds 50,176 x 128 weights; the pooled one a fiftieth of that.
    assert flatten.count_params() > 40 * pooled.count_params()
    with pytest.raises(ValueError, match="head must be one of"):
        training.build_head((7, 7, 8), 6, kind="transformer")


def test_fit_head_learns_and_is_deterministic():
    features, labels = separable()
    head_a, history = training.fit_head(
        features, labels, n_classes=3, learning_rate=1e-2, epochs=8, batch_size=16, seed=5
    )
    head_b, _ = training.fit_head(features, labels, n_classes=3, learning_rate=1e-2, epochs=8, batch_size=16, seed=5)
    predicted = training.predict_proba(head_a, features).argmax(1)
    assert (predicted == labels).mean() > 0.9
    assert len(history["loss"]) == 8
    np.testing.assert_array_equal(training.predict_proba(head_a, features), training.predict_proba(head_b, features))


@pytest.mark.parametrize("kind", ["flatten", "pooled"])
def test_a_reused_trainer_trains_each_cell_as_a_fresh_one(kind):
    # The grid compiles one trainer and reuses it; a resumed grid may train any cell first, so a
    # cell must not depend on what the trainer trained before it.
    features, labels = separable()
    trainer = training.HeadTrainer(features.shape[1:], 3, kind=kind, batch_size=16)
    trainer.fit(features, labels, learning_rate=1e-1, epochs=3, seed=1)
    reused, history = trainer.fit(features, labels, learning_rate=1e-2, epochs=6, seed=2, validation=(features, labels))
    fresh, _ = training.fit_head(
        features, labels, n_classes=3, kind=kind, learning_rate=1e-2, epochs=6, batch_size=16, seed=2
    )
    assert [type(layer).__name__ for layer in reused.layers] == [type(layer).__name__ for layer in fresh.layers]
    np.testing.assert_allclose(
        training.predict_proba(reused, features), training.predict_proba(fresh, features), atol=1e-6
    )
    # The history a user plots: per-epoch training and validation loss/accuracy, and it learned.
    assert set(history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert history["val_accuracy"][-1] > 0.9 and history["loss"][-1] < history["loss"][0]
    with pytest.raises(ValueError, match="trainer for"):
        trainer.fit(features[:, :1], labels, learning_rate=1e-2)


def test_grid_resumes_finished_cells(tmp_path, monkeypatch):
    features, labels = separable()
    folds = [(np.arange(0, 120, 2), np.arange(1, 120, 2)), (np.arange(1, 120, 2), np.arange(0, 120, 2))]
    kwargs = dict(
        run=tmp_path, backbone="b", n_classes=3, learning_rates=[0.01, 0.001], epochs=3, batch_size=16, progress=False
    )
    rows = training.run_grid(features, labels, folds, **kwargs)
    assert [(r["learning_rate"], r["fold"]) for r in rows] == [(0.01, 0), (0.01, 1), (0.001, 0), (0.001, 1)]

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(training, "fit_head", must_not_train)
    assert training.run_grid(features, labels, folds, **kwargs) == rows


def test_best_rate_by_mean_validation_accuracy():
    rows = [
        {"learning_rate": 0.01, "val_accuracy": 90.0},
        {"learning_rate": 0.01, "val_accuracy": 99.0},
        {"learning_rate": 0.001, "val_accuracy": 95.0},
        {"learning_rate": 0.001, "val_accuracy": 95.0},
        {"learning_rate": 0.0001, "val_accuracy": 96.0},
        {"learning_rate": 0.0001, "val_accuracy": 93.0},
    ]
    assert training.select_best_rate(rows) == 0.001


def test_metrics_match_hand_computation():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    result = metrics.classification_metrics(y_true, y_pred, 3)
    assert result["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert result["accuracy"] == pytest.approx(400 / 6)
    assert result["precision_macro"] == pytest.approx(100 * (0.5 + 2 / 3 + 1) / 3)
    assert result["recall_macro"] == pytest.approx(100 * (0.5 + 1 + 0.5) / 3)
    assert metrics.mean_std([1.0, 3.0]) == {"mean": 2.0, "std": 1.0}


def test_joined_model_agrees_with_features_plus_head(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    backbone = keras.Model(inputs, keras.layers.Conv2D(4, 3, strides=4)(keras.layers.Rescaling(1 / 255)(inputs)))
    images = np.random.default_rng(1).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    features = np.asarray(backbone(images.astype(np.float32)))
    head, _ = training.fit_head(features, np.arange(10) % 2, n_classes=2, epochs=1, batch_size=4)
    joined = training.join_model(backbone, head, "joined")
    agreement = training.check_joined_agrees(joined, head, images, features)
    assert agreement["prediction_agreement"] == 1.0
    path = training.save_model_atomic(joined, tmp_path / "m.keras")
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(reloaded(images.astype(np.float32)), joined(images.astype(np.float32)), atol=1e-6)
    other_head, _ = training.fit_head(features, np.arange(10) % 2, n_classes=2, epochs=1, batch_size=4, seed=9)
    with pytest.raises(AssertionError, match="disagrees"):
        training.check_joined_agrees(joined, other_head, images, features, atol=1e-9)


def test_class_weights_are_sklearns_and_auto_switches_at_two_to_one():
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.repeat([0, 1, 2], [40, 10, 20])
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    np.testing.assert_allclose(training.class_weights(labels, 3, "balanced"), expected, rtol=1e-6)
    np.testing.assert_allclose(training.class_weights(labels, 3, "auto"), expected, rtol=1e-6)  # 40 > 2 x 10
    assert training.class_weights(np.repeat([0, 1, 2], [20, 10, 15]), 3, "auto") is None  # 20 = 2 x 10
    assert training.class_weights(labels, 3, "none") is None


def test_balanced_weights_raise_the_rare_class_recall():
    rng = np.random.default_rng(0)
    counts = (200, 200, 8)
    centres = rng.normal(0, 0.5, (3, 2, 2, 8))  # overlapping classes: the rare one loses without weights
    labels = np.repeat(np.arange(3), counts)
    features = (centres[labels] + rng.normal(0, 1, (len(labels), 2, 2, 8))).astype(np.float32)
    test_labels = np.repeat(np.arange(3), 100)
    test = (centres[test_labels] + rng.normal(0, 1, (300, 2, 2, 8))).astype(np.float32)
    recall = {}
    for mode in ("none", "balanced"):
        head, _ = training.fit_head(
            features,
            labels,
            n_classes=3,
            learning_rate=0.01,
            epochs=10,
            batch_size=32,
            seed=1,
            class_weight=training.class_weights(labels, 3, mode),
        )
        predicted = training.predict_proba(head, test).argmax(1)
        recall[mode] = (predicted[test_labels == 2] == 2).mean()
    assert recall["balanced"] > recall["none"] + 0.2, recall
