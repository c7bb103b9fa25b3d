"""Unit tests for steeldefect.data.splits."""

from __future__ import annotations

import numpy as np
import pytest

from steeldefect.data.dataset import scan_dataset
from steeldefect.data.splits import Splits, make_splits, read_splits_csv, write_splits_csv


def _labels(per_class: int = 40, n_classes: int = 6) -> np.ndarray:
    return np.repeat(np.arange(n_classes), per_class)


def test_test_split_is_stratified_and_disjoint():
    labels = _labels(300)  # NEU shape: 6 x 300

    splits = make_splits(labels, test_fraction=0.15, n_folds=5, seed=42)

    assert len(splits.test_indices) == 270 and len(splits.train_indices) == 1530
    assert np.bincount(labels[splits.test_indices]).tolist() == [45] * 6
    assert np.intersect1d(splits.test_indices, splits.train_indices).size == 0
    assert np.array_equal(np.union1d(splits.test_indices, splits.train_indices), np.arange(len(labels)))
    assert all(np.all(np.diff(a) > 0) for a in (splits.test_indices, splits.train_indices))
    assert (splits.seed, splits.test_fraction, splits.n_folds) == (42, 0.15, 5)


def test_folds_cover_the_training_part_exactly_once():
    labels = _labels(300)
    splits = make_splits(labels, test_fraction=0.15, n_folds=5, seed=42)

    validation = np.concatenate([val for _, val in splits.folds])
    assert np.array_equal(np.sort(validation), splits.train_indices)  # every train image validated once
    for fold_train, fold_val in splits.folds:
        assert len(fold_val) == 306
        assert np.bincount(labels[fold_val]).tolist() == [51] * 6  # stratified folds
        assert np.intersect1d(fold_train, fold_val).size == 0
        assert np.array_equal(np.union1d(fold_train, fold_val), splits.train_indices)
        assert np.intersect1d(fold_train, splits.test_indices).size == 0
        assert np.all(np.diff(fold_train) > 0) and np.all(np.diff(fold_val) > 0)


def test_fold_of_and_role_of():
    splits = make_splits(_labels(20), test_fraction=0.25, n_folds=3, seed=1)
    test_index = int(splits.test_indices[0])
    assert splits.fold_of(test_index) is None and splits.role_of(test_index) == "test"
    for k, (_, val) in enumerate(splits.folds):
        assert splits.fold_of(int(val[0])) == k
        assert splits.role_of(int(val[-1])) == f"fold{k}"
    with pytest.raises(IndexError):
        splits.fold_of(10_000)


def test_same_seed_same_split_other_seed_differs():
    labels = _labels(30)
    a = make_splits(labels, seed=7)
    assert a == make_splits(labels, seed=7)
    assert a != make_splits(labels, seed=8)


def test_sklearn_protocol_is_followed():
    # Guards the documented recipe: stratified train_test_split, then StratifiedKFold on the rest.
    from sklearn.model_selection import StratifiedKFold, train_test_split

    labels = _labels(25)
    splits = make_splits(labels, test_fraction=0.2, n_folds=4, seed=3)
    train, test = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=3, shuffle=True)
    assert np.array_equal(splits.test_indices, np.sort(test))
    expected = [
        np.sort(train[v]) for _, v in StratifiedKFold(4, shuffle=True, random_state=3).split(train, labels[train])
    ]
    assert all(np.array_equal(val, exp) for (_, val), exp in zip(splits.folds, expected))


@pytest.mark.parametrize(
    ("labels", "kwargs", "message"),
    [
        (np.array([0] * 10 + [1] * 1), {}, "class 1: only 1 image"),
        (np.array([0] * 10 + [1] * 5), {"n_folds": 5}, "class 'b' has 4 training image"),
        (np.array([0, 0, 1, 1, 2, 2]), {"test_fraction": 0.15}, "fewer than the 3 classes"),
        (np.array([0, 1] * 10), {"n_folds": 1}, "n_folds must be at least 2"),
        (np.array([0, 1] * 10), {"test_fraction": 1.5}, "test_fraction"),
    ],
)
def test_too_small_classes_give_clear_errors(labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_splits(labels, class_names=("a", "b", "c") if "'b'" in message else None, **kwargs)


def test_splits_csv_is_deterministic_and_round_trips(tmp_path, make_neu_dataset):
    dataset = scan_dataset(make_neu_dataset(tmp_path / "data", per_class=10))
    splits = make_splits(dataset.labels, test_fraction=0.2, n_folds=3, seed=42)

    first = write_splits_csv(tmp_path / "a" / "splits.csv", dataset, splits)
    second = write_splits_csv(
        tmp_path / "b" / "splits.csv", dataset, make_splits(dataset.labels, test_fraction=0.2, n_folds=3, seed=42)
    )
    other = write_splits_csv(
        tmp_path / "c" / "splits.csv", dataset, make_splits(dataset.labels, test_fraction=0.2, n_folds=3, seed=43)
    )

    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    lines = first.read_text().splitlines()
    assert lines[0] == "file,class,role"
    assert [line.split(",")[0] for line in lines[1:]] == list(dataset.relative_names)  # dataset order
    assert {line.split(",")[2] for line in lines[1:]} == {"test", "fold0", "fold1", "fold2"}
    assert lines[1].split(",")[1] == "crazing"

    restored = read_splits_csv(first, dataset)
    assert isinstance(restored, Splits)
    assert restored == splits
    assert restored.n_folds == 3 and restored.seed is None


def test_read_splits_csv_rejects_a_different_dataset(tmp_path, make_neu_dataset, make_image):
    root = make_neu_dataset(tmp_path / "data", per_class=10)
    dataset = scan_dataset(root)
    path = write_splits_csv(tmp_path / "splits.csv", dataset, make_splits(dataset.labels, test_fraction=0.2, n_folds=3))

    make_image(root / "crazing_11.jpg")
    with pytest.raises(ValueError, match="crazing_11.jpg is in the dataset but not in the split file"):
        read_splits_csv(path, scan_dataset(root))

    (root / "crazing_11.jpg").unlink()
    (root / "crazing_10.jpg").unlink()
    with pytest.raises(ValueError, match="crazing_10.jpg is not in the dataset"):
        read_splits_csv(path, scan_dataset(root))


def test_write_splits_csv_rejects_a_mismatched_split(tmp_path, make_neu_dataset):
    dataset = scan_dataset(make_neu_dataset(tmp_path / "data", per_class=10))
    splits = make_splits(np.repeat(np.arange(6), 5), test_fraction=0.2, n_folds=2)
    with pytest.raises(ValueError, match="covers 30 images but the dataset has 60"):
        write_splits_csv(tmp_path / "splits.csv", dataset, splits)
