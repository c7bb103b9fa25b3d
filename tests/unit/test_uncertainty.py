"""Calibration (temperature, ECE), the out-of-distribution score and its threshold."""

from __future__ import annotations

import io

import numpy as np
import pytest

from steeldefect.data.splits import make_splits
from steeldefect.models import training
from steeldefect.runtime import calibration, uncertainty


def test_ece_matches_a_hand_computed_example():
    # Own bins: |1-0.9|, |0-0.6| (predicts class 0, label 1), |1-0.8|, |1-0.7| -> mean 0.3.
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7]])
    assert calibration.expected_calibration_error(probabilities, np.array([0, 1, 0, 1])) == pytest.approx(0.3)
    # 0.95 and 0.97 share the last of 15 bins; one right, one wrong: |0.5 - 0.96| = 0.46.
    shared = np.array([[0.95, 0.05], [0.97, 0.03]])
    assert calibration.expected_calibration_error(shared, np.array([0, 1])) == pytest.approx(0.46)
    # Confidence exactly 1.0 belongs to the last bin, not past it.
    assert calibration.expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == pytest.approx(0.0)


def _overconfident(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities whose logits are 4x too sharp for how often they are right."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    logits = rng.normal(0, 1, (n, 4))
    logits[np.arange(n), labels] += 1.0
    sharp = 4 * logits
    probabilities = np.exp(sharp - sharp.max(1, keepdims=True))
    return probabilities / probabilities.sum(1, keepdims=True), labels


def test_temperature_lowers_nll_and_ece_of_a_miscalibrated_set():
    probabilities, labels = _overconfident()
    fitted = calibration.fit_calibration(probabilities[:1000], labels[:1000])
    assert fitted["temperature"] == pytest.approx(4.0, rel=0.25)
    assert fitted["nll_after"] < fitted["nll_before"] - 0.3
    # And on rows it was not fitted on.
    held_p, held_y = probabilities[1000:], labels[1000:]
    calibrated = calibration.apply_temperature(held_p, fitted["temperature"])
    assert calibration.negative_log_likelihood(calibrated, held_y) < calibration.negative_log_likelihood(held_p, held_y)
    assert calibration.expected_calibration_error(calibrated, held_y) < 0.5 * calibration.expected_calibration_error(
        held_p, held_y
    )
    assert (calibrated.argmax(1) == held_p.argmax(1)).all()  # temperature never changes the answer


def test_calibration_refuses_test_rows():
    probabilities, labels = _overconfident(50)
    with pytest.raises(ValueError, match="test images"):
        calibration.fit_calibration(probabilities, labels, val_indices=np.arange(50), test_indices=np.array([49, 60]))


class _TableHead:
    """Stands in for a Keras head: 'probabilities' that encode the row they were computed from."""

    def __call__(self, rows, training=False):
        rows = np.asarray(rows)
        return np.stack([rows[:, 0], 1 - rows[:, 0]], axis=1)


def test_out_of_fold_predictions_use_only_validation_rows_never_test():
    labels = np.repeat(np.arange(3), 40)
    splits = make_splits(labels, test_fraction=0.2, n_folds=4, seed=0)
    features = np.arange(len(labels), dtype=np.float64)[:, None] / 1000
    indices, probabilities = training.out_of_fold_probabilities([_TableHead()] * 4, features, splits.folds)
    assert len(np.intersect1d(indices, splits.test_indices)) == 0
    assert sorted(indices) == sorted(splits.train_indices)
    assert np.allclose(probabilities[:, 0], indices / 1000)  # each row scored from its own features


def _clusters(n_per_class: int, rng, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    centres = np.eye(3, 10) * 6
    labels = np.repeat(np.arange(3), n_per_class)
    return centres[labels] + rng.normal(0, 1, (len(labels), 10)) + shift, labels


def test_ood_scorer_threshold_accepts_99_percent_and_flags_shifted_data_without_reading_test_rows():
    rng = np.random.default_rng(0)
    features, labels = _clusters(300, rng)
    splits = make_splits(labels, test_fraction=0.2, n_folds=5, seed=0)
    poisoned = features.copy()
    poisoned[splits.test_indices] = np.nan  # any use of a test row would make the fit NaN
    scorer, oof = uncertainty.fit_ood(poisoned, labels, splits.folds, n_components=8)
    assert np.isfinite(scorer.threshold) and np.isfinite(oof).all()
    accepted = ~scorer.is_uncertain(features[splits.test_indices])
    assert accepted.mean() >= 0.95
    far, _ = _clusters(100, rng, shift=5.0)
    assert scorer.is_uncertain(far).mean() > 0.95
    again = uncertainty.OODScorer.from_dict(scorer.to_dict())
    assert np.allclose(again.score(far), scorer.score(far))


def test_choose_threshold_is_the_accept_quantile_and_checks_its_argument():
    assert uncertainty.choose_threshold(np.arange(101.0), 0.99) == pytest.approx(99.0)
    with pytest.raises(ValueError, match="accept"):
        uncertainty.choose_threshold(np.arange(10.0), 1.5)


@pytest.fixture(scope="module")
def neu_texture(neu_dir, tmp_path_factory):
    """Texture features (LiteRT fp32 of the Lite0 texture model) of 150 real NEU images per class,
    their labels and class names, and the features of the far-OOD examples."""
    from steeldefect.data.dataset import scan_dataset
    from steeldefect.data.loading import load_images
    from steeldefect.models.backbones import build_backbone
    from steeldefect.models.conversion import convert
    from steeldefect.runtime.litert import make_interpreter, predict_tflite

    dataset = scan_dataset(neu_dir)
    rng = np.random.default_rng(0)
    pick = np.sort(
        np.concatenate(
            [rng.choice(np.where(dataset.labels == c)[0], 150, replace=False) for c in range(len(dataset.class_names))]
        )
    )
    subset, images = load_images(dataset.subset(pick), cache_dir=tmp_path_factory.mktemp("cache"), progress=False)
    backbone = build_backbone("efficientnet_lite0")
    channels = [int(backbone.get_layer(n).output.shape[-1]) for n in uncertainty.TEXTURE_LAYERS]
    interpreter = make_interpreter(convert(uncertainty.texture_statistics_model(backbone), "fp32"))
    examples = uncertainty.far_ood_examples(images[0])
    raw = predict_tflite(interpreter, np.concatenate([images, np.stack(list(examples.values()))]))
    features = uncertainty.texture_features(raw, channels)
    far = dict(zip(examples, features[len(images) :]))
    return features[: len(images)], subset.labels, subset.class_names, far


@pytest.mark.integration
def test_far_ood_images_are_flagged_by_a_scorer_fitted_on_real_neu(neu_texture):
    neu, labels, _, far = neu_texture
    splits = make_splits(labels, test_fraction=0.2, n_folds=5, seed=0)
    scorer, _ = uncertainty.fit_ood(neu, labels, splits.folds)
    flagged = dict(zip(far, scorer.is_uncertain(np.stack(list(far.values())))))
    assert all(flagged.values()), [name for name, f in flagged.items() if not f]
    assert scorer.is_uncertain(neu[splits.test_indices]).mean() <= 0.1  # real steel is still accepted


@pytest.mark.integration
def test_with_20_images_per_class_an_unknown_kind_is_flagged_because_the_ridge_is_chosen(neu_texture):
    # The line loop's first model: 20 images of each class but one (85 after the test split). With the
    # first shipped fixed ridge the 64x64 class covariances are nearly singular, held-out training
    # images score far out, and the out-of-fold threshold lets most of the unknown kind through.
    features, labels, names, _ = neu_texture
    left_out = names.index("rolled-in_scale")
    flagged = {"chosen": [], "fixed": []}
    known_flagged, ridges = [], []
    for draw in range(5):
        rng = np.random.default_rng(draw)
        first = np.concatenate(
            [rng.choice(np.where(labels == c)[0], 20, replace=False) for c in range(len(names)) if c != left_out]
        )
        rest = np.setdiff1d(np.arange(len(labels)), first)
        splits = make_splits(labels[first], test_fraction=0.15, n_folds=5, seed=42)
        folds = [(first[train], first[val]) for train, val in splits.folds]
        unknown, known = rest[labels[rest] == left_out], rest[labels[rest] != left_out]
        for name, ridge in (("chosen", None), ("fixed", uncertainty.RIDGE_GRID[0])):
            scorer, _ = uncertainty.fit_ood(features, labels, folds, shrinkage=ridge)
            flagged[name].append(scorer.is_uncertain(features[unknown]).mean())
            if name == "chosen":
                known_flagged.append(scorer.is_uncertain(features[known]).mean())
                ridges.append(scorer.shrinkage)
    assert min(ridges) > uncertainty.RIDGE_GRID[0], ridges
    assert np.mean(flagged["chosen"]) >= 0.5, flagged
    assert np.mean(flagged["chosen"]) >= np.mean(flagged["fixed"]) + 0.3, flagged
    assert max(known_flagged) <= 0.05, known_flagged  # the known classes' other images are still accepted


def test_percentile_combine_flags_when_either_score_is_unusual():
    rng = np.random.default_rng(1)
    reference = [rng.normal(0, 1, 1000), rng.normal(10, 2, 1000)]
    combined_reference = uncertainty.percentile_combine(reference, reference)
    threshold = uncertainty.choose_threshold(combined_reference, 0.99)
    assert (combined_reference > threshold).mean() == pytest.approx(0.01, abs=0.005)  # 99% still accepted
    # Usual on both, unusual only on the first, unusual only on the second.
    queries = [np.array([0.0, 5.0, 0.0]), np.array([10.0, 10.0, 25.0])]
    assert list(uncertainty.percentile_combine(reference, queries) > threshold) == [False, True, True]
    with pytest.raises(ValueError, match="reference"):
        uncertainty.percentile_combine(reference, queries[:1])


def test_a_rule_survives_the_model_file_and_refuses_damaged_arrays():
    from steeldefect.runtime.uncertainty import UncertaintyRule, fit_rule

    rng = np.random.default_rng(0)
    labels = np.arange(120) % 3
    texture = rng.normal(size=(120, 2 * (4 + 6))) + labels[:, None]
    texture[100:] = np.nan  # "test" rows: the fit must never read them
    probabilities = rng.dirichlet(np.ones(3), size=120)
    probabilities[100:] = np.nan
    folds = [(np.setdiff1d(np.arange(100), part), part) for part in np.array_split(np.arange(100), 4)]
    rule = fit_rule(labels, folds, probabilities, texture_raw=texture, channels=(4, 6), n_components=8)
    assert np.isfinite(rule.threshold) and rule.uses_texture
    again = UncertaintyRule.from_npz_bytes(rule.to_npz_bytes())
    fresh = rng.normal(size=(20, 20)) + 1
    fresh_p = rng.dirichlet(np.ones(3), size=20)
    assert np.array_equal(again.scores(fresh_p, fresh), rule.scores(fresh_p, fresh))
    # a looser acceptance flags at least as many
    assert rule.with_accept(0.5).uncertain(fresh_p, fresh).sum() >= rule.uncertain(fresh_p, fresh).sum()
    with pytest.raises(ValueError, match="uncertainty.npz"):
        UncertaintyRule.from_npz_bytes(b"not an archive")
    broken = dict(np.load(__import__("io").BytesIO(rule.to_npz_bytes())))
    broken["projection"] = broken["projection"][:3]
    buffer = __import__("io").BytesIO()
    np.savez(buffer, **broken)
    with pytest.raises(ValueError, match="does not hold an uncertainty rule"):
        UncertaintyRule.from_npz_bytes(buffer.getvalue())


@pytest.mark.integration
def test_the_deploy_model_flags_far_ood_inputs_and_accepts_the_test_split(pooled_neu_run, neu_dir, tmp_path, capsys):
    """The real pipeline end to end: `train` + `export` give RUN/deploy/model.int8.tflite a texture
    output and its own rule; it flags every far-OOD picture and few NEU test images, through
    the Python API and through `steeldefect predict RUN`."""
    from PIL import Image

    from steeldefect import cli
    from steeldefect.core.runfolder import deployable_model
    from steeldefect.runtime.modelfile import Classifier
    from steeldefect.runtime.uncertainty import far_ood_examples
    from steeldefect.study.rundata import load_run_data

    pytest.importorskip("skimage", reason="scikit-image (test extra) provides the far-OOD photographs")
    model = deployable_model(pooled_neu_run)
    classifier = Classifier(model)
    assert classifier.rule is not None and classifier.rule.uses_texture
    prepared, _ = load_run_data(pooled_neu_run, progress=False)
    test_images = prepared.images[prepared.splits.test_indices]
    flagged_test = classifier.judge(test_images).uncertain.mean()
    assert flagged_test <= 0.05, f"{flagged_test:.1%} of the NEU test split flagged"
    images = neu_dir / "IMAGES" if (neu_dir / "IMAGES").is_dir() else neu_dir
    neu_image = np.asarray(Image.open(images / "crazing_1.jpg").convert("RGB"))
    examples = far_ood_examples(neu_image, classifier.info.input_size)
    judgement = classifier.judge(np.stack(list(examples.values())))
    missed = [name for name, flag in zip(examples, judgement.uncertain) if not flag]
    assert not missed, f"far-OOD inputs accepted as steel: {missed}"
    # the command line says so too, for a picture saved as a file
    Image.fromarray(examples["photo:astronaut"]).save(tmp_path / "astronaut.png")
    assert cli.main(["--quiet", "predict", str(pooled_neu_run), str(tmp_path / "astronaut.png")]) == 0
    out = capsys.readouterr().out
    assert "UNCERTAIN" in out and "1 uncertain" in out


def _tight_and_thin(rng, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Two classes of very different shapes: a tight round one at 0 and a long thin one at x = 6."""
    tight = rng.normal(0, 0.2, (n, 3))
    thin = rng.normal(0, 1, (n, 3)) * [4.0, 0.3, 0.3] + [6.0, 0.0, 0.0]
    return np.vstack([tight, thin]), np.repeat([0, 1], n)


def test_per_class_score_is_the_gaussian_negative_log_likelihood_of_the_nearest_class():
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(2)
    features, labels = _tight_and_thin(rng)
    scorer = uncertainty.OODScorer(n_components=3, shrinkage=1e-9, class_covariance=1.0).fit(features, labels)
    queries = rng.normal(0, 3, (20, 3))
    expected = []
    for c in (0, 1):
        z = (features[labels == c] - scorer.center_) @ scorer.projection_
        gaussian = multivariate_normal(z.mean(0), np.cov(z.T, bias=True))
        expected.append(-2 * gaussian.logpdf((queries - scorer.center_) @ scorer.projection_) - 3 * np.log(2 * np.pi))
    assert np.allclose(scorer.score(queries), np.min(expected, axis=0), rtol=1e-6)
    with pytest.raises(ValueError, match="class_covariance"):
        uncertainty.OODScorer(n_components=3, class_covariance=1.5).fit(features, labels)


def test_per_class_covariance_flags_what_the_tied_one_misses():
    # Two classes of equal volume, one long along x, one long along y: the shared covariance is broad in
    # both directions, so an image 2 units off the x-class sideways (where that class is 0.3 thin) looks
    # ordinary to the tied score. Both scorers get their threshold from out-of-fold scores.
    rng = np.random.default_rng(3)
    along_x = rng.normal(0, 1, (400, 3)) * [3.0, 0.3, 0.3]
    along_y = rng.normal(0, 1, (400, 3)) * [0.3, 3.0, 0.3] + [0.0, 0.0, 4.0]
    features, labels = np.vstack([along_x, along_y]), np.repeat([0, 1], 400)
    splits = make_splits(labels, test_fraction=0.2, n_folds=5, seed=0)
    beside = rng.normal(0, 1, (100, 3)) * [3.0, 0.3, 0.3] + [0.0, 2.0, 0.0]
    tied, _ = uncertainty.fit_ood(features, labels, splits.folds, n_components=3, class_covariance=0.0)
    per_class, _ = uncertainty.fit_ood(features, labels, splits.folds, n_components=3, class_covariance=1.0)
    assert per_class.is_uncertain(beside).mean() > 0.95
    assert tied.is_uncertain(beside).mean() < 0.1
    for scorer in (tied, per_class):
        assert scorer.is_uncertain(features[splits.test_indices]).mean() <= 0.03  # known images still accepted
        again = uncertainty.OODScorer.from_dict(scorer.to_dict())
        assert np.allclose(again.score(beside), scorer.score(beside))
    default, _ = uncertainty.fit_ood(features, labels, splits.folds, n_components=3)
    assert default.class_covariance == uncertainty.DEFAULT_CLASS_COVARIANCE > 0  # what fit_rule ships


def test_own_class_score_is_the_nearest_class_score_for_an_image_nearest_its_own_class():
    rng = np.random.default_rng(4)
    features, labels = _tight_and_thin(rng)
    for class_covariance in (0.5, 1.0):  # (the tied score leaves out its log determinant, shared by all)
        scorer = uncertainty.OODScorer(n_components=3, class_covariance=class_covariance).fit(features, labels)
        own = scorer.own_class_scores(features, labels)
        assert (own >= scorer.score(features) - 1e-9).all()  # the nearest class is never farther than one's own
        centres = np.array([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0]])
        assert np.allclose(scorer.own_class_scores(centres, [0, 1]), scorer.score(centres))


@pytest.mark.integration
def test_with_150_neu_images_per_class_the_chosen_ridge_is_the_first_shipped_one(neu_texture):
    # So a rule fitted on a full training split (as on all of NEU) is the rule the fixed ridge gave.
    features, labels, _, _ = neu_texture
    splits = make_splits(labels, test_fraction=0.2, n_folds=5, seed=0)
    chosen, chosen_oof = uncertainty.fit_ood(features, labels, splits.folds)
    fixed, fixed_oof = uncertainty.fit_ood(features, labels, splits.folds, shrinkage=0.01)
    assert chosen.shrinkage == uncertainty.RIDGE_GRID[0] == 0.01
    assert chosen.threshold == fixed.threshold and np.array_equal(chosen_oof, fixed_oof)


def _rule(class_covariance: float) -> tuple[uncertainty.UncertaintyRule, np.ndarray, np.ndarray]:
    """A rule fitted on synthetic 'texture statistics' (raw layout: per layer mean, mean of squares)."""
    rng = np.random.default_rng(4)
    channels = (3, 5)
    labels = np.repeat(np.arange(3), 60)
    mean = rng.normal(0, 1, (3, 8))[labels] + rng.normal(0, 0.3, (len(labels), 8))
    raw = np.hstack([mean[:, :3], mean[:, :3] ** 2 + 0.5, mean[:, 3:], mean[:, 3:] ** 2 + 0.5])
    splits = make_splits(labels, test_fraction=0.2, n_folds=4, seed=0)
    probabilities = np.full((len(labels), 3), 0.1)
    probabilities[np.arange(len(labels)), labels] = 0.8
    rule = uncertainty.fit_rule(
        labels,
        splits.folds,
        probabilities,
        texture_raw=raw,
        channels=channels,
        n_components=6,
        class_covariance=class_covariance,
    )
    return rule, probabilities, raw


def test_rule_files_keep_the_per_class_score_and_older_tied_files_still_read():
    per_class, probabilities, raw = _rule(uncertainty.DEFAULT_CLASS_COVARIANCE)
    tied, _, _ = _rule(0.0)
    assert per_class.describe()["method"] == uncertainty.RULE_METHOD_CLASS_COVARIANCE
    assert tied.describe()["method"] == uncertainty.RULE_METHOD
    for rule in (per_class, tied):
        data = rule.to_npz_bytes()
        again = uncertainty.UncertaintyRule.from_npz_bytes(data)
        assert np.allclose(again.scores(probabilities, raw), rule.scores(probabilities, raw))
        assert again.scorer.class_covariance == rule.scorer.class_covariance
    # A tied file, as written before per-class covariances existed, has none of the new arrays.
    with np.load(io.BytesIO(tied.to_npz_bytes())) as archive:
        assert not {"class_whitening", "log_determinants", "class_covariance"} & set(archive.files)
    assert not np.allclose(
        per_class.scorer.score(per_class.scorer.center_[None]), tied.scorer.score(tied.scorer.center_[None])
    )


@pytest.mark.parametrize("damage", ["drop log_determinants", "wrong class_whitening shape", "zero class_covariance"])
def test_rule_file_with_inconsistent_per_class_arrays_is_refused(damage):
    rule, _, _ = _rule(uncertainty.DEFAULT_CLASS_COVARIANCE)
    with np.load(io.BytesIO(rule.to_npz_bytes())) as archive:
        arrays = {name: archive[name] for name in archive.files}
    if damage == "drop log_determinants":
        del arrays["log_determinants"]
    elif damage == "wrong class_whitening shape":
        arrays["class_whitening"] = arrays["class_whitening"][:, :-1]
    else:
        arrays["class_covariance"] = np.float64(0.0)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with pytest.raises(ValueError, match=uncertainty.RULE_FILE):
        uncertainty.UncertaintyRule.from_npz_bytes(buffer.getvalue())
