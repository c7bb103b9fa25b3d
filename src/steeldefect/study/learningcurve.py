"""`learning-curve`: how accuracy grows with the images a plant has, and how an imbalanced set hurts.

The test split is the one `train` makes with the same seed and test fraction; it never changes.
For each point (a count per class) and seeded draw, a stratified sample of the training pool is
drawn, each method is trained on it and scored on the test split:

- ``frozen``: the reference pooled head (Dense 128 -> Dense 64 -> softmax) on cached Lite0 features;
- ``augmented``: the same head, with K augmented views of each sampled image as extra rows;
- ``fine-tuned``: ``steeldefect.models.finetune.fine_tune_model`` started from the frozen head;
- ``multilayer``: the same head on the channel means of five Lite0 layers side by side
  (``backbones.multilayer_model``), with the 7 exact flips/90-degree rotations of each sampled image
  as extra rows: what ``train --features multilayer --augment 7 --augment-views dihedral`` does.

Heads train for a fixed number of Adam steps, not epochs: with 30 images an epoch is one step, with
1,530 it is 24, so "15 epochs" would mean 15 steps at 5 images per class. The defaults, 1,000 steps
at a learning rate of 0.001, are the same for every sample size and method: 0.001 is the rate the
full-data grid chose for the pooled head with augmented rows (`train --head pooled --augment 8`);
0.01 with 300 steps (the plain pooled grid's choice, 15 epochs x 20 batches) was tried first and
was unstable on small samples (README, "Few and imbalanced images").

Draws are nested and reproducible: draw ``d`` takes, for every class, the first n images of a
permutation of that class's training images seeded by (seed, d, class), so the 10-image sample
contains the 5-image one and an imbalanced profile shares its images with the balanced points.
Every finished row is written at once (atomically) to learning_curve.csv; a re-run skips them.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from steeldefect.core.files import atomic_write_bytes, atomic_write_text, default_cache_dir, write_csv, write_json
from steeldefect.core.options import DIHEDRAL_VIEWS, LearningCurveOptions

log = logging.getLogger(__name__)

CSV_NAME = "learning_curve.csv"
SUMMARY_NAME = "learning_curve_summary.csv"
PLOT_NAME = "learning_curve.png"
IMBALANCE_PLOT_NAME = "imbalance.png"
REPORT_NAME = "report.md"
# The columns that identify a row: a re-run with the same values skips it.
KEY_FIELDS = (
    "backbone",
    "point",
    "order",
    "method",
    "class_weight",
    "augment",
    "steps",
    "learning_rate",
    "seed",
    "draw",
)


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


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def row_key(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(_key_text(row[name]) for name in KEY_FIELDS)


def _key_text(value: Any) -> str:
    """One spelling per value whether it comes from the options or back from the CSV (0.01, "0.01")."""
    text = str(value)
    try:
        return str(int(text))
    except ValueError:
        pass
    try:
        return f"{float(text):g}"
    except ValueError:
        return text


def learning_curve(
    data: Path,
    out: Path,
    options: LearningCurveOptions,
    *,
    class_orders: Sequence[Sequence[str]] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Train and score every (point, method, class weight, draw) not already in OUT/learning_curve.csv,
    then write the summary CSV, plots and OUT/report.md. Returns {"rows", "summary", "report"}."""
    from steeldefect.models import backbones as backbone_registry
    from steeldefect.study import pipeline

    out = Path(out)
    methods = list(dict.fromkeys(options.methods))
    name = options.backbone
    backbone_registry.get_backbone(name)
    if options.weights == "imagenet":
        backbone_registry.weights_path(name)  # refuse missing weights before any work
    cache_dir = Path(options.cache_dir) if options.cache_dir is not None else default_cache_dir()
    prepared = pipeline.load_data(data, options, progress=progress)
    dataset, images, splits = prepared.dataset, prepared.images, prepared.splits
    class_names = list(dataset.class_names)
    labels = np.asarray(dataset.labels)
    pool, test_idx = splits.train_indices, splits.test_indices
    points = make_points(options.per_class, class_names, class_orders)
    for point in points:
        check_pool(point, labels[pool], class_names)
    pipeline._prepare_out(out)

    weights_key = backbone_registry.cache_weights_id(name, options.weights, options.seed)
    get_backbone = backbone_registry.backbone_factory(
        name,
        weights=options.weights,
        preprocessing=options.preprocessing,
        seed=options.seed,
        image_size=images.shape[1:3],
    )

    from steeldefect.models.features import cached_features

    cache_key = dict(
        dataset_fingerprint=prepared.fingerprint,
        backbone=name,
        weights_id=weights_key,
        preprocessing=options.preprocessing,
        cache_dir=cache_dir,
        progress=progress,
    )
    features, _, _ = cached_features(get_backbone, images, **cache_key)
    map_shape = tuple(features.shape[1:])
    pooled = features.mean(axis=(1, 2)) if features.ndim == 4 else features.reshape(len(features), -1)
    del features

    csv_path = out / CSV_NAME
    rows = read_rows(csv_path)
    done = {row_key(row) for row in rows}
    plan = []
    for point in points:
        for method in methods:
            for weight_mode in options.class_weights:
                for draw in range(options.draws):
                    row = _row_identity(options, point, method, weight_mode, draw, name)
                    if row_key(row) not in done:
                        plan.append((point, method, weight_mode, draw, row))
    log.info(
        "learning curve: %d points x %d methods x %d class weights x %d draws, %d rows to train (%d done before)",
        len(points),
        len(methods),
        len(options.class_weights),
        options.draws,
        len(plan),
        len(points) * len(methods) * len(options.class_weights) * options.draws - len(plan),
    )

    from steeldefect.models.augfeatures import augmented_features

    # What each method's head trains on: (features of every image, augmented views of the pool or None,
    # features of the test images' 7 flips/rotations for test-time averaging or None).
    inputs: dict[str, tuple[np.ndarray, Any, Any]] = {
        "frozen": (pooled, None, None),
        "fine-tuned": (pooled, None, None),
    }
    extraction_seconds = 0.0
    planned = {method for _, method, _, _, _ in plan}
    started = time.perf_counter()
    if "augmented" in planned:
        inputs["augmented"] = (
            pooled,
            augmented_features(
                get_backbone, images, pool, k=options.augment, seed=options.seed, pooled=True, **cache_key
            ),
            None,
        )
    if planned & {"multilayer", "multilayer-tta"}:
        # With multilayer-tta, also the test images' own flips/rotations: only ever averaged into
        # their scores (never training rows), as `export --tta` files do inside the model.
        features_ml, augmented_ml, test_views = multilayer_inputs(
            prepared,
            pool,
            options,
            cache_dir,
            test_idx=test_idx if "multilayer-tta" in planned else None,
            progress=progress,
        )
        inputs["multilayer"] = (features_ml, augmented_ml, None)
        inputs["multilayer-tta"] = (features_ml, augmented_ml, test_views)
    extraction_seconds = time.perf_counter() - started

    trainers: dict[tuple[int, int], Any] = {}
    with tqdm(total=len(plan), desc="learning curve", unit="row", disable=not progress) as bar:
        for point, method, weight_mode, draw, identity in plan:
            bar.set_postfix_str(f"{point.label} {method} {weight_mode} draw {draw}")
            started = time.perf_counter()
            sample = draw_sample(labels, pool, point.counts, seed=options.seed, draw=draw)
            probabilities, n_rows = _train_and_score(
                method,
                sample,
                labels,
                *inputs[method][:2],
                images,
                inputs[method][2],
                test_idx,
                trainers,
                options=options,
                weight_mode=weight_mode,
                n_classes=len(class_names),
                map_shape=map_shape,
                draw=draw,
                backbone=name,
                progress=progress,
            )
            row = {**identity, **_scores(labels[test_idx], probabilities, point, class_names)}
            row["n_train_rows"] = n_rows
            row["seconds"] = round(time.perf_counter() - started, 2)
            rows.append(row)
            write_csv(csv_path, rows, fieldnames=_fieldnames(rows))
            bar.update(1)

    current = [row for row in rows if _matches(row, options, points, methods, name)]
    summary = summarise(current, points, class_names)
    write_csv(out / SUMMARY_NAME, summary)
    write_json(
        out / "learning_curve.json",
        {
            "data": str(Path(data).resolve()),
            "options": options.record(),
            "class_orders": [list(order) for order in class_orders],
            "dataset_fingerprint": prepared.fingerprint,
            "n_test": int(len(test_idx)),
            "pool_per_class": np.bincount(labels[pool], minlength=len(class_names)).tolist(),
            "augmented_feature_seconds_this_run": round(extraction_seconds, 1),
        },
    )
    plots = write_plots(out, summary)
    report = write_report(out, summary, options, class_names, len(test_idx), plots)
    return {"rows": current, "summary": summary, "report": report}


def multilayer_inputs(
    prepared: Any,
    pool: np.ndarray,
    options: LearningCurveOptions,
    cache_dir: Path,
    *,
    test_idx: np.ndarray | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, Any, Any]:
    """The ``multilayer`` methods' inputs, cached like `train`'s: multi-layer features of every image,
    the 7 dihedral views of the ``pool`` images, and with ``test_idx`` the 7 views of those test
    images (for the 8-view average; else None)."""
    from steeldefect.models import backbones as backbone_registry
    from steeldefect.models.augfeatures import augmented_features
    from steeldefect.models.features import cached_features

    name = options.backbone
    backbone_registry.check_features(name, "multilayer")
    get_multilayer = backbone_registry.backbone_factory(
        name,
        weights=options.weights,
        preprocessing=options.preprocessing,
        seed=options.seed,
        image_size=prepared.images.shape[1:3],
        features="multilayer",
    )
    cache_key = dict(
        dataset_fingerprint=prepared.fingerprint,
        backbone=backbone_registry.feature_name(name, "multilayer"),
        weights_id=backbone_registry.cache_weights_id(name, options.weights, options.seed),
        preprocessing=options.preprocessing,
        cache_dir=cache_dir,
        progress=progress,
    )
    features, _, _ = cached_features(get_multilayer, prepared.images, **cache_key)

    def views(sources: np.ndarray) -> Any:
        return augmented_features(
            get_multilayer,
            prepared.images,
            sources,
            k=DIHEDRAL_VIEWS,
            seed=options.seed,
            pooled=False,
            views="dihedral",
            **cache_key,
        )

    return features, views(pool), None if test_idx is None else views(test_idx)


def _row_identity(
    options: LearningCurveOptions, point: Point, method: str, weight_mode: str, draw: int, backbone: str
) -> dict[str, Any]:
    return {
        "backbone": backbone,
        "point": point.label,
        "order": point.order_label,
        "method": method,
        "class_weight": weight_mode,
        "augment": {"augmented": options.augment, "multilayer": DIHEDRAL_VIEWS, "multilayer-tta": DIHEDRAL_VIEWS}.get(
            method, 0
        ),
        "steps": options.steps,
        "learning_rate": options.learning_rate,
        "seed": options.seed,
        "draw": draw,
    }


def _matches(row: dict[str, Any], options, points, methods, backbone) -> bool:
    wanted = {
        row_key(_row_identity(options, point, method, weight, draw, backbone))
        for point in points
        for method in methods
        for weight in options.class_weights
        for draw in range(options.draws)
    }
    return row_key(row) in wanted


def _fieldnames(rows: Sequence[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for row in rows:
        names += [key for key in row if key not in names]
    return names


def fit_head(
    sample: np.ndarray,
    labels: np.ndarray,
    features: np.ndarray,
    augmented: Any,
    trainers: dict[tuple[int, int], Any],
    *,
    options: LearningCurveOptions,
    weight_mode: str,
    n_classes: int,
    draw: int,
) -> tuple[Any, int]:
    """The head a draw trains (on ``sample``'s rows of ``features`` plus their ``augmented`` views),
    seeded by (seed, draw, sample size) as in the learning curve, and how many rows it trained on.
    ``trainers`` caches one compiled trainer per batch size and feature width across calls."""
    from steeldefect.models import training
    from steeldefect.models.augfeatures import training_rows

    weights = training.class_weights(labels[sample], n_classes, weight_mode)
    x, y = training_rows(features, labels, sample, augmented)
    batch, epochs = steps_to_epochs(len(x), options.batch_size, options.steps)
    trainer_key = (batch, int(x.shape[1]))
    if trainer_key not in trainers:
        trainers[trainer_key] = training.HeadTrainer(x.shape[1:], n_classes, kind="flatten", batch_size=batch)
    seed = training.derived_seed(options.seed, "learning-curve-head", draw, len(sample))
    head, _ = trainers[trainer_key].fit(
        x, y, learning_rate=options.learning_rate, epochs=epochs, seed=seed, class_weight=weights
    )
    return head, len(x)


def _train_and_score(
    method: str,
    sample: np.ndarray,
    labels: np.ndarray,
    features: np.ndarray,
    augmented: Any,
    images: np.ndarray,
    test_views: Any,
    test_idx: np.ndarray,
    trainers: dict[tuple[int, int], Any],
    *,
    options: LearningCurveOptions,
    weight_mode: str,
    n_classes: int,
    map_shape: tuple[int, ...],
    draw: int,
    backbone: str,
    progress: bool,
) -> tuple[np.ndarray, int]:
    """Class probabilities of the test images from one method trained on ``sample``, and how many
    rows it trained on."""
    from steeldefect.models import training

    head, n_rows = fit_head(
        sample,
        labels,
        features,
        augmented,
        trainers,
        options=options,
        weight_mode=weight_mode,
        n_classes=n_classes,
        draw=draw,
    )
    if method != "fine-tuned":
        probabilities = training.predict_proba(head, features[test_idx])
        if test_views is not None:  # the mean over the image and its 7 views, row-aligned with test_idx
            views = test_views.features.reshape(-1, len(test_idx), *features.shape[1:])
            probabilities = (probabilities + sum(training.predict_proba(head, v) for v in views)) / (1 + len(views))
        return probabilities, n_rows
    weights = training.class_weights(labels[sample], n_classes, weight_mode)
    seed = training.derived_seed(options.seed, "learning-curve-head", draw, len(sample))

    from steeldefect.models import (
        finetune,  # The same Dense stack behind GlobalAveragePooling2D: a head that sits on the backbone's maps.
    )

    start = training.build_head(map_shape, n_classes, kind="pooled")
    start.set_weights(head.get_weights())
    model = finetune.fine_tune_model(
        backbone,
        images,
        labels,
        sample,
        head_model=start,
        blocks=options.fine_tune_blocks,
        learning_rate=options.fine_tune_learning_rate,
        epochs=options.fine_tune_epochs,
        seed=seed,
        class_weight=weights,
        progress=progress,
    )
    probabilities = model.predict(images[test_idx].astype(np.float32), batch_size=32, verbose=0)
    return np.asarray(probabilities), len(sample)


def _scores(y_true: np.ndarray, probabilities: np.ndarray, point: Point, class_names: Sequence[str]) -> dict[str, Any]:
    from steeldefect.core.metrics import classification_metrics

    metrics = classification_metrics(y_true, np.asarray(probabilities).argmax(axis=1), len(class_names))
    recalls = metrics["recall_per_class"]
    rarest = rarest_class(point.counts, recalls)
    return {
        "counts": "/".join(str(n) for n in point.counts),
        "n_train": int(sum(point.counts)),
        "accuracy": round(metrics["accuracy"], 4),
        "recall_macro": round(metrics["recall_macro"], 4),
        "rarest_class": class_names[rarest],
        "rarest_recall": round(recalls[rarest], 4),
        **{f"recall_{name}": round(value, 4) for name, value in zip(class_names, recalls)},
    }


SUMMARY_METRICS = ("accuracy", "recall_macro", "rarest_recall", "seconds")


def summarise(rows: Sequence[dict[str, Any]], points: Sequence[Point], class_names: Sequence[str]) -> list[dict]:
    """Mean and std (population, as the rest of the tool) over draws for each point x method x
    class weight, in the order the points were asked."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(
            (row["point"], row["order"], row["method"], row["class_weight"], str(row["augment"])), []
        ).append(row)
    order = {(p.label, p.order_label): i for i, p in enumerate(points)}
    summary = []
    for (point, class_order, method, weight, augment), members in sorted(
        groups.items(), key=lambda item: (order.get(item[0][:2], len(order)), item[0][2:])
    ):
        entry: dict[str, Any] = {
            "point": point,
            "order": class_order,
            "method": method,
            "class_weight": weight,
            "augment": augment,
            "draws": len(members),
            "balanced": class_order == "",
        }
        for metric in SUMMARY_METRICS:
            values = np.array([float(m[metric]) for m in members])
            entry[f"{metric}_mean"] = round(float(values.mean()), 3)
            entry[f"{metric}_std"] = round(float(values.std()), 3)
        rarest = sorted({m["rarest_class"] for m in members})
        entry["rarest_class"] = " ".join(rarest)
        for name in class_names:
            values = [float(m[f"recall_{name}"]) for m in members if f"recall_{name}" in m]
            entry[f"recall_{name}_mean"] = round(float(np.mean(values)), 3) if values else ""
        summary.append(entry)
    return summary


def _method(entry: dict[str, Any]) -> str:
    if entry["method"] == "multilayer":
        return f"multilayer + dihedral K={entry['augment']}"
    if entry["method"] == "multilayer-tta":
        return f"multilayer + dihedral K={entry['augment']}, 8-view test average"
    return entry["method"] + (f" K={entry['augment']}" if entry["method"] == "augmented" else "")


def _variant(entry: dict[str, Any]) -> str:
    return f"{_method(entry)}, weights {entry['class_weight']}"


def write_plots(out: Path, summary: Sequence[dict[str, Any]]) -> list[str]:
    """learning_curve.png (balanced points: accuracy and rarest-class recall vs images per class,
    log x) and imbalance.png (profiles: macro and rarest-class recall per class order)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    written = []
    balanced = [e for e in summary if e["balanced"]]
    if balanced:
        figure = Figure(figsize=(11, 4.2))
        FigureCanvasAgg(figure)
        axes = figure.subplots(1, 2)
        for variant in dict.fromkeys(_variant(e) for e in balanced):
            entries = sorted((e for e in balanced if _variant(e) == variant), key=lambda e: int(e["point"]))
            x = [int(e["point"]) for e in entries]
            for ax, metric in zip(axes, ("accuracy", "rarest_recall")):
                ax.errorbar(
                    x,
                    [e[f"{metric}_mean"] for e in entries],
                    yerr=[e[f"{metric}_std"] for e in entries],
                    marker="o",
                    capsize=3,
                    label=variant,
                )
        for ax, title in zip(axes, ("test accuracy (%)", "rarest-class recall (%)")):
            ax.set_xscale("log")
            ax.xaxis.set_minor_locator(NullLocator())  # only the measured counts as ticks, no 6x10^0
            ticks = sorted({int(e["point"]) for e in balanced})
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_xlabel("training images per class")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8, loc="lower right")
        figure.tight_layout()
        _save_png(figure, out / PLOT_NAME)
        written.append(PLOT_NAME)
    profiles = [e for e in summary if not e["balanced"]]
    if profiles:
        orders = list(dict.fromkeys(e["order"] for e in profiles))
        variants = list(dict.fromkeys(_variant(e) for e in profiles))
        figure = Figure(figsize=(11, 4.2))
        FigureCanvasAgg(figure)
        axes = figure.subplots(1, 2, sharey=True)
        width = 0.8 / max(len(variants), 1)
        for i, variant in enumerate(variants):
            for ax, metric in zip(axes, ("recall_macro", "rarest_recall")):
                by_order = {e["order"]: e for e in profiles if _variant(e) == variant}
                xs = [j + i * width for j, order in enumerate(orders) if order in by_order]
                ax.bar(
                    xs,
                    [by_order[o][f"{metric}_mean"] for o in orders if o in by_order],
                    width,
                    yerr=[by_order[o][f"{metric}_std"] for o in orders if o in by_order],
                    capsize=2,
                    label=variant,
                )
        for ax, title in zip(axes, ("macro recall (%)", "rarest-class recall (%)")):
            ax.set_xticks(
                [j + 0.4 - width / 2 for j in range(len(orders))], [f"order {j + 1}" for j in range(len(orders))]
            )
            ax.set_title(f"{profiles[0]['point']}: {title}")
            low = min(min(e["recall_macro_mean"], e["rarest_recall_mean"]) for e in profiles)
            ax.set_ylim(max(0, low - 10), 100.5)
            ax.grid(alpha=0.3, axis="y")
        # Below the bars, not over them: with four methods x two class weights the legend inside an
        # axis covered the macro-recall bars.
        handles, names = axes[0].get_legend_handles_labels()
        rows = math.ceil(len(names) / 2)
        figure.set_size_inches(11, 4.2 + 0.22 * rows)
        figure.legend(handles, names, fontsize=7, loc="lower center", ncol=2, frameon=False)
        figure.tight_layout(rect=(0, 0.06 * rows / (1 + 0.05 * rows), 1, 1))
        _save_png(figure, out / IMBALANCE_PLOT_NAME)
        written.append(IMBALANCE_PLOT_NAME)
    return written


def _save_png(figure: Any, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


def _pm(entry: dict[str, Any], metric: str) -> str:
    return f"{entry[f'{metric}_mean']:.2f} ± {entry[f'{metric}_std']:.2f}"


def write_report(
    out: Path,
    summary: Sequence[dict[str, Any]],
    options: LearningCurveOptions,
    class_names: Sequence[str],
    n_test: int,
    plots: Sequence[str],
) -> Path:
    """OUT/report.md: the summary table (mean ± std over draws), the best method per point, plots."""
    lines = [
        "# Learning curve",
        "",
        f"Backbone {options.backbone}; test split: {n_test} images (seed {options.seed}, test fraction "
        f"{options.test_fraction}, the split `train` makes); {options.draws} seeded draws per point; heads: "
        f"pooled Dense 128 -> 64 -> softmax, {options.steps} Adam steps at {options.learning_rate:g}, batch "
        f"<= {options.batch_size}. Mean ± std over draws; seconds = training and scoring one draw "
        "(augmented features are extracted once per run, before, and cached).",
        "",
        "Methods: frozen = the head on the last feature map's channel means (1,280 values); augmented = the "
        "same plus K random views (flips, transposes, shifts, brightness, contrast) of each sampled image; "
        "multilayer = the head on the channel means of five backbone layers (4,736 values) plus the 7 "
        "flips/90-degree rotations of each sampled image (`train --features multilayer --augment 7 "
        "--augment-views dihedral`); fine-tuned = the top blocks fine-tuned from the frozen head.",
        "",
        "| images per class | class order | method | class weights | accuracy % | macro recall % "
        "| rarest-class recall % | rarest class | s / draw |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        lines.append(
            f"| {e['point']} | {e['order'] or '-'} | {_method(e)} | {e['class_weight']} | {_pm(e, 'accuracy')} "
            f"| {_pm(e, 'recall_macro')} | {_pm(e, 'rarest_recall')} | {e['rarest_class']} "
            f"| {e['seconds_mean']:.1f} |"
        )
    lines += ["", "Best per point (balanced points by accuracy, imbalance profiles by macro recall):", ""]
    keys = list(dict.fromkeys((e["point"], e["order"]) for e in summary))
    for key in keys:
        entries = [e for e in summary if (e["point"], e["order"]) == key]
        metric = "accuracy" if entries[0]["balanced"] else "recall_macro"
        metric_name = "accuracy" if metric == "accuracy" else "macro recall"
        best = max(entries, key=lambda e: e[f"{metric}_mean"])
        where = f"{key[0]} per class" if not key[1] else f"{key[0]} in order {key[1]}"
        lines.append(
            f"- {where}: **{_variant(best)}**, {metric_name} {_pm(best, metric)}%, "
            f"rarest-class recall {_pm(best, 'rarest_recall')}%"
        )
    for plot in plots:
        lines += ["", f"![{plot}]({plot})"]
    path = out / REPORT_NAME
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
