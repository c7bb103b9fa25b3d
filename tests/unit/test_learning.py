"""Few and imbalanced images: `train --augment K` (augmented rows only from training images, views
cached and reused) and `learning-curve` (stratified reproducible draws, refusals, the CLI end to end
on the tiny backbone)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from steeldefect import cli
from steeldefect.core.files import read_json
from steeldefect.models import augfeatures, training
from steeldefect.study import learningcurve, learningcurve_points, pipeline, rundata
from tiny import AUGMENT_KEY, CLASSES, FAST_TRAIN, TINY, build_tiny, curve_args

FAST = FAST_TRAIN


# --- augmented rows -----------------------------------------------------------------------------


def test_training_rows_take_views_of_the_fold_training_images_only():
    labels = np.repeat(np.arange(3), 20)
    splits = training_split(labels)
    features = np.arange(len(labels), dtype=np.float32)[:, None]  # a row's value is its image index
    pool = splits.train_indices
    k = 3
    # An augmented row's value is 1000 + the index of the image it was made from.
    augmented = augfeatures.AugmentedFeatures(
        (1000 + np.tile(pool, k)).astype(np.float32)[:, None], np.tile(pool, k), 0
    )
    for fold_train, fold_val in splits.folds:
        x, y = augfeatures.training_rows(features, labels, fold_train, augmented)
        origins = np.where(x[:, 0] >= 1000, x[:, 0] - 1000, x[:, 0]).astype(int)
        assert len(x) == len(fold_train) * (k + 1)
        assert set(origins) == set(fold_train.tolist())
        assert not set(origins) & set(fold_val.tolist())
        assert not set(origins) & set(splits.test_indices.tolist())
        np.testing.assert_array_equal(y, labels[origins])


def training_split(labels):
    from steeldefect.data.splits import make_splits

    return make_splits(labels, test_fraction=0.2, n_folds=2, seed=0)


def test_train_augment_extracts_views_of_training_images_only_and_trains_on_them(tiny_env, tmp_path, monkeypatch):
    seen_sources, row_calls = [], []
    real_features, real_rows = augfeatures.augmented_features, training.training_rows

    def spy_features(*args, **kwargs):
        seen_sources.append(np.array(args[2]))
        return real_features(*args, **kwargs)

    def spy_rows(features, labels, train_indices, augmented):
        x, y = real_rows(features, labels, train_indices, augmented)
        row_calls.append((np.array(train_indices), len(x)))
        return x, y

    monkeypatch.setattr(augfeatures, "augmented_features", spy_features)
    monkeypatch.setattr(training, "training_rows", spy_rows)
    run = tmp_path / "run"
    summary = pipeline.train(tiny_env, run, backbones=[TINY], head="pooled", augment=2, **FAST)
    assert summary["backbones"][TINY]["status"] == "done"

    prepared, _ = rundata.load_run_data(run, progress=False)
    splits = prepared.splits
    (sources,) = seen_sources
    np.testing.assert_array_equal(sources, splits.train_indices)
    assert not set(sources.tolist()) & set(splits.test_indices.tolist())
    # Two grid folds then the final head: each trained on its own images plus 2 views of each.
    expected = [fold_train for fold_train, _ in splits.folds] + [splits.train_indices]
    assert len(row_calls) == len(expected)
    for (train_indices, n_rows), wanted in zip(row_calls, expected):
        np.testing.assert_array_equal(train_indices, wanted)
        assert n_rows == 3 * len(wanted)


def test_augmented_views_are_cached_and_reused(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    builds = []

    def factory():
        builds.append(1)
        return build_tiny(None, True, (32, 32, 3))

    settings = dict(AUGMENT_KEY, cache_dir=tmp_path)
    sources = np.array([1, 2, 5, 7])
    first = augfeatures.augmented_features(factory, images, sources, k=2, **settings)
    assert first.extracted_views == 2 and len(builds) == 1
    assert first.features.shape == (8, 16)
    np.testing.assert_array_equal(first.sources, [1, 2, 5, 7, 1, 2, 5, 7])

    again = augfeatures.augmented_features(factory, images, sources, k=2, **settings)
    assert again.extracted_views == 0 and len(builds) == 1  # no backbone built, nothing extracted
    np.testing.assert_array_equal(again.features, first.features)

    more = augfeatures.augmented_features(factory, images, sources, k=3, **settings)
    assert more.extracted_views == 1  # views 0 and 1 come from the cache
    np.testing.assert_array_equal(more.features[:8], first.features)
    # The two views differ (they are augmented, not copies), and other sources get another key.
    assert not np.allclose(first.features[:4], first.features[4:])
    other = augfeatures.augmented_features(factory, images, np.array([1, 2, 5]), k=1, **settings)
    assert other.extracted_views == 1


def test_flatten_augment_beyond_the_memory_budget_is_refused_in_one_line():
    augfeatures.check_memory(8, 1530, (7, 7, 1280), pooled=True)  # pooled: 1280 floats a view, fine
    augfeatures.check_memory(3, 1530, (7, 7, 1280), pooled=False)
    with pytest.raises(ValueError, match=r"--augment 8 with --head flatten .* --augment 3 or less") as error:
        augfeatures.check_memory(8, 1530, (7, 7, 1280), pooled=False)
    assert "\n" not in str(error.value)


# --- learning-curve draws -----------------------------------------------------------------------


def test_draws_are_stratified_reproducible_nested_and_from_the_pool():
    labels = np.repeat(np.arange(4), 30)
    pool = np.sort(np.random.default_rng(1).choice(len(labels), 100, replace=False))
    counts = [5, 5, 5, 5]
    sample = learningcurve_points.draw_sample(labels, pool, counts, seed=7, draw=0)
    assert np.bincount(labels[sample], minlength=4).tolist() == counts
    assert set(sample.tolist()) <= set(pool.tolist())
    np.testing.assert_array_equal(sample, learningcurve_points.draw_sample(labels, pool, counts, seed=7, draw=0))
    assert not np.array_equal(sample, learningcurve_points.draw_sample(labels, pool, counts, seed=7, draw=1))
    assert not np.array_equal(sample, learningcurve_points.draw_sample(labels, pool, counts, seed=8, draw=0))
    bigger = learningcurve_points.draw_sample(labels, pool, [10, 10, 10, 10], seed=7, draw=0)
    assert set(sample.tolist()) <= set(bigger.tolist())
    profile = learningcurve_points.draw_sample(labels, pool, [20, 10, 4, 2], seed=7, draw=0)
    assert np.bincount(labels[profile], minlength=4).tolist() == [20, 10, 4, 2]


def test_imbalance_profile_assigns_counts_in_the_class_order():
    names = ["a", "b", "c"]
    (point,) = learningcurve_points.make_points([30, 10, 2], names, [("c", "a", "b")])
    assert point.counts == (10, 2, 30) and point.label == "30/10/2"
    with pytest.raises(ValueError, match=r"--class-order c a d: unknown class\(es\) d; missing b"):
        learningcurve_points.make_points([30, 10, 2], names, [("c", "a", "d")])
    with pytest.raises(ValueError, match="needs one count per class, 3"):
        learningcurve_points.make_points([30, 10], names, [("c", "a", "b")])


def test_class_with_fewer_images_than_asked_is_refused_naming_it():
    labels = np.array([0] * 10 + [1] * 3)
    point = learningcurve_points.Point((5, 5), ())
    with pytest.raises(ValueError, match=r"class 'rare' has 3 training images, fewer than the 5 asked") as error:
        learningcurve_points.check_pool(point, labels, ["common", "rare"])
    assert "common" not in str(error.value)


# --- the CLI end to end -------------------------------------------------------------------------


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_learning_curve_end_to_end_and_resumes(tiny_env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "curve"
    args = curve_args(
        tiny_env, out, "--per-class", "2", "4", "--draws", "2", "--methods", "frozen", "augmented", "--augment", "2"
    )
    assert cli.main(args) == 0
    rows = read_csv(out / "learning_curve.csv")
    assert len(rows) == 2 * 2 * 2  # points x methods x draws
    assert {(r["point"], r["method"]) for r in rows} == {(p, m) for p in ("2", "4") for m in ("frozen", "augmented")}
    for row in rows:
        assert row["counts"] == "/".join([row["point"]] * 3)
        assert 0 <= float(row["accuracy"]) <= 100 and float(row["seconds"]) > 0
        assert {f"recall_{name}" for name in CLASSES} <= row.keys()
    augmented = [r for r in rows if r["method"] == "augmented"]
    assert all(int(r["n_train_rows"]) == 3 * 3 * int(r["point"]) for r in augmented)  # images + 2 views each
    summary = read_csv(out / "learning_curve_summary.csv")
    assert len(summary) == 4 and {s["draws"] for s in summary} == {"2"}
    report = (out / "report.md").read_text()
    assert "- 2 per class: **" in report and "- 4 per class: **" in report
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "report:" in capsys.readouterr().out

    # A re-run trains nothing: every row is in the CSV already.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished row was trained again")

    monkeypatch.setattr(learningcurve, "_train_and_score", no_training)
    assert cli.main(args) == 0
    assert read_csv(out / "learning_curve.csv") == rows


def test_cli_imbalance_profile_in_two_orders(tiny_env, tmp_path):
    out = tmp_path / "profile"
    args = curve_args(
        tiny_env,
        out,
        "--per-class",
        "6",
        "3",
        "2",
        "--draws",
        "1",
        "--methods",
        "frozen",
        "--class-weight",
        "none",
        "balanced",
        "--class-order",
        "dots",
        "stripes",
        "flat",
        "--class-order",
        "flat",
        "dots",
        "stripes",
    )
    assert cli.main(args) == 0
    rows = read_csv(out / "learning_curve.csv")
    assert len(rows) == 2 * 2  # orders x class weights
    by_order = {r["order"]: r for r in rows if r["class_weight"] == "none"}
    # counts are listed in the dataset's class order: dots, flat, stripes
    assert by_order["dots>stripes>flat"]["counts"] == "6/2/3"
    assert by_order["flat>dots>stripes"]["counts"] == "3/6/2"
    assert by_order["dots>stripes>flat"]["rarest_class"] == "flat"
    assert by_order["flat>dots>stripes"]["rarest_class"] == "stripes"
    assert (out / "imbalance.png").is_file()
    assert read_json(out / "learning_curve.json")["class_orders"][1] == ["flat", "dots", "stripes"]


def test_cli_refuses_a_class_too_small_in_one_line(tiny_env, tmp_path, capsys):
    # 12 images per class, 15% held out for the test split: 10 left per class for the draws.
    assert cli.main(curve_args(tiny_env, tmp_path / "big", "--per-class", "50", "--methods", "frozen")) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --per-class 50: class 'dots' has ") and "fewer than the 50 asked" in error
    assert "\n" not in error
    assert not (tmp_path / "big").exists()  # refused before anything was written


def test_cli_fine_tuned_method_trains_and_scores_every_draw(tiny_env, tmp_path):
    """The fine-tuned method end to end on the tiny backbone: one row per point and draw, scored on the
    fixed test split (the real figures are the README's)."""
    import csv

    out = tmp_path / "ft"
    args = ("--methods", "fine-tuned", "--fine-tune-epochs", "1", "--per-class", "3", "6", "--draws", "2")
    assert cli.main(curve_args(tiny_env, out, *args)) == 0
    rows = list(csv.DictReader((out / "learning_curve.csv").open()))
    assert len(rows) == 4 and {row["method"] for row in rows} == {"fine-tuned"}
    assert all(0.0 <= float(row["accuracy"]) <= 100.0 for row in rows)


def test_class_weights_scale_the_loss_without_breaking_its_gradient():
    """Uniform class weights of 2 must train the same head as none, with twice the loss; scaling
    the one-hot target instead made TensorFlow's fused gradient wrong and the head diverge."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    x = (rng.normal(0, 1, (60, 8)) + 3 * np.eye(3, 8)[labels]).astype(np.float32)
    trainer = training.HeadTrainer((8,), 3, kind="flatten", batch_size=16)
    plain, plain_history = trainer.fit(x, labels, learning_rate=0.01, epochs=30, seed=1)
    doubled, doubled_history = trainer.fit(
        x, labels, learning_rate=0.01, epochs=30, seed=1, class_weight=np.full(3, 2.0, np.float32)
    )
    np.testing.assert_allclose(doubled_history["loss"], 2 * np.array(plain_history["loss"]), rtol=0.05, atol=1e-3)
    np.testing.assert_array_equal(
        training.predict_proba(doubled, x).argmax(1), training.predict_proba(plain, x).argmax(1)
    )
