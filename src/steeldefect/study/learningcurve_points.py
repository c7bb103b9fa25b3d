"""The learning curve's points and draws: images per class for each point (balanced or an imbalance
profile), the check that the pool holds them, the seeded draw of a sample from the pool, and the
training steps a sample size gets. Used by :mod:`steeldefect.study.learningcurve` and its report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Point:
    """Images per class for one point: ``counts[c]`` for class index ``c``."""

    counts: tuple[int, ...]
    order: tuple[str, ...]  # the class order an imbalance profile was assigned in; () for a balanced point

    @property
    def label(self) -> str:
        if not self.order:
            return str(self.counts[0])
        return "/".join(str(n) for n in sorted(self.counts, reverse=True))

    @property
    def order_label(self) -> str:
        return ">".join(self.order)

    @property
    def balanced(self) -> bool:
        return not self.order


def make_points(
    per_class: Sequence[int], class_names: Sequence[str], class_orders: Sequence[Sequence[str]] = ()
) -> list[Point]:
    """Balanced points (one per count), or with ``class_orders`` one imbalance profile per order:
    ``per_class[i]`` images of the class ``order[i]``. Refuses an order that is not a permutation
    of the dataset's classes, or a profile with a count per class missing."""
    if not class_orders:
        return [Point(tuple([int(n)] * len(class_names)), ()) for n in per_class]
    if len(per_class) != len(class_names):
        raise ValueError(
            f"--per-class: an imbalance profile (--class-order) needs one count per class, "
            f"{len(class_names)} for {', '.join(class_names)}; got {len(per_class)}"
        )
    points = []
    for order in class_orders:
        unknown = [name for name in order if name not in class_names]
        missing = [name for name in class_names if name not in order]
        if unknown or missing or len(order) != len(class_names):
            problem = "; ".join(
                part
                for part in (
                    f"unknown class(es) {', '.join(unknown)}" if unknown else "",
                    f"missing {', '.join(missing)}" if missing else "",
                    "a class named twice" if not unknown and not missing else "",
                )
                if part
            )
            raise ValueError(f"--class-order {' '.join(order)}: {problem} (the classes are {', '.join(class_names)})")
        counts = [0] * len(class_names)
        for name, n in zip(order, per_class):
            counts[list(class_names).index(name)] = int(n)
        points.append(Point(tuple(counts), tuple(order)))
    return points


def check_pool(point: Point, pool_labels: np.ndarray, class_names: Sequence[str]) -> None:
    """One line naming every class with fewer training images than the point asks for."""
    have = np.bincount(pool_labels, minlength=len(class_names))
    short = [
        f"class {class_names[c]!r} has {have[c]} training images, fewer than the {n} asked"
        for c, n in enumerate(point.counts)
        if n > have[c]
    ]
    if short:
        raise ValueError(f"--per-class {point.label}: {'; '.join(short)}")


def draw_sample(labels: np.ndarray, pool: np.ndarray, counts: Sequence[int], *, seed: int, draw: int) -> np.ndarray:
    """Sorted dataset indices: ``counts[c]`` images of each class ``c`` from ``pool``, the first
    ones of a permutation seeded by (seed, draw, class): stratified, reproducible and nested."""
    from steeldefect.models.training import derived_seed

    chosen = []
    for cls, n in enumerate(counts):
        members = np.sort(pool[labels[pool] == cls])
        if n > len(members):
            raise ValueError(f"class {cls} has {len(members)} training images, fewer than the {n} asked")
        order = np.random.default_rng(derived_seed(seed, "learning-curve", draw, cls)).permutation(members)
        chosen.append(order[:n])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def rarest_class(counts: Sequence[int], recalls: Sequence[float]) -> int:
    """The class with the fewest training images; among equals (a balanced point), the one with
    the lowest recall, so a balanced point reports its worst class."""
    fewest = min(counts)
    return min((c for c, n in enumerate(counts) if n == fewest), key=lambda c: recalls[c])


def steps_to_epochs(n_rows: int, batch_size: int, steps: int) -> tuple[int, int]:
    """(batch size, epochs) giving at least ``steps`` Adam steps over ``n_rows`` rows."""
    batch = max(1, min(batch_size, n_rows))
    per_epoch = math.ceil(n_rows / batch)
    return batch, max(1, math.ceil(steps / per_epoch))
