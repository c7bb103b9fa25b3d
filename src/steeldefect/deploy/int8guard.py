"""The int8 guard of `export`: every int8 variant is scored against its own float model on images
that are not the test split, and a conversion that loses too much is remedied before it is written.

What is measured (:func:`measure`), on the images :class:`CheckData` holds:

* fold models: their fold's out-of-fold validation images (the fold's head never trained on them);
* the deploy model (refitted on every training image): the training images, the rows `train` scored
  out of fold. The deploy model did see them, so its margins there are wider than on new images;
  the fold models' checks are the unbiased estimate of the same conversion's drop.

The reference is the model's own float (Keras) output on the same images; the figures are the
accuracy drop in points, each class's recall drop in points, and the share of images whose top-1
class changes between float and int8.

The threshold (:class:`GuardSettings`): a drop of more than 0.5 point of accuracy, or any class losing
more than 2 points of recall. Above it, ``mode="fix"`` tries, in this order, and ships the first
conversion that passes (:data:`REMEDIES`):

1. ``calibration``: recalibrate on the model's own training images (a fold model: its fold's training
   part only, so the check images stay unseen), class-balanced up to ``calibration_cap`` images;
   the file stays full-integer.
2. ``float-layers``: keep the few layers with the worst per-layer int8 error (the
   QuantizationDebugger statistic the `quant-debug` report plots, RMSE / quantization step) in
   float, by the converter's selective quantization (``denylisted_nodes``): 3 layers, then 10 (never
   more than a quarter of the quantized layers).
3. ``int8-mixed``: int8 from 1/8 of the input resolution on, float before
   (:func:`steeldefect.models.conversion.convert`), for the ``int8`` variant.

Later remedies use whichever calibration set gave the smaller drop. When none passes, the file as
converted is written, a warning line says so, and the record (embedded in the model's metadata,
copied into summary.json and the report) says ``passes: false``. ``mode="warn"`` measures and warns
without remedies; ``mode="off"`` skips the check.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from steeldefect.models.conversion import (
    convert,
    convert_with_float_layers,
    high_resolution_outputs,
    representative_dataset,
)

log = logging.getLogger(__name__)

MODES = ("off", "warn", "fix")
REMEDIES = ("calibration", "float-layers", "int8-mixed")
# How many of the worst layers `float-layers` keeps in float, tried in turn.
FLOAT_LAYER_COUNTS = (3, 10)
# Training images the quantization debugger compares float and int8 layer outputs on.
DEBUG_IMAGES = 20


@dataclass(frozen=True)
class GuardSettings:
    """``--int8-guard`` and its threshold, in points (percent)."""

    mode: str = "fix"
    max_accuracy_drop: float = 0.5
    max_recall_drop: float = 2.0
    calibration_cap: int = 1000

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"int8 guard mode must be one of {MODES}, got {self.mode!r}")

    def describe(self) -> dict[str, Any]:
        return {"accuracy_points": self.max_accuracy_drop, "class_recall_points": self.max_recall_drop}


@dataclass(frozen=True)
class CheckData:
    """What one model's int8 conversion is checked on and, if it fails, recalibrated on."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    description: str
    calibration_images: np.ndarray
    calibration_description: str


def balanced_rows(labels: np.ndarray, rows: np.ndarray, cap: int, seed: int = 42) -> np.ndarray:
    """Every row of ``rows`` when there are at most ``cap``; else the same number per class (a class
    with fewer gives all it has), drawn with ``seed``."""
    rows = np.asarray(rows)
    if len(rows) <= cap:
        return np.sort(rows)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels[rows])
    quota = cap // len(classes)
    chosen = []
    for cls in classes:
        pool = rows[labels[rows] == cls]
        chosen.append(rng.choice(pool, size=min(quota, len(pool)), replace=False))
    return np.sort(np.concatenate(chosen))


def check_data(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    check_rows: np.ndarray,
    training_rows: np.ndarray,
    description: str,
    calibration_cap: int = 1000,
) -> CheckData:
    calibration = balanced_rows(labels, training_rows, calibration_cap)
    counts = np.bincount(labels[calibration], minlength=len(class_names))
    return CheckData(
        images=images[np.sort(check_rows)],
        labels=labels[np.sort(check_rows)],
        class_names=tuple(class_names),
        description=description,
        calibration_images=images[calibration],
        calibration_description=f"{len(calibration)} training images ({', '.join(str(int(c)) for c in counts)} "
        "per class)",
    )


def measure(reference: np.ndarray, quantized: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict:
    """Float vs int8 on the same labelled images: accuracy (%), drop in points (float - int8, so a
    loss is positive), each class's recall drop in points, and the share of images whose top-1 class
    changes (%)."""
    float_top1, int8_top1 = reference.argmax(axis=1), quantized.argmax(axis=1)
    recall_drop = {}
    for cls, name in enumerate(class_names):
        rows = labels == cls
        if rows.any():
            recall_drop[name] = round(
                100 * (float(np.mean(float_top1[rows] == cls)) - float(np.mean(int8_top1[rows] == cls))), 4
            )
    worst = max(recall_drop, key=lambda name: recall_drop[name]) if recall_drop else None
    fp32_accuracy, int8_accuracy = 100 * float(np.mean(float_top1 == labels)), 100 * float(np.mean(int8_top1 == labels))
    return {
        "images": int(len(labels)),
        "fp32_accuracy": round(fp32_accuracy, 4),
        "int8_accuracy": round(int8_accuracy, 4),
        "accuracy_drop": round(fp32_accuracy - int8_accuracy, 4),
        "class_recall_drop": recall_drop,
        "worst_class": worst,
        "worst_class_recall_drop": recall_drop[worst] if worst else 0.0,
        "top1_changed": round(100 * float(np.mean(float_top1 != int8_top1)), 4),
    }


def passes(figures: dict, settings: GuardSettings) -> bool:
    return (
        figures["accuracy_drop"] <= settings.max_accuracy_drop
        and figures["worst_class_recall_drop"] <= settings.max_recall_drop
    )


def float_probabilities(model, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """The Keras model's class probabilities (its narrowest output when it has several)."""
    outputs = model.predict(images.astype(np.float32), batch_size=batch_size, verbose=0)
    if isinstance(outputs, (list, tuple)):
        outputs = min(outputs, key=lambda array: int(np.prod(array.shape[1:])))
    return np.asarray(outputs, dtype=np.float32)


def tflite_probabilities(flatbuffer: bytes, images: np.ndarray) -> np.ndarray:
    from steeldefect.runtime.litert import make_interpreter, predict_tflite

    return predict_tflite(make_interpreter(flatbuffer), images)


def worst_layers(model, calibration_images: np.ndarray, count: int, *, exclude: Sequence[str] = ()) -> list[str]:
    """The ``count`` output tensors (at most a quarter of them) with the largest int8 error per
    quantization step (RMSE / scale, measured by the QuantizationDebugger on a few calibration
    images), worst first."""
    import csv

    import tensorflow as tf

    from steeldefect.models.conversion import batch1_converter

    converter = batch1_converter(model, model.input_shape[1:])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset(calibration_images)
    step = max(1, len(calibration_images) // DEBUG_IMAGES)
    debug = calibration_images[::step][:DEBUG_IMAGES]
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=lambda: ([image.astype(np.float32)[None]] for image in debug)
    )
    with contextlib.redirect_stdout(io.StringIO()):
        debugger.run()
    buffer = io.StringIO()
    debugger.layer_statistics_dump(buffer)
    ranked = []
    for row in csv.DictReader(io.StringIO(buffer.getvalue())):
        scale = float(row["scale"]) if row.get("scale") else 0.0
        if scale > 0 and row["tensor_name"] not in exclude:
            ranked.append((np.sqrt(float(row["mean_squared_error"])) / scale, row["tensor_name"]))
    # "A few": never more than a quarter of the quantized layers, else the file is a float model.
    count = min(count, max(1, len(ranked) // 4))
    return [name for _, name in sorted(ranked, reverse=True)[:count]]


def guarded_convert(
    model,
    variant: str,
    calibration_images: np.ndarray,
    check: CheckData,
    settings: GuardSettings,
    *,
    int8_flatbuffer: bytes | None = None,
    name: str = "model",
) -> tuple[bytes, dict[str, Any], bytes]:
    """Convert ``model`` to ``variant`` (``int8`` or ``int8-mixed``), check it, and remedy it when
    ``settings.mode == "fix"`` (see the module docstring). Returns the flatbuffer to write, the
    record of what was measured, tried and shipped, and the conversion before any remedy."""
    started = time.perf_counter()
    flatbuffer = as_converted = convert(model, variant, calibration_images, int8_flatbuffer=int8_flatbuffer)
    conversion_seconds = time.perf_counter() - started
    reference = float_probabilities(model, check.images)

    def score(candidate: bytes) -> dict:
        return measure(reference, tflite_probabilities(candidate, check.images), check.labels, check.class_names)

    before = score(flatbuffer)
    record: dict[str, Any] = {
        "mode": settings.mode,
        "checked_on": check.description,
        "threshold": settings.describe(),
        "before": before,
        "passes_before": passes(before, settings),
        "remedies": [],
        "shipped": "as converted",
        "after": before,
        "passes": passes(before, settings),
    }
    if not record["passes"] and settings.mode == "fix":
        flatbuffer = _remedy(model, variant, calibration_images, check, settings, score, flatbuffer, record)
    record["guard_seconds"] = round(time.perf_counter() - started - conversion_seconds, 2)
    if not record["passes"]:
        after = record["after"]
        record["warning"] = (
            f"{name} {variant}: int8 loses {after['accuracy_drop']:.2f} point(s) of accuracy and "
            f"{after['worst_class_recall_drop']:.2f} of {after['worst_class']} recall against its float model "
            f"on {check.description} (threshold {settings.max_accuracy_drop} / {settings.max_recall_drop}); "
            + (
                "no remedy passed, the file is written as converted"
                if settings.mode == "fix"
                else f"written as converted (--int8-guard {settings.mode})"
            )
        )
        log.warning("%s", record["warning"])
    elif record["shipped"] != "as converted":
        log.info("%s %s: int8 guard shipped remedy %s", name, variant, record["shipped"])
    return flatbuffer, record, as_converted


def _remedy(model, variant, calibration_images, check, settings, score, flatbuffer, record) -> bytes:
    """Try :data:`REMEDIES` in order; the first conversion that passes is returned (and the record
    updated), else ``flatbuffer`` unchanged."""
    best_calibration, best_figures = calibration_images, record["before"]

    def attempt(remedy: str, detail: str, build) -> bytes | None:
        started = time.perf_counter()
        try:
            candidate = build()
        except Exception as error:  # a converter failure is a remedy that did not work, not a crash
            record["remedies"].append({"remedy": remedy, "detail": detail, "error": str(error).splitlines()[0]})
            return None
        figures = score(candidate)
        ok = passes(figures, settings)
        record["remedies"].append(
            {
                "remedy": remedy,
                "detail": detail,
                "after": figures,
                "passes": ok,
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
        if ok:
            record.update(shipped=remedy, after=figures, passes=True, shipped_detail=detail)
            return candidate
        return None

    recalibrated = check.calibration_images
    candidate = attempt(
        "calibration",
        f"recalibrated on {check.calibration_description}",
        lambda: convert(model, variant, recalibrated, int8_flatbuffer=None),
    )
    if candidate is not None:
        return candidate
    last = record["remedies"][-1]
    if "after" in last and _worse(best_figures, last["after"]):
        best_calibration = recalibrated
    base_float = high_resolution_outputs(convert(model, "int8", best_calibration)) if variant == "int8-mixed" else []
    for count in FLOAT_LAYER_COUNTS:
        layers: list[str] = []

        def build(count=count, layers=layers) -> bytes:
            layers.extend(worst_layers(model, best_calibration, count, exclude=base_float))
            return convert_with_float_layers(model, best_calibration, [*base_float, *layers])

        candidate = attempt("float-layers", f"{count} worst layers kept in float", build)
        if layers:
            record["remedies"][-1]["float_layers"] = layers
        if candidate is not None:
            return candidate
    if variant == "int8":
        candidate = attempt(
            "int8-mixed",
            "the int8-mixed conversion shipped as int8",
            lambda: convert(model, "int8-mixed", best_calibration),
        )
        if candidate is not None:
            return candidate
    return flatbuffer


def _worse(a: dict, b: dict) -> bool:
    """Whether figures ``a`` lose more than ``b`` (accuracy drop first, then the worst class)."""
    return (a["accuracy_drop"], a["worst_class_recall_drop"]) > (b["accuracy_drop"], b["worst_class_recall_drop"])


def summary_entry(record: dict[str, Any]) -> dict[str, Any]:
    """The figures of a record that summary.json keeps (before/after, what shipped, the cost)."""
    keep = ("accuracy_drop", "worst_class", "worst_class_recall_drop", "top1_changed", "images")
    return {
        "checked_on": record["checked_on"],
        "before": {key: record["before"][key] for key in keep},
        "after": {key: record["after"][key] for key in keep},
        "shipped": record["shipped"],
        "passes": record["passes"],
        "tried": [entry["remedy"] for entry in record["remedies"]],
        "guard_seconds": record.get("guard_seconds"),
        "mode": record["mode"],
    }


def report_section(backbones: dict[str, dict[str, Any]]) -> list[str]:
    """The report's "int8 guard" section: one row per checked model and int8 variant (from summary.json),
    saying plainly when a file that failed the check was shipped anyway."""
    rows = []
    for name, entry in backbones.items():
        for fold, variants in (entry.get("int8_check") or {}).items():
            for variant, record in variants.items():
                before, after = record["before"], record["after"]
                if record["passes"]:
                    verdict = "passes" if record["shipped"] == "as converted" else f"passes after {record['shipped']}"
                elif record["mode"] == "fix":
                    verdict = "**FAILS: no remedy passed, shipped as converted**"
                else:
                    verdict = f"**FAILS (--int8-guard {record['mode']}), shipped as converted**"
                rows.append(
                    f"| {name} | {fold} | {variant} | {before['images']} | {_figures(before)} | "
                    f"{_figures(after)} | {verdict} | {record.get('guard_seconds') or 0:.0f} |"
                )
    if not rows:
        return []
    return [
        "## int8 guard: each int8 file against its own float model",
        "",
        "| Backbone | Model | Variant | Images | Before: accuracy drop / worst class recall drop / top-1 changed "
        "| After (the file shipped), same figures | Verdict | Guard s |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Drops in points, top-1 changed in % of the images; measured on out-of-fold validation images (fold "
        "models) and the training images (deploy model), never the test split. Threshold: 0.5 point of "
        "accuracy or 2 points of any class's recall (docs/int8-guard.md).",
        "",
    ]


def _figures(figures: dict[str, Any]) -> str:
    return (
        f"{figures['accuracy_drop']:.2f} / {figures['worst_class_recall_drop']:.2f} ({figures['worst_class']}) / "
        f"{figures['top1_changed']:.2f}"
    )
