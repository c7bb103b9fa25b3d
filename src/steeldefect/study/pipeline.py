"""The study's stages over one run folder: train -> export -> evaluate -> report, and reproduce.

Each function here is what a CLI subcommand calls. Every stage reads what earlier stages wrote into
the run folder and skips work whose outputs are already there, so re-running a killed command
resumes where it stopped and gives the same numbers.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import keras
import numpy as np

from steeldefect.core import runfolder
from steeldefect.core.files import default_cache_dir, read_json, write_csv, write_json
from steeldefect.core.metrics import mean_std
from steeldefect.core.options import DataOptions, EvaluateOptions, ExportOptions, TrainOptions
from steeldefect.core.runfolder import (
    fold_model_path,
    record_config,
    set_summary_field,
    sidecar_path,
    update_summary,
)
from steeldefect.data import dataset as data_module
from steeldefect.data import loading
from steeldefect.data import splits as splits_module
from steeldefect.models import backbones as backbone_registry
from steeldefect.models import finetune, training
from steeldefect.models.features import cached_features
from steeldefect.study import trust

log = logging.getLogger(__name__)

NOT_RUN_WEIGHTS_MISSING = "not run: weights missing"


@dataclass
class PreparedData:
    dataset: Any
    images: np.ndarray
    fingerprint: str
    splits: Any


def load_data(data: Path, options: DataOptions, *, progress: bool = True) -> PreparedData:
    """Scan, decode (through the image cache) and fingerprint a dataset, and fix its split.

    Every class needs enough usable images for the test split and the folds asked for (also after
    ``skip_bad`` dropped some); a class that is too small is refused with one line naming it.
    """
    size = (options.image_size, options.image_size)
    min_per_class = splits_module.minimum_class_size(options.test_fraction, options.n_folds)
    dataset = data_module.scan_dataset(data, skip_bad=options.skip_bad, min_per_class=min_per_class)
    dataset, images = loading.load_images(
        dataset,
        image_size=size,
        cache_dir=options.cache_dir or default_cache_dir(),
        skip_bad=options.skip_bad,
        min_per_class=min_per_class,
        progress=progress,
    )
    fingerprint = data_module.dataset_fingerprint(dataset, size)
    splits = splits_module.make_splits(
        dataset.labels,
        test_fraction=options.test_fraction,
        n_folds=options.n_folds,
        seed=options.seed,
        class_names=dataset.class_names,
    )
    return PreparedData(dataset, images, fingerprint, splits)


def check_same_data(prepared: PreparedData, data: Path, run: Path) -> None:
    """A run folder holds one dataset: refuse data whose fingerprint differs from the recorded one."""
    dataset_record = runfolder.dataset_path(run)
    if dataset_record.is_file():
        recorded = read_json(dataset_record).get("fingerprint")
        if recorded != prepared.fingerprint:
            raise ValueError(
                f"{run}: this run folder was made from other data (fingerprint {str(recorded)[:16]}), "
                f"{data} now gives {prepared.fingerprint[:16]}; use a new --out"
            )


def record_data(prepared: PreparedData, data: Path, run: Path) -> None:
    """Write the dataset record and split of a run."""
    dataset, splits = prepared.dataset, prepared.splits
    dataset_record = runfolder.dataset_path(run)
    splits_module.write_splits_csv(runfolder.splits_path(run), dataset, splits)
    height, width = (int(v) for v in prepared.images.shape[1:3])
    write_json(
        dataset_record,
        {
            "root": str(Path(data).resolve()),
            "layout": dataset.layout,
            "fingerprint": prepared.fingerprint,
            "image_size": [height, width],
            "n_images": len(dataset.paths),
            "class_names": list(dataset.class_names),
            "counts": dataset.counts(),
            "n_test": int(len(splits.test_indices)),
            "n_train": int(len(splits.train_indices)),
        },
    )
    log.info("dataset %s: %d images, fingerprint %s", data, len(dataset.paths), prepared.fingerprint[:16])


def train(
    data: Path, out: Path, options: TrainOptions | None = None, *, progress: bool = True, **overrides: Any
) -> dict[str, Any]:
    """Features -> LR grid x K folds -> test metrics -> joined .keras models, per backbone.

    ``options`` (default :class:`TrainOptions`), with any field overridden by keyword. ``backbones``
    may contain ``all``: then a backbone whose pretrained weights are missing is skipped with a
    warning and marked in the summary; a backbone named explicitly is an error.
    """
    options = _with(options or TrainOptions(), overrides)
    out = Path(out)
    # Keras numbers auto-named layers per process and those names are saved into the models (and
    # from there into the .tflite files): a fresh session makes the files independent of what ran
    # before in this process.
    keras.backend.clear_session()
    names = backbone_registry.resolve_backbones(list(options.backbones))
    skip_missing = "all" in options.backbones
    cache_dir = Path(options.cache_dir) if options.cache_dir is not None else default_cache_dir()
    options = replace(options, cache_dir=cache_dir)
    if options.weights == "imagenet" and not skip_missing:
        for name in names:  # fail before any work when an explicitly named backbone cannot run
            backbone_registry.weights_path(name)
    for name in names:
        backbone_registry.check_features(name, options.features)
        finetune.check_fine_tune(name, options)
    # Everything that can be refused (bad data, a class too small, changed data) is checked before
    # the run folder records anything, so a failed start leaves the folder as it was.
    prepared = load_data(data, options, progress=progress)
    _prepare_out(out)
    check_same_data(prepared, data, out)
    record_config(out, "train", {"data": str(Path(data).resolve()), **options.record()})
    record_data(prepared, data, out)
    set_summary_field(out, "dataset", read_json(runfolder.dataset_path(out)))
    for name in names:
        try:
            train_backbone(prepared, out, name, options, progress=progress)
        except backbone_registry.WeightsMissingError as error:
            if not skip_missing:
                raise
            warnings.warn(f"skipping {name}: {error}", stacklevel=2)
            update_summary(out, name, status=NOT_RUN_WEIGHTS_MISSING, reason=str(error))
    update_deploy(out)
    log.info("training results written to %s", out)
    return runfolder.load_summary(out)


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
    with training.timed(stage_times, "grid"):
        rows = training.run_grid(
            head_features,
            dataset.labels,
            splits.folds,
            run=out,
            backbone=name,
            n_classes=n_classes,
            learning_rates=options.learning_rates,
            kind=options.head,
            epochs=options.epochs,
            batch_size=options.batch_size,
            seed=options.seed,
            class_weight=options.class_weight,
            progress=progress,
            augmented=augmented,
            masks=masks,
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
            head_features,
            dataset.labels,
            splits.train_indices,
            run=out,
            backbone=name,
            n_classes=n_classes,
            learning_rate=best_rate,
            kind=options.head,
            epochs=options.epochs,
            batch_size=options.batch_size,
            seed=options.seed,
            class_weight=options.class_weight,
            augmented=augmented,
            masks=masks,
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
        for fold, fold_head in [*enumerate(heads), (runfolder.FINAL, final_head)]:
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

    summary_entry = {
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

    masks = np.zeros((len(dataset.paths), grid[0] * grid[1]), np.float32)
    train = splits.train_indices
    masks[train] = cell_masks(options.boxes, [dataset.paths[i] for i in train], tuple(grid))
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


def model_metadata(
    backbone: str,
    variant: str,
    fold: int | str,
    learning_rate: float,
    prepared: PreparedData,
    options: TrainOptions,
    weights_id: str,
) -> dict[str, Any]:
    """What travels with a model file so that `predict` needs nothing else."""
    height, width = (int(v) for v in prepared.images.shape[1:3])
    return {
        "class_names": list(prepared.dataset.class_names),
        "input": {"height": height, "width": width, "channels": 3, "pixels": "RGB 0..255"},
        "backbone": backbone,
        "variant": variant,
        "fold": fold,
        "learning_rate": learning_rate,
        "head": options.head,
        "preprocessing": options.preprocessing,
        "weights": weights_id,
        "dataset_fingerprint": prepared.fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def run_train_options(run: Path) -> tuple[Path, TrainOptions]:
    """The dataset folder and training options a run was made with, from its config.json."""
    path = runfolder.config_path(run)
    if not path.is_file():
        raise FileNotFoundError(f"{run}: not a run folder (no config.json; run `steeldefect train` first)")
    recorded = dict(read_json(path)["commands"]["train"]["options"])
    data = Path(recorded.pop("data"))
    if isinstance(recorded.get("image_size"), list):  # run folders made before options were dataclasses
        recorded["image_size"] = int(recorded["image_size"][0])
    known = {spec.name for spec in fields(TrainOptions)}
    return data, TrainOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k in known})


def load_run_data(run: Path, *, progress: bool = True) -> tuple[PreparedData, TrainOptions]:
    """The images and split a run was trained on, re-read through the image cache."""
    run = Path(run)
    data, options = run_train_options(run)
    prepared = load_data(data, options, progress=progress)
    recorded = read_json(runfolder.dataset_path(run))["fingerprint"]
    if prepared.fingerprint != recorded:
        raise ValueError(
            f"{data}: the images changed since {run} was trained (fingerprint {prepared.fingerprint[:12]} "
            f"!= {recorded[:12]})"
        )
    splits = splits_module.read_splits_csv(runfolder.splits_path(run), prepared.dataset)
    return PreparedData(prepared.dataset, prepared.images, prepared.fingerprint, splits), options


def trained_backbones(run: Path) -> list[str]:
    return [name for name, entry in runfolder.load_summary(run)["backbones"].items() if entry.get("status") == "done"]


def export(run: Path, options: ExportOptions | None = None, *, progress: bool = True, **overrides: Any) -> list[Path]:
    """Convert every fold model of every trained backbone to the LiteRT variants (resumable)."""
    from steeldefect.deploy import export as export_stage
    from steeldefect.runtime.litert import resolve_threads

    options = _with(options or ExportOptions(), overrides)
    run = Path(run)
    prepared, train_options = load_run_data(run, progress=progress)
    record_config(run, "export", options.record())
    calibration = export_stage.calibration_indices(
        prepared.dataset.labels, prepared.splits.train_indices, options.calibration_samples, seed=train_options.seed
    )
    # Recorded so anyone can check that calibration never saw a test image.
    write_csv(
        runfolder.calibration_path(run),
        [{"index": int(i), "file": prepared.dataset.relative_names[i]} for i in calibration],
    )
    calibration_images = prepared.images[calibration]
    written = []
    for name in trained_backbones(run):
        stage_times: dict[str, float] = {}
        with training.timed(stage_times, "export"):
            written += export_stage.export_backbone(
                run,
                name,
                options.variants,
                calibration_images,
                n_folds=len(prepared.splits.folds),
                workers=resolve_threads(options.workers),
                progress=progress,
                rule_data=_rule_data(run, name, prepared),
                tta=options.tta,
                **_int8_guard(options, prepared),
            )
        csv_path = runfolder.quant_debug_path(run, name, "csv")
        if options.quant_report and "int8" in options.variants and not csv_path.is_file():
            import keras

            with training.timed(stage_times, "quant_debug"):
                model = keras.models.load_model(fold_model_path(run, name, 0, "keras"))
                # The debugger compares float and int8 layer outputs on a few training images.
                export_stage.quantization_error_report(
                    model,
                    calibration_images,
                    calibration_images[:: max(1, len(calibration) // 20)][:20],
                    csv_path,
                    runfolder.quant_debug_path(run, name, "png"),
                )
        update_summary(run, name, wall_time_s=stage_times)
        _record_int8_checks(run, name, len(prepared.splits.folds))
    update_deploy(run)
    log.info("LiteRT models written under %s/*/models", run)
    return written


def _int8_guard(options: ExportOptions, prepared: PreparedData) -> dict[str, Any]:
    """export_backbone's int8-guard arguments: the settings, and per model the images its int8
    variants are checked on (a fold's out-of-fold validation images; the deploy model's: the training
    images) and recalibrated on (that model's training images), never the test split."""
    from steeldefect.deploy import int8guard

    if options.int8_guard == "off" or not set(options.variants) & {"int8", "int8-mixed"}:
        return {}
    settings = int8guard.GuardSettings(options.int8_guard, options.int8_guard_accuracy, options.int8_guard_recall)
    labels, names = prepared.dataset.labels, prepared.dataset.class_names
    folds, train = prepared.splits.folds, prepared.splits.train_indices

    def checks(fold: int | str) -> int8guard.CheckData:
        if fold == runfolder.FINAL:
            return int8guard.check_data(
                prepared.images,
                labels,
                names,
                train,
                train,
                f"the deploy model's {len(train)} training images (the rows `train` scored out of fold)",
                settings.calibration_cap,
            )
        fold_train, validation = folds[int(fold)]
        return int8guard.check_data(
            prepared.images,
            labels,
            names,
            validation,
            fold_train,
            f"fold {fold}'s {len(validation)} out-of-fold validation images",
            settings.calibration_cap,
        )

    return {"guard": settings, "checks": checks}


def _record_int8_checks(run: Path, backbone: str, n_folds: int) -> None:
    """Each exported int8 variant's guard record (from its sidecar) into summary.json."""
    from steeldefect.deploy import int8guard

    checks: dict[str, dict[str, Any]] = {}
    for fold in [*range(n_folds), runfolder.FINAL]:
        for variant in ("int8", "int8-mixed"):
            path = sidecar_path(fold_model_path(run, backbone, fold, variant))
            record = read_json(path).get("int8_check") if path.is_file() else None
            if record:
                checks.setdefault(str(fold), {})[variant] = int8guard.summary_entry(record)
    if checks:
        update_summary(run, backbone, int8_check=checks)


def _write_gallery(run: Path, backbone: str, prepared: PreparedData, progress: bool) -> None:
    """Heatmaps of the final model on test images for the report: two correct per class and every
    wrong or uncertain one (uncertain once `evaluate` wrote the deploy model's flags). A gallery
    already written for the same model and flags is kept."""
    from steeldefect.deploy import explain

    test_idx = prepared.splits.test_indices
    explain.write_gallery(
        run,
        backbone,
        prepared.images[test_idx],
        prepared.dataset.labels[test_idx],
        [prepared.dataset.relative_names[i] for i in test_idx],
        prepared.dataset.class_names,
        progress=progress,
    )


def _judge_test_split(run: Path, backbone: str, prepared: PreparedData, final: dict[str, dict[str, Any]]) -> None:
    """Each final model that carries an uncertainty rule judges the test split: the share it flags and
    the accuracy of what it accepts go into ``final[variant]["uncertain"]``; the deployed variant's
    (int8 when exported) answer per test image is written to ``trust/test_predictions.csv``."""
    from steeldefect.runtime.modelfile import Classifier

    test_idx = prepared.splits.test_indices
    images, labels = prepared.images[test_idx], prepared.dataset.labels[test_idx]
    names = prepared.dataset.class_names
    rows_for: dict[str, list[dict[str, Any]]] = {}
    for variant in final:
        path = fold_model_path(run, backbone, runfolder.FINAL, variant)
        classifier = Classifier(path)
        if classifier.rule is None:
            continue
        judgement = classifier.judge(images)
        predicted = judgement.probabilities.argmax(axis=1)
        accepted = ~judgement.uncertain
        final[variant]["uncertain"] = {
            "flagged_test_share": float(judgement.uncertain.mean()),
            "accepted_accuracy": float((predicted[accepted] == labels[accepted]).mean()) if accepted.any() else None,
            "threshold": classifier.rule.threshold,
            "accept": classifier.rule.accept,
        }
        rows_for[variant] = [
            {
                "file": prepared.dataset.relative_names[i],
                "label": names[labels[row]],
                "predicted": names[predicted[row]],
                "probability": f"{judgement.probabilities[row, predicted[row]]:.6f}",
                "uncertain": bool(judgement.uncertain[row]),
                "score": f"{judgement.score[row]:.6f}",
                "variant": variant,
            }
            for row, i in enumerate(test_idx)
        ]
    for variant in ("int8", *rows_for):
        if variant in rows_for:
            write_csv(runfolder.test_predictions_path(run, backbone), rows_for[variant])
            break


def _rule_data(run: Path, backbone: str, prepared: PreparedData):
    """What `export` fits the deploy model's uncertainty rule on, or None for a run trained before
    `train` recorded out-of-fold probabilities (its deploy model then carries no rule)."""
    from steeldefect.deploy.export import RuleData

    oof = trust.read_oof_probabilities(run, backbone, len(prepared.dataset.labels))
    if oof is None:
        log.warning("%s: no out-of-fold probabilities in the run; the deploy model gets no uncertainty rule", backbone)
        return None
    return RuleData(prepared.images, prepared.dataset.labels, prepared.splits.folds, oof)


def evaluate(
    run: Path, options: EvaluateOptions | None = None, *, progress: bool = True, **overrides: Any
) -> dict[str, Any]:
    """Test metrics, size and latency of every exported .tflite; mean ± std per backbone x variant."""
    from steeldefect.core.cpuinfo import cpu_description
    from steeldefect.runtime.litert import resolve_threads
    from steeldefect.study import evaluate as evaluate_module

    options = _with(options or EvaluateOptions(), overrides)
    run = Path(run)
    threads = resolve_threads(options.threads)
    prepared, _ = load_run_data(run, progress=progress)
    record_config(run, "evaluate", options.record())
    test_idx = prepared.splits.test_indices
    images, labels = prepared.images[test_idx], prepared.dataset.labels[test_idx]
    n_classes = len(prepared.dataset.class_names)
    protocol = {"threads": threads, "warmup": options.warmup, "runs": options.runs}
    table = []
    for name in trained_backbones(run):
        stage_times: dict[str, float] = {}
        models = runfolder.exported_models(run, name) + runfolder.final_models(run, name)
        by_variant: dict[str, list[dict[str, Any]]] = {}
        final: dict[str, dict[str, Any]] = {}
        with training.timed(stage_times, "evaluate"), _progress(len(models), f"{name} evaluate", progress) as bar:
            for path in models:
                fold, variant = runfolder.parse_model_name(path)
                result_path = runfolder.evaluation_record_path(path)
                bar.set_postfix_str(path.name)
                result = read_json(result_path) if result_path.is_file() else None
                # Reuse a measurement only if it was made on this very file with the same protocol.
                if (
                    result is None
                    or result_path.stat().st_mtime < path.stat().st_mtime
                    or any(result.get(key) != value for key, value in protocol.items())
                ):
                    result = evaluate_module.evaluate_tflite(
                        path, images, labels, n_classes, threads=threads, warmup=options.warmup, runs=options.runs
                    ) | {"fold": fold, "cpu": cpu_description()}
                    write_json(result_path, result)
                if fold == runfolder.FINAL:
                    final[variant] = result
                else:
                    by_variant.setdefault(variant, []).append(result)
                bar.update(1)
        variants_summary = {}
        for variant, results in by_variant.items():
            results.sort(key=lambda r: r["fold"])
            aggregated = training.write_test_metrics(run, name, variant, results, prepared.dataset.class_names)
            for key in ("size_mib", "latency_ms_median", "latency_ms_p90", "input_prep_ms_median"):
                aggregated[key] = mean_std([r[key] for r in results])
            aggregated["threads"] = threads
            aggregated["xnnpack_partitions"] = sorted({r["xnnpack_partitions"] for r in results})
            variants_summary[variant] = aggregated
            table.append({"backbone": name, "variant": variant, **_flat(aggregated)})
        with training.timed(stage_times, "uncertainty"):
            _judge_test_split(run, name, prepared, final)
        with training.timed(stage_times, "gallery"):
            _write_gallery(run, name, prepared, progress)  # now with the deploy model's uncertain flags
        update_summary(run, name, variants=variants_summary, final=final, wall_time_s=stage_times)
    write_csv(runfolder.tflite_metrics_path(run, "csv"), table)
    write_json(runfolder.tflite_metrics_path(run, "json"), table)
    set_summary_field(run, "latency_machine", {"cpu": cpu_description(), "threads": threads})
    update_deploy(run)
    log.info("evaluation written to %s and summary.json", runfolder.tflite_metrics_path(run, "csv"))
    return runfolder.load_summary(run)


def update_deploy(run: Path) -> Path | None:
    """Put the run's model to deploy into ``RUN/deploy/``: the final model (refitted on all training
    images) of the trained backbone with the best mean CV accuracy at its chosen rate (ties: the
    first trained), every variant exported so far, each with its sidecar; ``deploy.json`` says what
    it is and how it tested. Returns the folder, or None when no backbone was trained."""
    from steeldefect.models.conversion import VARIANTS

    summary = runfolder.load_summary(run)
    done = {name: entry for name, entry in summary["backbones"].items() if entry.get("status") == "done"}
    if not done:
        return None
    best = max(done, key=lambda name: done[name]["cv"][f"{done[name]['best_learning_rate']:g}"]["mean"])
    entry = done[best]
    models = {}
    for variant in ("keras", *VARIANTS):
        source = fold_model_path(run, best, runfolder.FINAL, variant)
        target = runfolder.deploy_model_path(run, variant)
        if not (source.is_file() and sidecar_path(source).is_file()):
            target.unlink(missing_ok=True)
            sidecar_path(target).unlink(missing_ok=True)
            continue
        _link_or_copy(source, target)
        meta = read_json(sidecar_path(source)) | {"deployed_from": str(source.relative_to(run))}
        write_json(sidecar_path(target), meta)
        models[variant] = str(target.relative_to(run))
    record = {
        "backbone": best,
        "display_name": entry.get("display_name", best),
        "learning_rate": entry["best_learning_rate"],
        "cv_accuracy": entry["cv"][f"{entry['best_learning_rate']:g}"],
        "trained_on": "every training image (all folds), after the grid chose the rate",
        "models": models,
        "test": {
            variant: {
                key: metrics[key]
                for key in ("accuracy", "precision_macro", "recall_macro", "size_mib", "uncertain")
                if key in metrics
            }
            for variant, metrics in entry.get("final", {}).items()
        },
    }
    write_json(runfolder.deploy_record_path(run), record)
    set_summary_field(run, "deploy", record)
    return runfolder.deploy_dir(run)


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` becomes the same bytes as ``source``: a hard link where the file system allows it
    (no second copy of a 40 MB model), else a copy; atomic either way."""
    import os
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and os.path.samefile(source, target):
        return  # already that file (a re-run of export or evaluate)
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copyfile(source, temporary)
    os.replace(temporary, target)
    # rename() between two links to one file does nothing and leaves the temporary name behind.
    temporary.unlink(missing_ok=True)


def _flat(aggregated: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for key, value in aggregated.items():
        if isinstance(value, dict):
            flat[f"{key}_mean"] = round(value["mean"], 4)
            flat[f"{key}_std"] = round(value["std"], 4)
        elif not isinstance(value, list):
            flat[key] = value
    return flat


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="model", disable=not enabled)


def reproduce(
    data: Path,
    out: Path,
    train_options: TrainOptions | None = None,
    export_options: ExportOptions | None = None,
    evaluate_options: EvaluateOptions | None = None,
    *,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """The whole study in one call: train -> export -> evaluate -> report (each step resumable).

    Keyword overrides go to whichever options class has a field of that name.
    """
    from steeldefect.study.report import write_report

    chosen = [
        train_options or TrainOptions(backbones=("all",)),
        export_options or ExportOptions(),
        evaluate_options or EvaluateOptions(),
    ]
    unknown = set(overrides) - {spec.name for options in chosen for spec in fields(options)}
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))} for reproduce")
    train_options, export_options, evaluate_options = (
        _with(options, {k: v for k, v in overrides.items() if k in {spec.name for spec in fields(options)}})
        for options in chosen
    )
    started = time.perf_counter()
    train(data, out, train_options, progress=progress)
    if trained_backbones(out):
        export(out, export_options, progress=progress)
        evaluate(out, evaluate_options, progress=progress)
    else:
        log.warning("no backbone could be trained (weights missing?); nothing to export or evaluate")
    # Wall time of this invocation; a resumed run reports only the time it took to finish.
    set_summary_field(out, "reproduce_wall_time_s", round(time.perf_counter() - started, 1))
    report_path = write_report(out)
    log.info("report written to %s", report_path)
    return runfolder.load_summary(out)
