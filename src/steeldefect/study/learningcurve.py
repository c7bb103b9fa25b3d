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
was unstable on small samples (docs/design-notes.md).

Draws are nested and reproducible: draw ``d`` takes, for every class, the first n images of a
permutation of that class's training images seeded by (seed, d, class), so the 10-image sample
contains the 5-image one and an imbalanced profile shares its images with the balanced points.
Every finished row is written at once (atomically) to learning_curve.csv; a re-run skips them.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from steeldefect.core.files import default_cache_dir, write_csv, write_json
from steeldefect.core.options import DIHEDRAL_VIEWS, LearningCurveOptions
from steeldefect.study.learningcurve_points import (
    Point,
    check_pool,
    draw_sample,
    make_points,
    rarest_class,
    steps_to_epochs,
)
from steeldefect.study.learningcurve_report import summarise, write_plots, write_report

log = logging.getLogger(__name__)

CSV_NAME = "learning_curve.csv"
SUMMARY_NAME = "learning_curve_summary.csv"
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
    from steeldefect.study import rundata, training_stage

    out = Path(out)
    methods = list(dict.fromkeys(options.methods))
    name = options.backbone
    backbone_registry.get_backbone(name)
    if options.weights == "imagenet":
        backbone_registry.weights_path(name)  # refuse missing weights before any work
    cache_dir = Path(options.cache_dir) if options.cache_dir is not None else default_cache_dir()
    prepared = rundata.load_data(data, options, progress=progress)
    dataset, images, splits = prepared.dataset, prepared.images, prepared.splits
    class_names = list(dataset.class_names)
    labels = np.asarray(dataset.labels)
    pool, test_idx = splits.train_indices, splits.test_indices
    points = make_points(options.per_class, class_names, class_orders)
    for point in points:
        check_pool(point, labels[pool], class_names)
    training_stage._prepare_out(out)

    weights_key = backbone_registry.cache_weights_id(name, options.weights, options.seed)
    get_backbone = backbone_registry.backbone_factory(
        name,
        weights=options.weights,
        preprocessing=options.preprocessing,
        seed=options.seed,
        image_size=images.shape[1:3],
    )

    from steeldefect.models.features import cached_features

    cache_key: dict[str, Any] = dict(
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
