"""Stratified test split and cross-validation folds, and their CSV record.

The protocol follows the reference study (hold out a test set, then k-fold cross-validation on the rest
with ``random_state=seed``), except that the test split is stratified so every class is held out in
proportion; on NEU at 15% that is 45 test images per class.

Every index is a position in the FULL dataset (not in the training part), and every index array is
sorted, so a split can be compared, stored and reloaded without knowing how it was produced.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from steeldefect.core.files import write_csv

if TYPE_CHECKING:  # data imports this module; the type is only needed for annotations
    from steeldefect.data.dataset import Dataset


@dataclass(frozen=True, eq=False)
class Splits:
    """A test set plus ``n_folds`` (train, validation) pairs over the rest.

    ``seed`` and ``test_fraction`` are ``None`` when the split was read back from a CSV, which records
    only the partition. ``==`` compares the partition (test indices and every fold), which is what a
    resumed run has to match.
    """

    test_indices: np.ndarray
    train_indices: np.ndarray
    folds: tuple[tuple[np.ndarray, np.ndarray], ...]  # (train_idx, val_idx), indices into the full dataset
    seed: int | None
    test_fraction: float | None
    n_folds: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "test_indices", _frozen_indices(self.test_indices))
        object.__setattr__(self, "train_indices", _frozen_indices(self.train_indices))
        object.__setattr__(
            self, "folds", tuple((_frozen_indices(train), _frozen_indices(val)) for train, val in self.folds)
        )
        if len(self.folds) != self.n_folds:
            raise ValueError(f"n_folds is {self.n_folds} but {len(self.folds)} folds were given")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Splits):
            return NotImplemented
        return (
            np.array_equal(self.test_indices, other.test_indices)
            and np.array_equal(self.train_indices, other.train_indices)
            and len(self.folds) == len(other.folds)
            and all(
                np.array_equal(a_train, b_train) and np.array_equal(a_val, b_val)
                for (a_train, a_val), (b_train, b_val) in zip(self.folds, other.folds)
            )
        )

    __hash__ = None  # type: ignore[assignment]  # mutable-looking array contents: not hashable

    def fold_of(self, index: int) -> int | None:
        """The fold whose validation set holds ``index``; ``None`` for a test image."""
        if _contains(self.test_indices, index):
            return None
        for k, (_, val) in enumerate(self.folds):
            if _contains(val, index):
                return k
        raise IndexError(f"index {index} is in neither the test set nor any validation fold")

    def role_of(self, index: int) -> str:
        """``"test"`` or ``"fold<k>"`` (k = the fold in which the image is validated), as in the CSV."""
        fold = self.fold_of(index)
        return "test" if fold is None else f"fold{fold}"


def minimum_class_size(test_fraction: float, n_folds: int) -> int:
    """Images a class needs so that a stratified split can give it at least one test image and
    ``n_folds`` training images (one per validation fold)."""
    return max(n_folds + 1, math.ceil(1.0 / test_fraction - 1e-9))


def make_splits(
    labels: Sequence[int] | np.ndarray,
    *,
    test_fraction: float = 0.15,
    n_folds: int = 5,
    seed: int = 42,
    class_names: Sequence[str] | None = None,
) -> Splits:
    """Stratified hold-out test set, then ``StratifiedKFold(n_folds, shuffle=True, random_state=seed)``
    over the remaining images. Raises ValueError naming the class when one is too small for the split;
    ``class_names`` (optional) only makes that message readable.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError("labels must be a non-empty 1-D sequence")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")

    def describe(label: Any) -> str:
        label = label.item() if isinstance(label, np.generic) else label
        if class_names is not None and isinstance(label, (int, np.integer)) and 0 <= label < len(class_names):
            return f"class {class_names[int(label)]!r}"
        return f"class {label!r}"

    classes, counts = np.unique(labels, return_counts=True)
    # sklearn rounds a fractional test size up; computing it here lets the error say what went wrong.
    n_test = math.ceil(test_fraction * len(labels))
    if n_test < len(classes):
        raise ValueError(
            f"a test fraction of {test_fraction} of {len(labels)} images gives {n_test} test images, "
            f"fewer than the {len(classes)} classes; a stratified split needs at least one per class"
        )
    singletons = [describe(c) for c, n in zip(classes, counts) if n < 2]
    if singletons:
        raise ValueError(f"{', '.join(singletons)}: only 1 image; a stratified test split needs at least 2 per class")

    indices = np.arange(len(labels))
    train_indices, test_indices = train_test_split(
        indices, test_size=test_fraction, stratify=labels, random_state=seed, shuffle=True
    )
    # A class with no test image would be reported with a recall of 0 and averaged into the macro
    # figures: refuse it instead.
    untested = [f"{describe(c)} ({n} images)" for c, n in zip(classes, counts) if not np.any(labels[test_indices] == c)]
    if untested:
        raise ValueError(
            f"{', '.join(untested)}: no image left for the test split at a test fraction of {test_fraction}; "
            f"each class needs at least {minimum_class_size(test_fraction, n_folds)} images "
            f"for a test fraction of {test_fraction} and {n_folds} folds"
        )
    train_classes, train_counts = np.unique(labels[train_indices], return_counts=True)
    too_small = [f"{describe(c)} has {n} training image(s)" for c, n in zip(train_classes, train_counts) if n < n_folds]
    too_small += [f"{describe(c)} has 0 training images" for c in classes if c not in train_classes]
    if too_small:
        raise ValueError(
            f"after holding out the test set, {'; '.join(too_small)}; {n_folds}-fold cross-validation "
            f"needs at least {n_folds} per class"
        )

    # Folds are drawn over the training part in the order train_test_split returned it, as the
    # reference does with its X_train; only the outputs are sorted.
    folder = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = tuple(
        (np.sort(train_indices[fold_train]), np.sort(train_indices[fold_val]))
        for fold_train, fold_val in folder.split(train_indices, labels[train_indices])
    )
    return Splits(
        test_indices=np.sort(test_indices),
        train_indices=np.sort(train_indices),
        folds=folds,
        seed=seed,
        test_fraction=test_fraction,
        n_folds=n_folds,
    )


def write_splits_csv(path: str | os.PathLike, dataset: Dataset, splits: Splits) -> Path:
    """Write ``file,class,role`` in dataset order; role is ``test`` or ``fold<k>``.

    Deterministic: the same data and seed give a byte-identical file, so it can be diffed or hashed.
    """
    covered = len(splits.test_indices) + sum(len(val) for _, val in splits.folds)
    if covered != len(dataset):
        raise ValueError(f"the split covers {covered} images but the dataset has {len(dataset)}")
    names = dataset.relative_names
    rows = [
        {"file": names[i], "class": dataset.class_names[dataset.labels[i]], "role": splits.role_of(i)}
        for i in range(len(dataset))
    ]
    return write_csv(path, rows, fieldnames=("file", "class", "role"))


def read_splits_csv(path: str | os.PathLike, dataset: Dataset) -> Splits:
    """Rebuild the :class:`Splits` recorded by :func:`write_splits_csv` for ``dataset``.

    Raises ValueError when the file does not describe exactly this dataset (missing or extra files, a
    changed class), so a resumed run cannot silently continue on a different split.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"file", "class", "role"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns file,class,role, found {reader.fieldnames}")
        rows = list(reader)

    index_of = {name: i for i, name in enumerate(dataset.relative_names)}
    problems: list[str] = []
    roles: dict[int, str] = {}
    for line, row in enumerate(rows, start=2):
        i = index_of.get(row["file"])
        if i is None:
            problems.append(f"{path}:{line}: {row['file']} is not in the dataset")
            continue
        expected_class = dataset.class_names[dataset.labels[i]]
        if row["class"] != expected_class:
            problems.append(f"{path}:{line}: {row['file']} is recorded as {row['class']!r}, now {expected_class!r}")
        role = row["role"]
        if role != "test" and not (role.startswith("fold") and role[4:].isdigit()):
            problems.append(f"{path}:{line}: unknown role {role!r} (expected test or fold<k>)")
        if i in roles:
            problems.append(f"{path}:{line}: {row['file']} is listed twice")
        roles[i] = role
    missing = [name for name, i in index_of.items() if i not in roles]
    problems += [f"{path}: {name} is in the dataset but not in the split file" for name in missing]
    if problems:
        raise ValueError("\n".join(problems))

    test = np.array(sorted(i for i, role in roles.items() if role == "test"), dtype=np.int64)
    fold_numbers = sorted({int(role[4:]) for role in roles.values() if role != "test"})
    n_folds = len(fold_numbers)
    if fold_numbers != list(range(n_folds)):
        raise ValueError(f"{path}: folds must be numbered fold0..fold{n_folds - 1}, found {fold_numbers}")
    validation = [
        np.array(sorted(i for i, role in roles.items() if role == f"fold{k}"), dtype=np.int64) for k in range(n_folds)
    ]
    train = np.sort(np.concatenate(validation)) if validation else np.array([], dtype=np.int64)
    folds = tuple((np.setdiff1d(train, val), val) for val in validation)
    return Splits(test_indices=test, train_indices=train, folds=folds, seed=None, test_fraction=None, n_folds=n_folds)


def _frozen_indices(values: Any) -> np.ndarray:
    # Sorted so membership tests can use binary search and equal partitions compare equal.
    array = np.sort(np.array(values, dtype=np.int64).reshape(-1))
    array.setflags(write=False)
    return array


def _contains(sorted_values: np.ndarray, value: int) -> bool:
    position = int(np.searchsorted(sorted_values, value))
    return position < len(sorted_values) and sorted_values[position] == value
