"""The pointing-game bench's feature-map methods (bench/pointing_game.py --select-on): the closed-form
Grad-CAM equals steeldefect.deploy.explain's, the local head is the pooled head applied to each cell, and
shifted / turned views land back where they came from."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from steeldefect.deploy import explain


def _pooled_model(seed: int = 0) -> keras.Model:
    """Pixels -> a stride-8 "backbone" ending in a layer named head_relu (4x4x6 for 32x32 input) ->
    a nested pooled head (GAP -> Dense 5 ReLU -> Dense 3 softmax), shaped like a run's pooled model."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(6, 8, strides=8, name="head_conv")(inputs)
    x = keras.layers.ReLU(name="head_relu")(x)
    features = keras.Input((4, 4, 6), name="features")
    h = keras.layers.GlobalAveragePooling2D()(features)
    h = keras.layers.Dense(5, activation="relu")(h)
    head = keras.Model(features, keras.layers.Dense(3, activation="softmax", name="probabilities")(h), name="head")
    return keras.Model(inputs, head(x))


def _images(n: int = 5) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, 32, 32, 3)).astype(np.float32)


def test_closed_form_grad_cam_equals_explain_grad_cam(pg):
    model = _pooled_model()
    images = _images()
    weights = pg.head_dense_weights(model)
    feats = pg.features_of(pg.feature_model(model, 32), images)
    classes = np.array([0, 1, 2, 1, 0])
    cells = pg.cell_scores(feats, weights, classes)
    expected = explain.grad_cam(model, images, classes, "head_relu")
    assert np.allclose(pg.to_input_map(cells["gradcam"], 32), expected, atol=1e-5)
    layercam = explain.grad_cam(model, images, classes, "head_relu", method="layercam")
    assert np.allclose(pg.to_input_map(cells["layercam"], 32), layercam, atol=1e-5)


def test_local_head_is_the_pooled_head_on_each_cell(pg):
    model = _pooled_model()
    images = _images()
    weights = pg.head_dense_weights(model)
    feats = pg.features_of(pg.feature_model(model, 32), images)
    # The pooled head's logits reproduce the model's probabilities.
    logits, _ = pg.mlp_logits(feats.mean(axis=(1, 2)), weights)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert np.allclose(probabilities, model.predict(images, verbose=0), atol=1e-5)
    classes = probabilities.argmax(axis=1)
    cells = pg.cell_scores(feats, weights, classes)
    head = model.layers[-1]
    for n, y, x in [(0, 0, 0), (3, 2, 1), (4, 3, 3)]:
        # A map whose every cell holds this one cell's vector pools to that vector.
        alone = np.broadcast_to(feats[n, y, x], (1, 4, 4, 6))
        p = np.asarray(head(alone))[0]
        final = head.layers[-1]
        final.activation = keras.activations.linear
        try:
            logit = np.asarray(head(alone))[0]
        finally:
            final.activation = keras.activations.softmax
        c = classes[n]
        assert np.isclose(cells["local logit"][n, y, x], logit[c], atol=1e-4)
        assert np.isclose(cells["local contrast"][n, y, x], logit[c] - logit.mean(), atol=1e-4)
        assert np.isclose(cells["local margin"][n, y, x], logit[c] - np.delete(logit, c).max(), atol=1e-4)
        log_odds = np.log(p[c]) - np.log(np.delete(p, c).sum())
        assert np.isclose(cells["local log-odds"][n, y, x], log_odds, atol=1e-4)


def test_a_cell_that_drives_the_class_is_the_local_heads_maximum(pg):
    # Head: class 1's logit grows with channel 0, so the cell where channel 0 is largest wins.
    weights = [
        (np.eye(3, dtype=np.float32), np.zeros(3, np.float32)),
        (np.array([[0.0, 4.0], [1.0, 0.0], [1.0, 0.0]], np.float32), np.zeros(2, np.float32)),
    ]
    feats = np.full((1, 7, 7, 3), 0.5, np.float32)
    feats[0, 2, 5, 0] = 3.0
    cells = pg.cell_scores(feats, weights, np.array([1]))
    for scorer in ("local logit", "local log-odds", "local margin", "local contrast", "gradcam", "layercam"):
        assert np.unravel_index(cells[scorer][0].argmax(), (7, 7)) == (2, 5), scorer


def test_shifted_copies_interleave_into_a_finer_grid(pg):
    assert pg.shift_offsets(2) == [-8, 8] and pg.shift_offsets(3) == [-11, 0, 11]
    image = np.arange(2 * 40 * 40 * 3, dtype=np.float32).reshape(2, 40, 40, 3)
    moved = pg.shifted(image, 8, -8)
    assert np.array_equal(moved[:, 10:30, 10:30], image[:, 18:38, 2:22])  # out[y, x] = image[y + 8, x - 8]
    views = pg.family_views("shift2")
    per_view = {v: {"s": np.full((1, 7, 7), 10 * v[2] + v[3], np.float32)} for v in views}
    grid = pg.family_cells("shift2", per_view)["s"][0]
    assert grid.shape == (14, 14)
    # Row 2i + a holds the copy whose cell centres moved by offset a (content read 8 px lower for a = 1).
    assert grid[0, 0] == 0 and grid[0, 1] == 1 and grid[1, 0] == 10 and grid[13, 13] == 11


@pytest.mark.parametrize("t", range(8))
def test_dihedral_views_turn_back(pg, t):
    x = np.random.default_rng(t).random((2, 7, 7))
    assert np.array_equal(pg.undo_dihedral(pg.dihedral(x, t), t), x)
    if t:
        assert not np.array_equal(pg.dihedral(x, t), x)


def test_score_cam_points_at_the_channel_that_raises_the_class(pg):
    """A "backbone" whose head_relu cells are the mean of the pixels' first two colour channels, and a
    head whose class 1 needs channel 0: with both channels as bright in one cell each, Score-CAM's map
    of class 1 peaks where channel 0 is bright (equal channel weights would pick the other cell)."""
    inputs = keras.Input((32, 32, 3))
    conv = keras.layers.Conv2D(2, 8, strides=8, name="head_conv")
    x = keras.layers.ReLU(name="head_relu")(conv(inputs))
    features = keras.Input((4, 4, 2))
    head = keras.Model(
        features,
        keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(features)),
        name="head",
    )
    model = keras.Model(inputs, head(x))
    kernel = np.zeros((8, 8, 3, 2), np.float32)
    kernel[..., 0, 0] = 1 / 64 / 255
    kernel[..., 1, 1] = 1 / 64 / 255
    conv.set_weights([kernel, np.zeros(2, np.float32)])
    head.layers[-1].set_weights([np.array([[0.0, 40.0], [40.0, 0.0]], np.float32), np.zeros(2, np.float32)])
    images = np.full((1, 32, 32, 3), 40.0, np.float32)
    images[0, 24:32, 16:24, 0] = 255.0  # channel 0 bright in cell (3, 2)
    images[0, 0:8, 8:16, 1] = 255.0  # channel 1 as bright in cell (0, 1), first in raster order: wins a tie
    cells = pg.score_cam_cells(
        pg.feature_model(model, 32), pg.head_dense_weights(model), images, np.array([1]), top_k=2
    )
    assert np.unravel_index(cells["scorecam"][0].argmax(), (4, 4)) == (3, 2)


def test_a_model_without_a_pooled_dense_head_is_refused(pg):
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.ReLU(name="head_relu")(keras.layers.Conv2D(6, 8, strides=8)(inputs))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1)(x))
    with pytest.raises(ValueError, match="pooled Dense head"):
        pg.head_dense_weights(model)


def test_a_border_plateau_counts_where_the_overlay_marks_it(pg):
    # A 7x7 map whose highest cell is the bottom-left corner; the box starts 20 px in from the left
    # edge (grown by 15 px: from x 5 on), so the edge pixel argmax picks misses it and the plateau's
    # centre, where explain_files.save_overlay draws the cross, hits it.
    cells = np.zeros((1, 7, 7), np.float32)
    cells[0, 6, 0] = 1.0
    maps = pg.to_input_map(cells)
    mask = np.zeros((1, pg.SIZE, pg.SIZE), bool)
    mask[0, 165:, 5:80] = True
    assert not pg.hits(maps, mask)[0]
    assert pg.hits(maps, mask, tie="centre")[0]
    with pytest.raises(ValueError, match="tie must be"):
        pg.hits(maps, mask, tie="last")


def test_models_bench_chooses_the_best_validation_smoothing_that_passes_the_sanity_check(pg):
    import importlib.util

    path = Path(pg.__file__).with_name("pointing_game_models.py")
    spec = importlib.util.spec_from_file_location("bench_pointing_game_models", path)
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)

    def entry(overall, lowest, rhos):
        return {
            "out_of_fold": {"centre": {"overall": overall, "lowest": lowest}},
            "sanity_median_spearman": {f"fold{k}": r for k, r in enumerate(rhos)},
        }

    entries = {
        0.0: entry(0.92, 0.79, [0.3, 0.25]),
        0.5: entry(0.95, 0.84, [0.45, 0.49]),
        0.6: entry(0.95, 0.86, [0.47, 0.48]),  # same overall, better weakest class
        1.0: entry(0.97, 0.90, [0.45, 0.51]),  # best pointing, but one fold fails the sanity check
    }
    assert models.choose(entries) == 0.6
    assert models.choose({1.0: entries[1.0]}) is None
