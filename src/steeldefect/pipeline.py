"""The study's stages over one run folder: train -> export -> evaluate -> report, and reproduce.

Each function here is what a CLI subcommand calls. Every stage reads what earlier stages wrote into
the run folder and skips work whose outputs are already there, so re-running a killed command
resumes where it stopped and gives the same numbers.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from steeldefect import backbones as backbone_registry
from steeldefect import data as data_module
from steeldefect import splits as splits_module
from steeldefect import training
from steeldefect.features import cached_features
from steeldefect.metrics import mean_std
from steeldefect.files import default_cache_dir, read_json, write_csv, write_json
from steeldefect.conversion import DEFAULT_VARIANTS, QUANTIZED_VARIANTS
from steeldefect.runfolder import (
    backbone_dir,
    fold_model_path,
    record_config,
    set_summary_field,
    sidecar_path,
    update_summary,
)

log = logging.getLogger(__name__)

NOT_RUN_WEIGHTS_MISSING = "not run: weights missing"


@dataclass
class PreparedData:
    dataset: Any
    images: np.ndarray
    fingerprint: str
    splits: Any


def prepare_data(
    data: Path,
    run: Path,
    *,
    image_size: tuple[int, int] = (224, 224),
    test_fraction: float = 0.15,
    n_folds: int = 5,
    seed: int = 42,
    cache_dir: Path | None = None,
    skip_bad: bool = False,
    progress: bool = True,
) -> PreparedData:
    """Load the images, fix the split, and record both in the run folder."""
    dataset, images, fingerprint = _load_dataset(
        data, image_size=image_size, cache_dir=cache_dir, skip_bad=skip_bad, n_folds=n_folds, progress=progress
    )
    splits = splits_module.make_splits(dataset.labels, test_fraction=test_fraction, n_folds=n_folds, seed=seed)
    run = Path(run)
    splits_path = run / "splits.csv"
    if splits_path.exists():
        previous = splits_module.read_splits_csv(splits_path, dataset)
        if not np.array_equal(previous.test_indices, splits.test_indices):
            raise ValueError(f"{splits_path}: the data changed since this run folder was made; use a new --out")
    splits_module.write_splits_csv(splits_path, dataset, splits)
    write_json(
        run / "dataset.json",
        {
            "root": str(Path(data).resolve()),
            "layout": dataset.layout,
            "fingerprint": fingerprint,
            "image_size": list(image_size),
            "n_images": len(dataset.paths),
            "class_names": list(dataset.class_names),
            "counts": dataset.counts(),
            "n_test": int(len(splits.test_indices)),
            "n_train": int(len(splits.train_indices)),
        },
    )
    log.info("dataset %s: %d images, fingerprint %s", data, len(dataset.paths), fingerprint[:16])
    return PreparedData(dataset, images, fingerprint, splits)


def _load_dataset(
    data: Path, *, image_size: tuple[int, int], cache_dir: Path | None, skip_bad: bool, n_folds: int, progress: bool
) -> tuple[Any, np.ndarray, str]:
    """Scan, decode (through the image cache) and fingerprint a dataset; every class needs at least
    ``n_folds`` usable images, also after ``skip_bad`` dropped some."""
    dataset = data_module.scan_dataset(data, skip_bad=skip_bad, min_per_class=n_folds)
    dataset, images = data_module.load_images(
        dataset, image_size=image_size, cache_dir=cache_dir, skip_bad=skip_bad, min_per_class=n_folds, progress=progress
    )
    return dataset, images, data_module.dataset_fingerprint(dataset, image_size)


def train(
    data: Path,
    out: Path,
    *,
    backbones: Sequence[str] = ("efficientnet_lite0",),
    weights: str = "imagenet",
    preprocessing: str = "model",
    head: str = "flatten",
    learning_rates: Sequence[float] = training.DEFAULT_LEARNING_RATES,
    epochs: int = 15,
    batch_size: int = 64,
    test_fraction: float = 0.15,
    n_folds: int = 5,
    seed: int = 42,
    image_size: tuple[int, int] = (224, 224),
    cache_dir: Path | None = None,
    skip_bad: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Features -> LR grid x K folds -> test metrics -> joined .keras models, per backbone.

    ``backbones`` may contain ``all``: then a backbone whose pretrained weights are missing is
    skipped with a warning and marked in the summary; a backbone named explicitly is an error.
    """
    out = Path(out)
    requested = list(backbones)
    names = backbone_registry.resolve_backbones(requested)
    skip_missing = "all" in requested
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    options = {
        "data": str(Path(data).resolve()),
        "backbones": names,
        "weights": weights,
        "preprocessing": preprocessing,
        "head": head,
        "learning_rates": [float(rate) for rate in learning_rates],
        "epochs": epochs,
        "batch_size": batch_size,
        "test_fraction": test_fraction,
        "n_folds": n_folds,
        "seed": seed,
        "image_size": list(image_size),
        "skip_bad": skip_bad,
        "cache_dir": str(cache_dir),
    }
    if weights == "imagenet" and not skip_missing:
        for name in names:  # fail before any work when an explicitly named backbone cannot run
            backbone_registry.weights_path(name)
    out.mkdir(parents=True, exist_ok=True)
    record_config(out, "train", options)
    prepared = prepare_data(
        data,
        out,
        image_size=image_size,
        test_fraction=test_fraction,
        n_folds=n_folds,
        seed=seed,
        cache_dir=cache_dir,
        skip_bad=skip_bad,
        progress=progress,
    )
    set_summary_field(out, "dataset", read_json(out / "dataset.json"))
    for name in names:
        try:
            train_backbone(
                prepared,
                out,
                name,
                weights=weights,
                preprocessing=preprocessing,
                head=head,
                learning_rates=learning_rates,
                epochs=epochs,
                batch_size=batch_size,
                seed=seed,
                cache_dir=cache_dir,
                progress=progress,
            )
        except backbone_registry.WeightsMissingError as error:
            if not skip_missing:
                raise
            warnings.warn(f"skipping {name}: {error}", stacklevel=2)
            update_summary(out, name, status=NOT_RUN_WEIGHTS_MISSING, reason=str(error))
    log.info("training results written to %s", out)
    return read_json(out / "summary.json")


def train_backbone(
    prepared: PreparedData,
    out: Path,
    name: str,
    *,
    weights: str,
    preprocessing: str,
    head: str,
    learning_rates: Sequence[float],
    epochs: int,
    batch_size: int,
    seed: int,
    cache_dir: Path | None,
    progress: bool,
) -> dict[str, Any]:
    spec = backbone_registry.get_backbone(name)
    folder = backbone_dir(out, name)
    dataset, images, splits = prepared.dataset, prepared.images, prepared.splits
    n_classes = len(dataset.class_names)
    stage_times: dict[str, float] = {}
    weights_id = backbone_registry.weights_id(name, weights)
    backbone_model = None

    def get_backbone():
        nonlocal backbone_model
        if backbone_model is None:
            backbone_model = backbone_registry.build_backbone(
                name, weights=weights, preprocessing=preprocessing, seed=seed, image_size=images.shape[1:3]
            )
        return backbone_model

    with training.timed(stage_times, "features"):
        features, _, _ = cached_features(
            get_backbone,
            images,
            dataset_fingerprint=prepared.fingerprint,
            backbone=name,
            weights_id=weights_id + (f"-seed{seed}" if weights == "none" else ""),
            preprocessing=preprocessing,
            cache_dir=cache_dir,
            progress=progress,
        )
    with training.timed(stage_times, "grid"):
        rows = training.run_grid(
            features,
            dataset.labels,
            splits.folds,
            out_dir=folder,
            n_classes=n_classes,
            learning_rates=learning_rates,
            kind=head,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
        )
    write_csv(folder / "cv_grid.csv", rows)
    best_rate = training.select_best_rate(rows)
    training.prune_heads(folder, best_rate)

    with training.timed(stage_times, "test"):
        heads = [
            training.load_head(folder / "grid" / training.GridCell(best_rate, fold).folder, features.shape[1:], n_classes, head)
            for fold in range(len(splits.folds))
        ]
        test_idx = splits.test_indices
        per_model = training.evaluate_fold_heads(heads, features[test_idx], dataset.labels[test_idx], n_classes)
        keras_aggregate = training.write_test_metrics(folder, "keras", per_model, dataset.class_names)

    with training.timed(stage_times, "join"):
        for fold, fold_head in enumerate(heads):
            path = fold_model_path(out, name, fold, "keras")
            meta_path = sidecar_path(path)
            if path.is_file() and meta_path.is_file() and read_json(meta_path).get("verified"):
                continue
            joined = training.join_model(get_backbone(), fold_head, name=f"{name}_fold{fold}")
            agreement = training.check_joined_agrees(joined, fold_head, images[test_idx], features[test_idx])
            training.save_model_atomic(joined, path)
            write_json(
                meta_path,
                model_metadata(
                    name, "keras", fold, best_rate, dataset.class_names, prepared, preprocessing, head, weights_id
                )
                | {"verified": True, "agreement_on_test": agreement},
            )

    summary_entry = {
        "status": "done",
        "display_name": spec.display_name,
        "weights": weights_id,
        "preprocessing": preprocessing,
        "head": head,
        "best_learning_rate": best_rate,
        "cv": _cv_summary(rows),
        "variants": {"keras": keras_aggregate},
        "wall_time_s": stage_times,
    }
    update_summary(out, name, **summary_entry)
    log.info("%s: best lr %g, test accuracy %.2f%%", name, best_rate, keras_aggregate["accuracy"]["mean"])
    return summary_entry


def _cv_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by_rate: dict[str, list[float]] = {}
    for row in rows:
        by_rate.setdefault(f"{row['learning_rate']:g}", []).append(row["val_accuracy"])
    return {rate: mean_std(values) for rate, values in by_rate.items()}


def model_metadata(
    backbone: str,
    variant: str,
    fold: int,
    learning_rate: float,
    class_names: Sequence[str],
    prepared: PreparedData,
    preprocessing: str,
    head: str,
    weights_id: str,
) -> dict[str, Any]:
    """What travels with a model file so that `predict` needs nothing else."""
    height, width = (int(v) for v in prepared.images.shape[1:3])
    return {
        "class_names": list(class_names),
        "input": {"height": height, "width": width, "channels": 3, "pixels": "RGB 0..255"},
        "backbone": backbone,
        "variant": variant,
        "fold": fold,
        "learning_rate": learning_rate,
        "head": head,
        "preprocessing": preprocessing,
        "weights": weights_id,
        "dataset_fingerprint": prepared.fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def load_run_data(run: Path, *, progress: bool = True) -> tuple[PreparedData, dict[str, Any]]:
    """The images and split a run was trained on, re-read through the image cache."""
    run = Path(run)
    config_path = run / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: not a run folder (run `steeldefect train` first)")
    options = read_json(config_path)["commands"]["train"]["options"]
    dataset, images, fingerprint = _load_dataset(
        options["data"],
        image_size=tuple(options["image_size"]),
        cache_dir=Path(options["cache_dir"]),
        skip_bad=options["skip_bad"],
        n_folds=options["n_folds"],
        progress=progress,
    )
    recorded = read_json(run / "dataset.json")["fingerprint"]
    if fingerprint != recorded:
        raise ValueError(
            f"{options['data']}: the images changed since {run} was trained (fingerprint {fingerprint[:12]} "
            f"!= {recorded[:12]})"
        )
    splits = splits_module.read_splits_csv(run / "splits.csv", dataset)
    return PreparedData(dataset, images, fingerprint, splits), options


def trained_backbones(run: Path) -> list[str]:
    from steeldefect.runfolder import load_summary

    return [name for name, entry in load_summary(run)["backbones"].items() if entry.get("status") == "done"]


def export(
    run: Path,
    *,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    calibration_samples: int = 200,
    quant_report: bool = True,
    progress: bool = True,
) -> list[Path]:
    """Convert every fold model of every trained backbone to the LiteRT variants (resumable)."""
    import keras

    from steeldefect import export as export_stage

    run = Path(run)
    prepared, options = load_run_data(run, progress=progress)
    record_config(run, "export", {"variants": list(variants), "calibration_samples": calibration_samples})
    calibration = export_stage.calibration_indices(
        prepared.dataset.labels, prepared.splits.train_indices, calibration_samples, seed=options["seed"]
    )
    # Recorded so anyone can check that calibration never saw a test image.
    write_csv(
        run / "calibration.csv",
        [{"index": int(i), "file": prepared.dataset.relative_names[i]} for i in calibration],
    )
    calibration_images = prepared.images[calibration]
    written = []
    for name in trained_backbones(run):
        stage_times: dict[str, float] = {}
        n_folds = len(prepared.splits.folds)
        jobs = [(fold, variant) for fold in range(n_folds) for variant in variants]
        loaded: tuple[int | None, Any] = (None, None)  # one fold's Keras model, for all its variants
        with training.timed(stage_times, "export"), _progress(len(jobs), f"{name} export", progress) as bar:
            for fold, variant in jobs:
                target = fold_model_path(run, name, fold, variant)
                meta_path = sidecar_path(target)
                bar.set_postfix_str(f"fold {fold} {variant}")
                if not (target.is_file() and meta_path.is_file()):
                    source = fold_model_path(run, name, fold, "keras")
                    if loaded[0] != fold:
                        loaded = (fold, keras.models.load_model(source))
                    full_integer = fold_model_path(run, name, fold, "int8")
                    meta = read_json(sidecar_path(source)) | {"variant": variant, "verified": None}
                    if variant in QUANTIZED_VARIANTS:
                        meta["calibration"] = {"samples": len(calibration), "split": "train", "file": "calibration.csv"}
                    meta["provenance"] = export_stage.provenance(run, name, fold)
                    export_stage.export_model(
                        loaded[1],
                        variant,
                        target,
                        calibration_images if variant in QUANTIZED_VARIANTS else None,
                        int8_flatbuffer=full_integer.read_bytes() if variant == "int8-mixed" and full_integer.is_file() else None,
                        metadata=meta,
                    )
                    meta["tflite"] = export_stage.tensor_summary(target)
                    write_json(meta_path, meta)
                written.append(target)
                bar.update(1)
        if quant_report and "int8" in variants:
            csv_path = backbone_dir(run, name) / "quant_debug.csv"
            if not csv_path.is_file():
                with training.timed(stage_times, "quant_debug"):
                    model = keras.models.load_model(fold_model_path(run, name, 0, "keras"))
                    # The debugger compares float and int8 layer outputs on a few training images.
                    export_stage.quantization_error_report(
                        model, calibration_images, calibration_images[:: max(1, len(calibration) // 20)][:20],
                        csv_path, backbone_dir(run, name) / "quant_debug.png",
                    )
        update_summary(run, name, wall_time_s=stage_times)
    log.info("LiteRT models written under %s/*/models", run)
    return written


def evaluate(
    run: Path, *, threads: int | None = None, warmup: int = 10, runs: int = 50, progress: bool = True
) -> dict[str, Any]:
    """Test metrics, size and latency of every exported .tflite; mean ± std per backbone x variant."""
    import os

    from steeldefect import evaluate as evaluate_module
    from steeldefect.cpuinfo import cpu_description

    run = Path(run)
    threads = threads or os.cpu_count() or 1
    prepared, _ = load_run_data(run, progress=progress)
    record_config(run, "evaluate", {"threads": threads, "warmup": warmup, "runs": runs})
    test_idx = prepared.splits.test_indices
    images, labels = prepared.images[test_idx], prepared.dataset.labels[test_idx]
    n_classes = len(prepared.dataset.class_names)
    table = []
    for name in trained_backbones(run):
        stage_times: dict[str, float] = {}
        models = sorted(backbone_dir(run, name).glob("models/fold*.tflite"))
        by_variant: dict[str, list[dict[str, Any]]] = {}
        with training.timed(stage_times, "evaluate"), _progress(len(models), f"{name} evaluate", progress) as bar:
            for path in models:
                fold_text, variant = path.name.split(".")[:2]
                result_path = Path(str(path) + ".eval.json")
                bar.set_postfix_str(path.name)
                result = read_json(result_path) if result_path.is_file() else None
                protocol = {"threads": threads, "warmup": warmup, "runs": runs}
                # Reuse a measurement only if it was made on this very file with the same protocol.
                if (
                    result is None
                    or result_path.stat().st_mtime < path.stat().st_mtime
                    or any(result.get(key) != value for key, value in protocol.items())
                ):
                    result = evaluate_module.evaluate_tflite(
                        path, images, labels, n_classes, threads=threads, warmup=warmup, runs=runs
                    ) | {"fold": int(fold_text.removeprefix("fold")), "cpu": cpu_description()}
                    write_json(result_path, result)
                by_variant.setdefault(variant, []).append(result)
                bar.update(1)
        variants_summary = {}
        for variant, results in by_variant.items():
            results.sort(key=lambda r: r["fold"])
            aggregated = training.write_test_metrics(backbone_dir(run, name), variant, results, prepared.dataset.class_names)
            for key in ("size_mib", "latency_ms_median", "latency_ms_p90", "input_prep_ms_median"):
                aggregated[key] = mean_std([r[key] for r in results])
            aggregated["threads"] = threads
            aggregated["xnnpack_partitions"] = sorted({r["xnnpack_partitions"] for r in results})
            variants_summary[variant] = aggregated
            table.append({"backbone": name, "variant": variant, **_flat(aggregated)})
        update_summary(run, name, variants=variants_summary, wall_time_s=stage_times)
    write_csv(run / "tflite_metrics.csv", table)
    write_json(run / "tflite_metrics.json", table)
    set_summary_field(run, "latency_machine", {"cpu": cpu_description(), "threads": threads})
    log.info("evaluation written to %s/tflite_metrics.csv and summary.json", run)
    return read_json(run / "summary.json")


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
    *,
    threads: int | None = None,
    warmup: int = 10,
    runs: int = 50,
    calibration_samples: int = 200,
    progress: bool = True,
    **train_options: Any,
) -> dict[str, Any]:
    """The whole study in one call: train -> export -> evaluate -> report (each step resumable)."""
    from steeldefect.report import write_report

    train_options.setdefault("backbones", ["all"])
    started = time.perf_counter()
    train(data, out, progress=progress, **train_options)
    if trained_backbones(out):
        export(out, calibration_samples=calibration_samples, progress=progress)
        evaluate(out, threads=threads, warmup=warmup, runs=runs, progress=progress)
    else:
        log.warning("no backbone could be trained (weights missing?); nothing to export or evaluate")
    # Wall time of this invocation; a resumed run reports only the time it took to finish.
    set_summary_field(out, "reproduce_wall_time_s", round(time.perf_counter() - started, 1))
    report_path = write_report(out)
    log.info("report written to %s", report_path)
    return read_json(Path(out) / "summary.json")
