"""RUN/report.md: the reference study's five tables regenerated with our figures beside its own.

The report only reads what the pipeline wrote (summary.json, config.json, the per-backbone CSV/JSON
files and model file sizes); it never recomputes a metric and never imports TensorFlow, so it runs in
seconds on any machine a run folder was copied to. Whatever is missing is marked, never fatal.
Output is deterministic: the only dates in it are those read from the run.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Figure + the Agg canvas instead of pyplot: no global backend switch, no GUI, no shared state.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from steeldefect.core import runfolder
from steeldefect.core.files import atomic_write_bytes, atomic_write_text, read_json, write_csv
from steeldefect.core.runfolder import require_run
from steeldefect.deploy import int8guard

log = logging.getLogger(__name__)

REFERENCE_TITLE = "Image-based Classification of Steel Surface Defects using Lightweight CNNs"
# The reference's three backbones always get rows (to show its figures); others only when in the run.
BACKBONE_ORDER = ("mobilenet", "efficientnetb0", "vgg16", "efficientnet_lite0")
DISPLAY_NAMES = {
    "mobilenet": "MobileNetV1",
    "efficientnetb0": "EfficientNetB0",
    "vgg16": "VGG-16",
    "efficientnet_lite0": "EfficientNet-Lite0",
}
VARIANTS = ("keras", "fp32", "fp16", "int8")
METRICS = {"accuracy": "Accuracy", "precision_macro": "Precision", "recall_macro": "Recall"}
STAGES = ("features", "grid", "test", "join", "export", "quant_debug", "evaluate")
# (number, variant, title) of the reference's Tables 1-4.
METRIC_TABLES = (
    (1, "keras", "Keras models"),
    (2, "fp32", "TFLite float32"),
    (3, "fp16", "TFLite float16"),
    (4, "int8", "TFLite int8"),
)
MISSING = "—"

MeanStd = tuple[float, float]


def _prf(acc: MeanStd, prec: MeanStd, rec: MeanStd) -> dict[str, MeanStd]:
    return {"accuracy": acc, "precision_macro": prec, "recall_macro": rec}


_MOBILENET_FLOAT = _prf((94.81, 0.97), (94.97, 0.94), (94.49, 1.02))
_EFFNETB0_FLOAT = _prf((99.48, 0.38), (99.46, 0.39), (99.48, 0.38))
_VGG16_FLOAT = _prf((99.63, 0.33), (99.65, 0.32), (99.63, 0.33))
# Reference Tables 1-4: percent, mean ± std over its 5 fold models, as printed in the study.
REFERENCE_METRICS: dict[str, dict[str, dict[str, MeanStd]]] = {
    "mobilenet": {
        "keras": _MOBILENET_FLOAT,
        "fp32": _MOBILENET_FLOAT,
        "fp16": _prf((94.44, 0.94), (94.63, 0.91), (94.09, 1.00)),
        "int8": _prf((58.07, 6.03), (60.94, 6.61), (61.44, 6.36)),
    },
    "efficientnetb0": {
        "keras": _EFFNETB0_FLOAT,
        "fp32": _EFFNETB0_FLOAT,
        "fp16": _EFFNETB0_FLOAT,
        "int8": _prf((97.56, 1.01), (97.57, 0.85), (97.53, 0.93)),
    },
    "vgg16": {
        "keras": _VGG16_FLOAT,
        "fp32": _VGG16_FLOAT,
        "fp16": _VGG16_FLOAT,
        "int8": _prf((99.56, 0.28), (99.57, 0.27), (99.56, 0.28)),
    },
}
# Reference Table 5: model size in MB as printed (its Keras size is the .h5 file) ...
REFERENCE_SIZE_MB: dict[str, dict[str, float]] = {
    "mobilenet": {"keras": 86.19, "fp32": 36.74, "fp16": 18.39, "int8": 9.48},
    "efficientnetb0": {"keras": 108.08, "fp32": 45.95, "fp16": 23.04, "int8": 12.34},
    "vgg16": {"keras": 93.08, "fp32": 68.43, "fp16": 34.22, "int8": 17.22},
}
# ... and latency in ms on a Colab CPU (mean ± std of single runs without warm-up).
REFERENCE_LATENCY_MS: dict[str, dict[str, MeanStd]] = {
    "mobilenet": {"fp32": (21.63, 1.93), "fp16": (21.84, 2.96), "int8": (18.90, 1.29)},
    "efficientnetb0": {"fp32": (82.90, 16.05), "fp16": (78.37, 3.23), "int8": (95.84, 1.15)},
    "vgg16": {"fp32": (592.98, 21.98), "fp16": (570.17, 6.12), "int8": (576.29, 19.91)},
}


def write_report(run: Path) -> Path:
    """Write RUN/report.md, RUN/report_tables/*.csv and RUN/plots/*.png; return the report's path.

    Raises :class:`steeldefect.core.runfolder.NotARunError` (nothing written) when ``run`` holds no run.
    """
    run = require_run(Path(run)).resolve()
    summary = _load(runfolder.summary_path(run)) or {}
    config = _load(runfolder.config_path(run)) or {}
    backbones: dict[str, dict[str, Any]] = summary.get("backbones") or {}
    names = [n for n in BACKBONE_ORDER if n in REFERENCE_METRICS or n in backbones]
    names += sorted(set(backbones) - set(names))

    lines = _header(run, summary, config, names, backbones)
    lines += _deploy_section(summary)
    for number, variant, title in METRIC_TABLES:
        header, rows, csv_rows = _metric_table(names, backbones, variant)
        csv_name = f"table{number}_{variant}.csv"
        write_csv(runfolder.report_tables_dir(run) / csv_name, csv_rows)
        lines += [
            f"## Table {number} — {title}: test metrics (%)",
            "",
            _md_table(header, rows),
            "",
            f"Ours and the reference: mean ± std over the fold models (`Models` = how many of ours). "
            f"CSV: [report_tables/{csv_name}](report_tables/{csv_name})",
            "",
        ]
    header, rows, csv_rows = _size_latency_table(run, names, backbones)
    write_csv(runfolder.report_tables_dir(run) / "table5_size_latency.csv", csv_rows)
    lines += [
        "## Table 5 — model size and latency",
        "",
        _md_table(header, rows),
        "",
        "- Size: ours in MiB (2^20 bytes, mean over the fold model files; Keras = our `.keras` file), "
        "the reference's in MB as printed (its Keras size is an `.h5` file).",
        f"- Latency per image at batch 1: ours = {_latency_method(config)} on {_machine(summary)}, "
        "mean ± std over the fold models; the reference = mean ± std of single runs without warm-up "
        "on a Colab CPU, so the two columns are not measured the same way.",
        "- CSV: [report_tables/table5_size_latency.csv](report_tables/table5_size_latency.csv)",
        "",
    ]
    lines += _extra_variants_section(run, names, backbones)
    lines += int8guard.report_section({name: backbones[name] for name in names if name in backbones})
    lines += _per_class_section(run, names, backbones, summary)
    lines += _trust_section(run, names, backbones)
    lines += _cv_section(run, names, backbones)
    lines += _plots_section(run, names, backbones, summary)
    lines += _gallery_section(run, names, backbones)
    return atomic_write_text(runfolder.report_path(run), "\n".join(lines).rstrip("\n") + "\n")


def _deploy_section(summary: dict[str, Any]) -> list[str]:
    """The one model to put on a line, how it was made and how it tested (single model, no ± std)."""
    deploy = summary.get("deploy")
    if not deploy:
        return []
    rows = []
    for variant, path in deploy.get("models", {}).items():
        test = deploy.get("test", {}).get(variant, {})
        rows.append(
            [
                f"`{path}`",
                variant,
                _fmt(test.get("accuracy")),
                _fmt(test.get("precision_macro")),
                _fmt(test.get("recall_macro")),
                _fmt(test.get("size_mib")),
                _flagged((test.get("uncertain") or {}).get("flagged_test_share")),
            ]
        )
    cv = deploy.get("cv_accuracy") or {}
    return [
        "## Model to deploy",
        "",
        f"{deploy.get('display_name', deploy.get('backbone'))}, head refitted on every training image at learning "
        f"rate {deploy.get('learning_rate', 0):g} (chosen by the grid: CV accuracy {_fmt(cv.get('mean'))} ± "
        f"{_fmt(cv.get('std'))}), then joined, exported and tested once on the test split. "
        "`steeldefect predict RUN PATH...` uses `deploy/model.int8.tflite`.",
        "",
        _md_table(["File", "Variant", "Accuracy", "Precision", "Recall", "Size (MiB)", "Uncertain (test)"], rows),
        "",
        "Uncertain (test): the share of test images the model's own uncertainty rule flags (it is set to "
        "accept 99% of in-distribution images; see *Calibration and uncertainty*).",
        "",
    ]


def _flagged(share: Any) -> str:
    return "—" if share is None else f"{100 * share:.1f}%"


def _trust_section(run: Path, names: list[str], backbones: dict[str, Any]) -> list[str]:
    """Temperature and test ECE per backbone with the reliability diagram; the deploy models' rule."""
    lines: list[str] = []
    for name in names:
        entry = backbones.get(name) or {}
        calibration = entry.get("calibration")
        if not calibration:
            continue
        test = calibration.get("test", {})
        plot = runfolder.reliability_plot_path(run, name)
        lines += [
            f"### {_display(name, entry)}",
            "",
            f"Temperature **{calibration['temperature']:.2f}**, fitted on the {calibration['fitted_on']}; "
            f"never on a test image. Test split ({test.get('images')} images, {test.get('over')}), 15-bin ECE "
            f"{_fmt(100 * test['ece_before'])}% before, {_fmt(100 * test['ece_after'])}% after; NLL "
            f"{test['nll_before']:.4f} before, {test['nll_after']:.4f} after. "
            + (
                "The temperature made the test split worse: at this accuracy almost every answer sits in the "
                "top bin and a few images decide the ECE; it is recorded with the model, not relied on."
                if test["ece_after"] > test["ece_before"]
                else "Served as `confidence` by `steeldefect serve`."
            ),
            "",
        ]
        if plot.is_file():
            lines += [f"![reliability diagram]({plot.relative_to(run)})", ""]
        rows = []
        for variant, metrics in (entry.get("final") or {}).items():
            judged = metrics.get("uncertain") if isinstance(metrics, dict) else None
            if judged:
                rows.append(
                    [
                        variant,
                        f"{judged['threshold']:.4f}",
                        f"{100 * judged['accept']:.1f}%",
                        _flagged(judged["flagged_test_share"]),
                        _fmt(None if judged["accepted_accuracy"] is None else 100 * judged["accepted_accuracy"]),
                        _fmt(metrics.get("accuracy")),
                    ]
                )
        if rows:
            predictions = runfolder.test_predictions_path(run, name)
            lines += [
                "Uncertainty rule of the final model (each variant fitted on its own outputs for the training "
                "images; threshold from out-of-fold scores): an image is *uncertain* when its texture "
                "statistics (four backbone layers, likelihood under the nearest class) or its top "
                "probability rank beyond the accepted share of training images.",
                "",
                _md_table(
                    ["Variant", "Threshold (rank)", "Accepts", "Test flagged", "Accuracy of accepted", "Accuracy"],
                    rows,
                ),
                "",
            ]
            if predictions.is_file():
                lines += [f"Per test image: [{predictions.relative_to(run)}]({predictions.relative_to(run)})", ""]
    return ["## Calibration and uncertainty", "", *lines] if lines else []


# ---------------------------------------------------------------- reading the run


def _load(path: Path) -> Any:
    """A JSON file's contents, or None when it is missing or unreadable (reported, never fatal)."""
    try:
        return read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("%s: unreadable (%s); reported as missing", path, error)
        return None


def _read_cv_rows(path: Path) -> list[dict[str, float]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as error:
        log.warning("%s: unreadable (%s); reported as missing", path, error)
        return []


def _training_setup(config: dict[str, Any]) -> str:
    """What changes the numbers beside the backbone: head, features, augmentation, class weights,
    fine-tuning, test-time averaging (options absent from an older run count as their defaults)."""
    train = ((config.get("commands") or {}).get("train") or {}).get("options") or {}
    if not train:
        return ""
    parts = [f"head {train.get('head', 'flatten')}", f"features {train.get('features', 'maps')}"]
    if train.get("boxes"):
        parts.append(f"attention taught by the training images' boxes in {Path(train['boxes']).name}/")
    if train.get("augment"):
        parts.append(f"{train['augment']} {train.get('augment_views', 'random')} augmented views per training image")
    parts.append(f"class weights {train.get('class_weight', 'auto')}")
    if train.get("fine_tune"):
        parts.append(f"top {train['fine_tune']} blocks fine-tuned")
    export = ((config.get("commands") or {}).get("export") or {}).get("options") or {}
    if export.get("tta"):
        parts.append("exported files average the 8 flips/rotations of each image")
    return ", ".join(parts)


def _display(name: str, entry: dict[str, Any] | None) -> str:
    return (entry or {}).get("display_name") or DISPLAY_NAMES.get(name, name)


def _status(entry: dict[str, Any] | None) -> str:
    """'done', the pipeline's own status text (e.g. 'not run: weights missing'), or 'not run'."""
    return "not run" if entry is None else str(entry.get("status", "unknown"))


def _variant(entry: dict[str, Any] | None, variant: str) -> dict[str, Any] | None:
    if _status(entry) != "done":
        return None
    return ((entry or {}).get("variants") or {}).get(variant)


def _keras_size_mib(run: Path, name: str) -> float | None:
    """Mean size of our saved fold models (reading file sizes, not recomputing anything)."""
    sizes = [path.stat().st_size / 2**20 for path in runfolder.keras_models(run, name)]
    return float(np.mean(sizes)) if sizes else None


# ---------------------------------------------------------------- formatting


def _fmt(value: Any, digits: int = 2) -> str:
    """`99.63 ± 0.33` from {'mean', 'std'} or (mean, std); a bare number as is; None as a dash."""
    if value is None:
        return MISSING
    if isinstance(value, dict):
        value = (value.get("mean"), value.get("std"))
    if isinstance(value, (tuple, list)):
        mean, std = value
        if mean is None:
            return MISSING
        return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{value:.{digits}f}"


def _mean_std(value: Any) -> tuple[Any, Any]:
    """(mean, std) of a summary value for the CSVs, rounded; blanks when missing."""
    if isinstance(value, dict):
        value = (value.get("mean"), value.get("std"))
    if isinstance(value, (tuple, list)):
        return tuple(round(float(v), 4) if v is not None else "" for v in value)  # type: ignore[return-value]
    return (round(float(value), 4), "") if value is not None else ("", "")


def _mean(value: Any) -> float | None:
    """The mean of a summary value ({'mean', 'std'} or a bare number); None when missing."""
    mean = value.get("mean") if isinstance(value, dict) else value
    return float(mean) if isinstance(mean, (int, float)) else None


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _ours_note(entry: dict[str, Any] | None) -> str:
    """What a row shows instead of our numbers: the backbone's status, or 'not measured'."""
    status = _status(entry)
    return "not measured" if status == "done" else status


def _machine(summary: dict[str, Any]) -> str:
    machine = summary.get("latency_machine") or {}
    if not machine:
        return "an unrecorded machine"
    return f"{machine.get('cpu', 'unknown CPU')} with {machine.get('threads', '?')} thread(s)"


def _latency_method(config: dict[str, Any]) -> str:
    options = ((config.get("commands") or {}).get("evaluate") or {}).get("options") or {}
    return f"median of {options.get('runs', 50)} timed invokes after {options.get('warmup', 10)} warm-ups"


# ---------------------------------------------------------------- sections


def _header(
    run: Path, summary: dict[str, Any], config: dict[str, Any], names: list[str], backbones: dict[str, Any]
) -> list[str]:
    lines = [
        f"# Steel surface defect classification — report of `{run.name}`",
        "",
        f"Our figures beside those of the reference study *{REFERENCE_TITLE}*.",
        "",
        f"- Run folder: `{run}`",
    ]
    if not summary:
        lines.append("- `summary.json` missing or unreadable: no figures of ours below")
    dataset = summary.get("dataset") or _load(runfolder.dataset_path(run)) or {}
    if dataset:
        counts = ", ".join(f"{k} {v}" for k, v in (dataset.get("counts") or {}).items())
        lines.append(
            f"- Dataset: `{dataset.get('root', '?')}` (layout {dataset.get('layout', '?')}, fingerprint "
            f"`{str(dataset.get('fingerprint', '?'))[:16]}`, image size {dataset.get('image_size', '?')}); "
            f"{dataset.get('n_images', '?')} images = {dataset.get('n_train', '?')} train + "
            f"{dataset.get('n_test', '?')} test; per class: {counts or '?'}"
        )
    else:
        lines.append("- Dataset: not recorded")
    lines.append(f"- Latency measured on: {_machine(summary)}")
    for command, record in (config.get("commands") or {}).items():
        env = record.get("environment") or {}
        versions = ", ".join(f"{key} {value}" for key, value in env.items())
        versions = versions or "environment not recorded"
        lines.append(f"- `{command}` started {record.get('started', '?')}: {versions}")
    if not config:
        lines.append("- `config.json` missing: environment not recorded")
    setup = _training_setup(config)
    if setup:
        lines.append(f"- Training: {setup}")
    for name in names:
        entry = backbones.get(name)
        if _status(entry) == "done" and entry.get("best_learning_rate") is not None:
            lines.append(f"- {_display(name, entry)}: best learning rate {entry['best_learning_rate']:g}")
    if summary.get("reproduce_wall_time_s") is not None:
        seconds = float(summary["reproduce_wall_time_s"])
        lines.append(f"- `reproduce` wall time: {seconds:.1f} s ({seconds / 60:.1f} min)")
    lines.append("")
    # Backbones that were requested but could not run, with the pipeline's reason.
    not_run = [(n, backbones[n]) for n in names if n in backbones and _status(backbones[n]) != "done"]
    for name, entry in not_run:
        reason = f" ({entry['reason']})" if entry.get("reason") else ""
        lines.append(f"**{_display(name, entry)}: {_status(entry)}**{reason}")
    if not_run:
        lines.append("")
    timed = {n: backbones[n]["wall_time_s"] for n in names if (backbones.get(n) or {}).get("wall_time_s")}
    if timed:
        stages = [s for s in STAGES if any(s in t for t in timed.values())]
        stages += sorted({s for t in timed.values() for s in t} - set(stages))
        rows = [
            [_display(n, backbones[n])] + [_fmt(t.get(s), 1) for s in stages] + [_fmt(sum(t.values()), 1)]
            for n, t in timed.items()
        ]
        lines += ["### Wall time per stage (s)", "", _md_table(["Backbone", *stages, "total"], rows), ""]
    return lines


def _metric_table(
    names: list[str], backbones: dict[str, Any], variant: str
) -> tuple[list[str], list[list[str]], list[dict[str, Any]]]:
    header = ["Backbone"] + [f"{label} {who}" for label in METRICS.values() for who in ("ours", "reference")]
    header.append("Models")
    rows, csv_rows = [], []
    for name in names:
        entry = backbones.get(name)
        ours = _variant(entry, variant)
        reference = REFERENCE_METRICS.get(name, {}).get(variant)
        row = [_display(name, entry)]
        csv_row: dict[str, Any] = {
            "backbone": name,
            "display_name": row[0],
            "variant": variant,
            "status": _status(entry) if ours else _ours_note(entry),
        }
        for index, metric in enumerate(METRICS):
            # A row without our numbers carries its status once, in the first "ours" cell.
            row.append(_fmt(ours.get(metric)) if ours else (_ours_note(entry) if index == 0 else MISSING))
            row.append(_fmt(reference[metric]) if reference else "not in reference")
            csv_row[f"{metric}_mean"], csv_row[f"{metric}_std"] = _mean_std(ours.get(metric) if ours else None)
            csv_row[f"ref_{metric}_mean"], csv_row[f"ref_{metric}_std"] = _mean_std(
                reference[metric] if reference else None
            )
        csv_row["n_models"] = ours.get("n_models", "") if ours else ""
        row.append(str(csv_row["n_models"]) if ours else MISSING)
        rows.append(row)
        csv_rows.append(csv_row)
    return header, rows, csv_rows


def _size_latency_table(
    run: Path, names: list[str], backbones: dict[str, Any]
) -> tuple[list[str], list[list[str]], list[dict[str, Any]]]:
    header = [
        "Backbone",
        "Variant",
        "Size MiB ours",
        "Size MB reference",
        "Latency ms ours (median)",
        "Latency ms ours (p90)",
        "Latency ms reference",
    ]
    rows, csv_rows = [], []
    for name in names:
        entry = backbones.get(name)
        for variant in VARIANTS:
            ours = _variant(entry, variant) or {}
            # Every fold model of a variant has the same size, so its mean is the figure to show.
            size = _keras_size_mib(run, name) if variant == "keras" else _mean(ours.get("size_mib"))
            ref_size = REFERENCE_SIZE_MB.get(name, {}).get(variant)
            ref_latency = REFERENCE_LATENCY_MS.get(name, {}).get(variant)
            untimed = "n/a" if variant == "keras" else _ours_note(entry)  # Keras models are never timed
            rows.append(
                [
                    _display(name, entry),
                    variant,
                    _fmt(size) if size is not None else _ours_note(entry),
                    _fmt(ref_size) if ref_size is not None else "not in reference",
                    _fmt(ours["latency_ms_median"]) if "latency_ms_median" in ours else untimed,
                    _fmt(ours["latency_ms_p90"]) if "latency_ms_p90" in ours else MISSING,
                    _fmt(ref_latency) if ref_latency else ("n/a" if variant == "keras" else "not in reference"),
                ]
            )
            csv_row: dict[str, Any] = {
                "backbone": name,
                "variant": variant,
                "status": _status(entry),
                "size_mib": _mean_std(size)[0],
                "ref_size_mb": _mean_std(ref_size)[0],
            }
            for key in ("latency_ms_median", "latency_ms_p90"):
                csv_row[f"{key}_mean"], csv_row[f"{key}_std"] = _mean_std(ours.get(key))
            csv_row["ref_latency_ms_mean"], csv_row["ref_latency_ms_std"] = _mean_std(ref_latency)
            csv_rows.append(csv_row)
    return header, rows, csv_rows


def _extra_variants_section(run: Path, names: list[str], backbones: dict[str, Any]) -> list[str]:
    """Variants the reference has no column for (``int8-mixed``), in one table of their own."""
    header = [
        "Backbone",
        "Variant",
        "Accuracy",
        "Macro precision",
        "Macro recall",
        "Size MiB",
        "Latency ms (median)",
        "Latency ms (p90)",
        "Models",
    ]
    rows, csv_rows = [], []
    for name in names:
        entry = backbones.get(name)
        extra = [v for v in ((entry or {}).get("variants") or {}) if v not in VARIANTS]
        for variant in extra:
            ours = _variant(entry, variant) or {}
            keys = ("accuracy", "precision_macro", "recall_macro", "size_mib", "latency_ms_median", "latency_ms_p90")
            rows.append(
                [
                    _display(name, entry),
                    variant,
                    *(_fmt(ours.get(key)) for key in keys),
                    str(ours.get("n_models", MISSING)),
                ]
            )
            csv_row: dict[str, Any] = {"backbone": name, "variant": variant, "n_models": ours.get("n_models", "")}
            for key in keys:
                csv_row[f"{key}_mean"], csv_row[f"{key}_std"] = _mean_std(ours.get(key))
            csv_rows.append(csv_row)
    if not rows:
        return []
    write_csv(runfolder.report_tables_dir(run) / "extra_variants.csv", csv_rows)
    return [
        "## Beyond the reference — other exported variants",
        "",
        "`int8-mixed`: int8 except the high-resolution start, kept in float (see the README).",
        "",
        _md_table(header, rows),
        "",
        "CSV: [report_tables/extra_variants.csv](report_tables/extra_variants.csv)",
        "",
    ]


def _per_class_section(run: Path, names: list[str], backbones: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """Recall of every class (mean ± std over the fold models): the rare or hard class shows here
    first, while the macro figures average it away."""
    classes = (summary.get("dataset") or {}).get("class_names") or []
    rows, csv_rows = [], []
    for name in names:
        entry = backbones.get(name)
        for variant in (
            "keras",
            *VARIANTS[1:],
            *[v for v in ((entry or {}).get("variants") or {}) if v not in VARIANTS],
        ):
            per_class = (_variant(entry, variant) or {}).get("recall_per_class")
            if not per_class or len(per_class) != len(classes):
                continue
            rows.append(
                [
                    _display(name, entry),
                    variant,
                    *(f"{_fmt(value['mean'])} ± {_fmt(value['std'])}" for value in per_class),
                ]
            )
            csv_rows.append(
                {
                    "backbone": name,
                    "variant": variant,
                    **{f"recall_{c}_mean": value["mean"] for c, value in zip(classes, per_class)},
                    **{f"recall_{c}_std": value["std"] for c, value in zip(classes, per_class)},
                }
            )
    if not rows:
        return []
    write_csv(runfolder.report_tables_dir(run) / "per_class_recall.csv", csv_rows)
    return [
        "## Recall per class (%)",
        "",
        _md_table(["Backbone", "Variant", *classes], rows),
        "",
        "Mean ± std over the fold models. "
        "CSV: [report_tables/per_class_recall.csv](report_tables/per_class_recall.csv)",
        "",
    ]


def _cv_stats(entry: dict[str, Any], rows: list[dict[str, float]]) -> dict[float, dict[str, Any]]:
    """Mean/std validation accuracy per learning rate: the summary's, else averaged from cv_grid.csv."""
    stats: dict[float, dict[str, Any]] = {}
    for rate, value in (entry.get("cv") or {}).items():
        stats[float(rate)] = {"mean": value.get("mean"), "std": value.get("std"), "folds": ""}
    for rate in sorted({r["learning_rate"] for r in rows}):
        values = [r["val_accuracy"] for r in rows if r["learning_rate"] == rate]
        fallback = {"mean": float(np.mean(values)), "std": float(np.std(values))}
        stats[rate] = (stats.get(rate) or fallback) | {"folds": len(values)}
    return dict(sorted(stats.items(), reverse=True))


def _cv_section(run: Path, names: list[str], backbones: dict[str, Any]) -> list[str]:
    rows, csv_rows = [], []
    for name in names:
        entry = backbones.get(name)
        if _status(entry) != "done":
            continue
        best = entry.get("best_learning_rate")
        for rate, stat in _cv_stats(entry, _read_cv_rows(runfolder.cv_grid_path(run, name))).items():
            is_best = best is not None and float(best) == rate
            rows.append(
                [
                    _display(name, entry),
                    f"{rate:g}",
                    _fmt(stat),
                    str(stat["folds"] or MISSING),
                    "**best**" if is_best else "",
                ]
            )
            mean, std = _mean_std(stat)
            csv_rows.append(
                {
                    "backbone": name,
                    "learning_rate": f"{rate:g}",
                    "val_accuracy_mean": mean,
                    "val_accuracy_std": std,
                    "folds": stat["folds"],
                    "best": int(is_best),
                }
            )
    write_csv(
        runfolder.report_tables_dir(run) / "cv_grid.csv",
        csv_rows,
        ["backbone", "learning_rate", "val_accuracy_mean", "val_accuracy_std", "folds", "best"],
    )
    table = (
        _md_table(["Backbone", "Learning rate", "Val accuracy % (mean ± std)", "Folds", ""], rows)
        if rows
        else "No cross-validation results in this run."
    )
    return [
        "## Cross-validation grid",
        "",
        table,
        "",
        "CSV: [report_tables/cv_grid.csv](report_tables/cv_grid.csv)",
        "",
    ]


# ---------------------------------------------------------------- plots


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)  # attaches the Agg canvas to the figure
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return atomic_write_bytes(path, buffer.getvalue())


def _plots_section(run: Path, names: list[str], backbones: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    plots = runfolder.plots_dir(run)
    lines = ["## Plots", ""]
    fallback_classes = (summary.get("dataset") or {}).get("class_names") or []
    for name in names:
        entry = backbones.get(name)
        if _status(entry) != "done":
            continue
        display = _display(name, entry)
        lines += [f"### {display}", ""]
        rows = _read_cv_rows(runfolder.cv_grid_path(run, name))
        if rows:
            _plot_cv_grid(rows, _cv_stats(entry, rows), display, plots / f"cv_grid_{name}.png")
            lines += [f"![{display} CV grid](plots/cv_grid_{name}.png)", ""]
        best = entry.get("best_learning_rate")
        # Numeric fold order, so fold10 follows fold9 and colours match across plots.
        paths = runfolder.history_paths(run, name, best) if best else []
        histories = [(f"fold{fold}", h) for fold, p in paths if (h := _load(p))]
        if histories:
            title = f"{display}, learning rate {best:g}"
            _plot_training_curves(histories, title, plots / f"training_curves_{name}.png")
            lines += [f"![{display} training curves](plots/training_curves_{name}.png)", ""]
        for variant in ("keras", "int8"):
            metrics = _load(runfolder.test_metrics_path(run, name, variant)) or {}
            matrices = [m["confusion_matrix"] for m in metrics.get("per_model", []) if m.get("confusion_matrix")]
            if matrices and len({np.shape(m) for m in matrices}) == 1:  # one class list for all models
                total = np.sum(np.asarray(matrices, dtype=int), axis=0)
                classes = metrics.get("class_names") or fallback_classes or [str(i) for i in range(len(total))]
                title = f"{display} {variant}: test confusion, sum over {len(matrices)} fold models"
                _plot_confusion(total, classes, title, plots / f"confusion_{name}_{variant}.png")
                lines += [f"![{display} {variant} confusion](plots/confusion_{name}_{variant}.png)", ""]
        png, csv_file = runfolder.quant_debug_path(run, name, "png"), runfolder.quant_debug_path(run, name, "csv")
        if png.is_file():
            csv_link = f" ([CSV]({csv_file.relative_to(run).as_posix()}))" if csv_file.is_file() else ""
            lines += [
                f"Per-layer int8 quantization error (fold 0): "
                f"![{display} int8 error]({png.relative_to(run).as_posix()}){csv_link}",
                "",
            ]
    points = []
    for name in names:
        for variant in ("fp32", "fp16", "int8"):
            values = _variant(backbones.get(name), variant) or {}
            numbers = [_mean(values.get(key)) for key in ("size_mib", "accuracy", "latency_ms_median")]
            if None not in numbers:
                points.append((_display(name, backbones[name]), variant, *numbers))
    if points:
        _plot_accuracy_size_latency(points, plots / "accuracy_size_latency.png")
        lines += [
            "### Accuracy, size and latency of the LiteRT models",
            "",
            "![accuracy vs size vs latency](plots/accuracy_size_latency.png)",
            "",
        ]
    if len(lines) == 2:
        lines += ["No plots: nothing in this run to plot yet.", ""]
    return lines


def _plot_confusion(matrix: np.ndarray, class_names: Sequence[str], title: str, path: Path) -> Path:
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=35, ha="right")
    ax.set_yticks(ticks, class_names)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path)


def _plot_cv_grid(rows: list[dict[str, float]], stats: dict[float, dict[str, Any]], title: str, path: Path) -> Path:
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for fold in sorted({int(r["fold"]) for r in rows}):
        points = sorted((r["learning_rate"], r["val_accuracy"]) for r in rows if int(r["fold"]) == fold)
        ax.scatter(*zip(*points), s=18, alpha=0.7, label=f"fold {fold}")
    rates = sorted(stats)
    ax.plot(rates, [stats[r]["mean"] for r in rates], color="black", marker="o", label="mean")
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel="validation accuracy (%)", title=f"{title}: CV grid")
    ax.legend(fontsize="small")
    return _save(fig, path)


def _plot_training_curves(histories: list[tuple[str, dict[str, list[float]]]], title: str, path: Path) -> Path:
    fig = Figure(figsize=(10, 4), layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    colors = [f"C{i}" for i in range(10)]
    for index, (fold, history) in enumerate(histories):
        color = colors[index % len(colors)]
        for key, ax, scale in (("accuracy", acc_ax, 100.0), ("loss", loss_ax, 1.0)):
            for prefix, style in (("", "-"), ("val_", "--")):
                values = history.get(prefix + key)
                if values:
                    epochs = range(1, len(values) + 1)
                    ax.plot(
                        epochs,
                        np.asarray(values) * scale,
                        style,
                        color=color,
                        label=f"{fold} {'val' if prefix else 'train'}",
                    )
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    acc_ax.legend(fontsize="x-small", ncol=2)
    fig.suptitle(f"{title} (solid = train, dashed = validation)")
    return _save(fig, path)


def _plot_accuracy_size_latency(points: list[tuple[str, str, float, float, float]], path: Path) -> Path:
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.add_subplot()
    _, _, sizes, accuracies, latencies = zip(*points)
    cloud = ax.scatter(sizes, accuracies, c=latencies, cmap="viridis", s=80, edgecolors="black")
    for display, variant, size, accuracy, latency in points:
        ax.annotate(
            f"{display} {variant}\n{latency:.1f} ms",
            (size, accuracy),
            fontsize="x-small",
            xytext=(5, 5),
            textcoords="offset points",
        )
    ax.margins(0.2)  # room for the labels of the outermost points
    ax.set(xlabel="model size (MiB)", ylabel="test accuracy (%)", title="LiteRT models: accuracy vs size")
    fig.colorbar(cloud, ax=ax, label="median latency (ms)")
    return _save(fig, path)


# ---------------------------------------------------------------- heatmap gallery

GALLERY_COLUMNS = 4
GALLERY_PER_FIGURE = 24  # a longer list of wrong answers is split over several figures


def _gallery_section(run: Path, names: list[str], backbones: dict[str, Any]) -> list[str]:
    """ "Where the model looked": the heatmap overlays `train` wrote (RUN/<backbone>/gallery/), composed
    into a few grids - two correct test images per class, then every misclassified or uncertain one -
    and listed. Reads gallery.csv and the PNGs only (no TensorFlow)."""
    lines: list[str] = []
    for name in names:
        rows = _read_gallery(runfolder.gallery_csv_path(run, name))
        if rows is None:
            continue
        display = _display(name, backbones.get(name))
        folder = runfolder.gallery_dir(run, name)
        record = _load(runfolder.gallery_record_path(run, name)) or {}
        wrong = [r for r in rows if r["predicted"] != r["label"] or r["uncertain"] == "true"]
        correct = [r for r in rows if r not in wrong]
        lines += [f"### {display}", ""]
        if record.get("method"):
            model = Path(str(record.get("model", "?"))).name
            if record["method"] == "attention":
                smoothing = record.get("smoothing")
                density = f", as a density (Gaussian sigma {smoothing:g} cell)" if smoothing else ""
                lines += [
                    f"Heatmaps: the attention head's own weights over the feature-map cells of `{model}`{density}.",
                    "",
                ]
            else:
                layers = " + ".join(record.get("layers") or [])
                lines += [f"Heatmaps: `{record['method']}` at `{layers}` of `{model}`.", ""]
        if correct:
            path = runfolder.plots_dir(run) / f"gallery_{name}_correct.png"
            _compose([folder / r["png"] for r in correct], path)
            lines += [
                f"Correctly classified, {len({r['label'] for r in correct})} classes:",
                "",
                f"![{display} heatmaps, correct]({path.relative_to(run).as_posix()})",
                "",
            ]
        if not wrong:
            lines += ["No test image was misclassified or marked uncertain.", ""]
            continue
        lines += [f"Every misclassified or uncertain test image ({len(wrong)}):", ""]
        for part in range(0, len(wrong), GALLERY_PER_FIGURE):
            number = part // GALLERY_PER_FIGURE + 1
            path = runfolder.plots_dir(run) / f"gallery_{name}_wrong_{number}.png"
            _compose([folder / r["png"] for r in wrong[part : part + GALLERY_PER_FIGURE]], path)
            lines += [
                f"![{display} heatmaps, misclassified or uncertain ({number})]({path.relative_to(run).as_posix()})",
                "",
            ]
        table = [
            [
                f"`{r['file']}`",
                r["label"],
                r["predicted"],
                _fmt(float(r["probability"]), 3),
                r["uncertain"],
                f"[png]({(folder / r['png']).relative_to(run).as_posix()})",
            ]
            for r in wrong
        ]
        lines += [_md_table(["File", "Label", "Predicted", "Probability", "Uncertain", "Heatmap"], table), ""]
    if not lines:
        return []
    return [
        "## Where the model looked",
        "",
        "Heatmaps of the model to deploy (the final model, refitted on all training images) on test images, "
        "for the predicted class; red = most influence, the white cross marks each map's maximum. Title: "
        "predicted class and probability, `(uncertain)` when the trust step flagged the image, `- is <label>` "
        "when wrong.",
        "",
        *lines,
    ]


def _read_gallery(path: Path) -> list[dict[str, str]] | None:
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if rows and not {"file", "label", "predicted", "probability", "uncertain", "png"} <= rows[0].keys():
        log.warning("%s: not a gallery CSV (columns file,label,predicted,probability,uncertain,png); skipped", path)
        return None
    return rows


def _compose(pngs: Sequence[Path], path: Path) -> Path:
    """One PNG: the overlays in a grid of :data:`GALLERY_COLUMNS` columns (a missing file leaves its
    cell blank rather than failing the report)."""
    from PIL import Image

    tiles = []
    for png in pngs:
        try:
            with Image.open(png) as image:
                tiles.append(image.convert("RGB"))
        except OSError:
            log.warning("%s: missing or unreadable gallery image; left blank", png)
            tiles.append(None)
    width = max((t.width for t in tiles if t), default=300)
    height = max((t.height for t in tiles if t), default=300)
    columns = min(GALLERY_COLUMNS, len(tiles))
    canvas = Image.new("RGB", (columns * width, -(-len(tiles) // columns) * height), "white")
    for k, tile in enumerate(tiles):
        if tile is not None:
            canvas.paste(tile, ((k % columns) * width, (k // columns) * height))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=True)
    return atomic_write_bytes(path, buffer.getvalue())
