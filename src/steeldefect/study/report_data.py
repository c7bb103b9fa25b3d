"""What the report reads and how it writes it: the reference study's published figures, the run folder's
records (CV rows, training setup, variants' status and sizes), and the number and Markdown-table
formatting shared by the report's text (:mod:`steeldefect.study.report`) and its figures
(:mod:`steeldefect.study.report_plots`)."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Figure + the Agg canvas instead of pyplot: no global backend switch, no GUI, no shared state.
from steeldefect.core import runfolder
from steeldefect.core.files import read_json

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
