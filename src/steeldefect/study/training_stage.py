"""Training one backbone of the study (the `train` stage of :mod:`steeldefect.study.pipeline`):
cached features, the CV grid over learning rates, the final head on the whole training split, the
test split's scores and the joined Keras model, each step resumable from what the run folder holds;
and the gallery of test heatmaps that the report shows."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from steeldefect.core import runfolder
from steeldefect.core.files import read_json, write_csv, write_json
from steeldefect.core.metrics import mean_std
from steeldefect.core.options import TrainOptions
from steeldefect.core.runfolder import (
    fold_model_path,
    sidecar_path,
    update_summary,
)
from steeldefect.models import backbones as backbone_registry
from steeldefect.models import finetune, training
from steeldefect.models.features import cached_features
from steeldefect.study import trust
from steeldefect.study.rundata import (
    PreparedData,
    model_metadata,
)

log = logging.getLogger(__name__)


def _with(options: Any, overrides: dict[str, Any]) -> Any:
    """``options`` with the given fields replaced (lists become tuples); unknown names are refused."""
    known = {spec.name for spec in fields(options)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)} for {type(options).__name__}")
    return replace(options, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})


def _prepare_out(out: Path) -> None:
    """Create the run folder, or say in one line why it cannot be (a file, no permission, ...)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: --out exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{out}: cannot create the run folder ({error.strerror or error})") from error


def train_backbone(
    prepared: PreparedData, out: Path, name: str, options: TrainOptions, *, progress: bool = True
) -> dict[str, Any]:
    spec = backbone_registry.get_backbone(name)
    dataset, images, splits = prepared.dataset, prepared.images, prepared.splits
    n_classes = len(dataset.class_names)
    stage_times: dict[str, float] = {}
    weights_id = backbone_registry.weights_id(name, options.weights)
    get_backbone = backbone_registry.backbone_factory(
        name,
        weights=options.weights,
        preprocessing=options.preprocessing,
        seed=options.seed,
        image_size=images.shape[1:3],
        features=options.features,
    )

    with training.timed(stage_times, "features"):
        features, _, _ = cached_features(
            get_backbone,
            images,
            dataset_fingerprint=prepared.fingerprint,
            backbone=backbone_registry.feature_name(name, options.features),
            weights_id=backbone_registry.cache_weights_id(name, options.weights, options.seed),
            preprocessing=options.preprocessing,
            cache_dir=options.cache_dir,
            progress=progress,
        )
    head_features, augmented = features, None
    if options.augment:
        head_features, augmented = _augmented_rows(
            prepared, features, name, options, get_backbone, stage_times, progress
        )
    masks = _box_masks(dataset, splits, options, features.shape[1:3]) if options.head == "attention" else None
    weights = training.class_weights(dataset.labels[splits.train_indices], n_classes, options.class_weight)
    if weights is not None:
        log.info(
            "class weights (%s): %s",
            options.class_weight,
            ", ".join(f"{c} {w:.2f}" for c, w in zip(dataset.class_names, weights)),
        )
    # The grid's heads and the final head are trained alike; only their images and rates differ.
    recipe: dict[str, Any] = {
        "run": out,
        "backbone": name,
        "n_classes": n_classes,
        "kind": options.head,
        "epochs": options.epochs,
        "batch_size": options.batch_size,
        "seed": options.seed,
        "class_weight": options.class_weight,
        "augmented": augmented,
        "masks": masks,
    }
    with training.timed(stage_times, "grid"):
        rows = training.run_grid(
            head_features,
            dataset.labels,
            splits.folds,
            learning_rates=options.learning_rates,
            progress=progress,
            **recipe,
        )
    write_csv(runfolder.cv_grid_path(out, name), rows)
    best_rate = training.select_best_rate(rows)
    training.prune_heads(out, name, best_rate)

    with training.timed(stage_times, "test"):
        heads = [
            training.load_head(
                runfolder.head_path(out, name, best_rate, fold), features.shape[1:], n_classes, options.head
            )
            for fold in range(len(splits.folds))
        ]
        test_idx = splits.test_indices
        per_model = training.evaluate_fold_heads(heads, features[test_idx], dataset.labels[test_idx], n_classes)
        keras_aggregate = training.write_test_metrics(out, name, "keras", per_model, dataset.class_names)

    with training.timed(stage_times, "calibration"):
        calibration = trust.calibrate(out, name, heads, features, dataset.labels, splits.folds, test_idx)
    confidence = {"temperature": calibration["temperature"], "fitted_on": calibration["fitted_on"]}

    with training.timed(stage_times, "final"):
        final_head = training.fit_final_head(
            head_features, dataset.labels, splits.train_indices, learning_rate=best_rate, **recipe
        )
        if head_features is not features:  # trained on pooled vectors: the same weights on the maps
            final_head = training.load_head(
                runfolder.final_head_path(out, name), features.shape[1:], n_classes, options.head
            )
        (final_metrics,) = training.evaluate_fold_heads(
            [final_head], features[test_idx], dataset.labels[test_idx], n_classes
        )
        final_metrics.pop("fold")

    fine_tuned: dict[str, Any] = {}
    if options.fine_tune:  # fold<k>.keras / final.keras become the fine-tuned models; the join below skips them
        with training.timed(stage_times, "fine_tune"):
            fine_tuned = finetune.fine_tune_run(
                prepared,
                out,
                name,
                options,
                heads=heads,
                final_head=final_head,
                frozen_per_model=per_model,
                frozen_final=final_metrics,
                metadata=lambda fold: model_metadata(name, "keras", fold, best_rate, prepared, options, weights_id),
                progress=progress,
            )

    with training.timed(stage_times, "join"):
        models: list[tuple[int | str, Any]] = [*enumerate(heads), (runfolder.FINAL, final_head)]
        for fold, fold_head in models:
            path = fold_model_path(out, name, fold, "keras")
            meta_path = sidecar_path(path)
            if path.is_file() and meta_path.is_file() and read_json(meta_path).get("verified"):
                continue
            joined = training.join_model(get_backbone(), fold_head, name=f"{name}_{path.stem}")
            agreement = training.check_joined_agrees(joined, fold_head, images[test_idx], features[test_idx])
            training.save_model_atomic(joined, path)
            write_json(
                meta_path,
                model_metadata(name, "keras", fold, best_rate, prepared, options, weights_id)
                | {"confidence": confidence, "verified": True, "agreement_on_test": agreement},
            )

    with training.timed(stage_times, "gallery"):
        _write_gallery(out, name, prepared, progress)

    summary_entry: dict[str, Any] = {
        "status": "done",
        "display_name": spec.display_name,
        "weights": weights_id,
        "preprocessing": options.preprocessing,
        "head": options.head,
        "features": options.features,
        "best_learning_rate": best_rate,
        "cv": _cv_summary(rows),
        "variants": {"keras": keras_aggregate},
        "calibration": {key: calibration[key] for key in ("temperature", "fitted_on", "test")},
        "final": {"keras": final_metrics},
        "wall_time_s": stage_times,
    } | fine_tuned
    update_summary(out, name, **summary_entry)
    log.info(
        "%s: best lr %g, test accuracy %.2f%%", name, best_rate, summary_entry["variants"]["keras"]["accuracy"]["mean"]
    )
    return summary_entry


def _box_masks(dataset: Any, splits: Any, options: TrainOptions, grid: tuple[int, int]) -> np.ndarray:
    """Box coverage per image and feature-map cell for an attention head. Only the training images'
    rows are kept: a test image's boxes are for measuring heatmaps, never for training."""
    from steeldefect.data.annotations import cell_masks

    if options.boxes is None:
        raise ValueError("--head attention needs --boxes DIR (the defect boxes that teach it where to look)")
    masks = np.zeros((len(dataset.paths), grid[0] * grid[1]), np.float32)
    train = splits.train_indices
    masks[train] = cell_masks(options.boxes, [dataset.paths[i] for i in train], (grid[0], grid[1]))
    n_boxed = int((masks[train].sum(axis=1) > 0).sum())
    if n_boxed == 0:
        raise ValueError(f"--boxes {options.boxes}: no training image has a box there (<image name>.xml)")
    log.info("attention head: boxes for %d of %d training images from %s", n_boxed, len(train), options.boxes)
    return masks


def _augmented_rows(
    prepared: PreparedData,
    features: np.ndarray,
    name: str,
    options: TrainOptions,
    get_backbone: Any,
    stage_times: dict[str, float],
    progress: bool,
) -> tuple[np.ndarray, Any]:
    """``--augment K``: the K views of every training image (never validation or test images) as
    extra rows. A pooled head trains on channel means, since its GlobalAveragePooling2D has no
    weights: both plain and augmented rows become (N, 1, 1, C), 49x smaller than whole maps."""
    from steeldefect.models import augfeatures

    pooled = options.head == "pooled"
    train_idx = prepared.splits.train_indices
    augfeatures.check_memory(options.augment, len(train_idx), tuple(features.shape[1:]), pooled=pooled)
    with training.timed(stage_times, "augmented_features"):
        augmented = augfeatures.augmented_features(
            get_backbone,
            prepared.images,
            train_idx,
            k=options.augment,
            seed=options.seed,
            pooled=pooled,
            views=options.augment_views,
            dataset_fingerprint=prepared.fingerprint,
            backbone=backbone_registry.feature_name(name, options.features),
            weights_id=backbone_registry.cache_weights_id(name, options.weights, options.seed),
            preprocessing=options.preprocessing,
            cache_dir=options.cache_dir,
            progress=progress,
        )
    if not pooled:
        return features, augmented
    pooled_features = features.mean(axis=(1, 2), keepdims=True)
    return pooled_features, augfeatures.AugmentedFeatures(
        augmented.features.reshape(len(augmented.features), 1, 1, -1), augmented.sources, augmented.extracted_views
    )


def _cv_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by_rate: dict[str, list[float]] = {}
    for row in rows:
        by_rate.setdefault(f"{row['learning_rate']:g}", []).append(row["val_accuracy"])
    return {rate: mean_std(values) for rate, values in by_rate.items()}


def _write_gallery(run: Path, backbone: str, prepared: PreparedData, progress: bool) -> None:
    """Heatmaps of the final model on test images for the report: two correct per class and every
    wrong or uncertain one (uncertain once `evaluate` wrote the deploy model's flags). A gallery
    already written for the same model and flags is kept."""
    from steeldefect.deploy import explain_files

    test_idx = prepared.splits.test_indices
    explain_files.write_gallery(
        run,
        backbone,
        prepared.images[test_idx],
        prepared.dataset.labels[test_idx],
        [prepared.dataset.relative_names[i] for i in test_idx],
        prepared.dataset.class_names,
        progress=progress,
    )
