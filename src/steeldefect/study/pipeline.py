"""The study's stages over one run folder: train -> export -> evaluate -> report, and reproduce.

Each function here is what a CLI subcommand calls. Every stage reads what earlier stages wrote into
the run folder and skips work whose outputs are already there, so re-running a killed command
resumes where it stopped and gives the same numbers.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import keras

from steeldefect.core import runfolder
from steeldefect.core.files import default_cache_dir, read_json, write_csv, write_json
from steeldefect.core.metrics import mean_std
from steeldefect.core.options import FORMAT_VARIANTS, MODEL_FORMATS, EvaluateOptions, ExportOptions, TrainOptions
from steeldefect.core.runfolder import (
    fold_model_path,
    record_config,
    set_summary_field,
    sidecar_path,
    update_summary,
)
from steeldefect.models import backbones as backbone_registry
from steeldefect.models import finetune, training
from steeldefect.study import trust
from steeldefect.study.rundata import (
    Data,
    PreparedData,
    check_same_data,
    load_data,
    load_run_data,
    record_data,
    recorded_data,
    trained_backbones,
)
from steeldefect.study.training_stage import _prepare_out, _with, _write_gallery, train_backbone

log = logging.getLogger(__name__)

NOT_RUN_WEIGHTS_MISSING = "not run: weights missing"


def train(
    data: Data, out: Path, options: TrainOptions | None = None, *, progress: bool = True, **overrides: Any
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
    record_config(out, "train", {"data": recorded_data(data), **options.record()})
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


def export(run: Path, options: ExportOptions | None = None, *, progress: bool = True, **overrides: Any) -> list[Path]:
    """Convert every fold model of every trained backbone to the LiteRT variants (resumable)."""
    from steeldefect.deploy import export as export_stage
    from steeldefect.runtime.litert import resolve_threads

    options = _with(options or ExportOptions(), overrides)
    run = Path(run)
    _check_int8_weights_here(options)
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
                formats=options.formats,
                int8_weights=options.int8_weights,
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


def _check_int8_weights_here(options: ExportOptions) -> None:
    """8-bit-throughout ONNX/OpenVINO int8 files are exported on a CPU that runs them right: the
    export runs each file (the deploy model's rule is fitted on its own outputs)."""
    from steeldefect.core import cpuinfo

    if options.int8_weights == "vnni" and set(options.formats) - {"tflite"} and cpuinfo.saturating_int8():
        raise ValueError(
            f"--int8-weights vnni: this CPU ({cpuinfo.cpu_model()}) has no int8 dot product, so the files could "
            "not be run here (the deploy model's uncertainty rule is fitted on its own outputs); export on a CPU "
            "with AVX-512 VNNI or AVX-VNNI, or use --int8-weights portable"
        )


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
        path = fold_model_path(run, backbone, runfolder.FINAL, *_variant_and_format(variant))
        classifier = Classifier(path)
        if classifier.rule is None:
            continue
        judgement = classifier.judge(images)
        uncertain, score = judgement.uncertain, judgement.score
        assert uncertain is not None and score is not None  # a classifier with a rule flags and scores every image
        predicted = judgement.probabilities.argmax(axis=1)
        accepted = ~uncertain
        final[variant]["uncertain"] = {
            "flagged_test_share": float(uncertain.mean()),
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
                "uncertain": bool(uncertain[row]),
                "score": f"{score[row]:.6f}",
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
        models = runfolder.exported_models(run, name, MODEL_FORMATS) + runfolder.final_models(run, name, MODEL_FORMATS)
        by_variant: dict[str, list[dict[str, Any]]] = {}
        final: dict[str, dict[str, Any]] = {}
        with training.timed(stage_times, "evaluate"), _progress(len(models), f"{name} evaluate", progress) as bar:
            for path in models:
                fold, variant = runfolder.parse_model_name(path)
                variant = runfolder.model_label(runfolder.parse_model_format(path), variant)
                result_path = runfolder.evaluation_record_path(path)
                bar.set_postfix_str(path.name)
                result = read_json(result_path) if result_path.is_file() else None
                # Reuse a measurement only if it was made on this very file with the same protocol.
                if (
                    result is None
                    or result_path.stat().st_mtime < path.stat().st_mtime
                    or any(result.get(key) != value for key, value in protocol.items())
                ):
                    result = evaluate_module.evaluate_model(
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
            for key in ("latency_ms_median_1t", "latency_ms_median_2t"):
                if all(key in r for r in results):
                    aggregated[key] = mean_std([r[key] for r in results])
            aggregated["threads"] = threads
            aggregated["runtime"] = results[0].get("runtime", "LiteRT")
            if all("xnnpack_partitions" in r for r in results):
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
    from steeldefect.runtime.backends import model_files

    summary = runfolder.load_summary(run)
    done = {name: entry for name, entry in summary["backbones"].items() if entry.get("status") == "done"}
    if not done:
        return None
    best = max(done, key=lambda name: done[name]["cv"][f"{done[name]['best_learning_rate']:g}"]["mean"])
    entry = done[best]
    models = {}
    labels = ["keras", *VARIANTS, *(runfolder.model_label(f, v) for f in MODEL_FORMATS[1:] for v in FORMAT_VARIANTS)]
    for variant in labels:
        source = fold_model_path(run, best, runfolder.FINAL, *_variant_and_format(variant))
        target = runfolder.deploy_model_path(run, *_variant_and_format(variant))
        if not (source.is_file() and sidecar_path(source).is_file()):
            target.unlink(missing_ok=True)
            sidecar_path(target).unlink(missing_ok=True)
            continue
        for source_file, target_file in zip(model_files(source), model_files(target)):
            _link_or_copy(source_file, target_file)  # an OpenVINO IR is the .xml and its .bin
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


def _variant_and_format(label: str) -> tuple[str, str]:
    """(variant, format) of a table label (``int8``, ``onnx-int8``), as fold_model_path takes them."""
    fmt, variant = runfolder.split_label(label)
    return variant, fmt


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
