"""The report's table of every model file format and variant (`export --formats`): test accuracy,
macro precision and recall (mean ± std over the fold models), size, and batch-1 latency at 1 and 2
threads, one row per (runtime, variant), LiteRT first. Shown once a run has ONNX or OpenVINO models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steeldefect.core import runfolder
from steeldefect.core.files import write_csv

RUNTIMES = {"tflite": "LiteRT", "onnx": "ONNX Runtime", "openvino": "OpenVINO"}
KEYS = (
    "accuracy",
    "precision_macro",
    "recall_macro",
    "size_mib",
    "latency_ms_median_1t",
    "latency_ms_median_2t",
)
HEADER = [
    "Backbone",
    "Runtime",
    "Variant",
    "Accuracy",
    "Macro precision",
    "Macro recall",
    "Size MiB",
    "Latency ms, 1 thread",
    "Latency ms, 2 threads",
    "Models",
]


def is_other_format(label: str) -> bool:
    """A summary variant of a format beyond LiteRT (``onnx-int8``, ``openvino-fp32``)."""
    return runfolder.split_label(label)[0] != "tflite"


def _cell(value: Any) -> str:
    if isinstance(value, dict) and value.get("mean") is not None:
        return f"{value['mean']:.2f} ± {value.get('std') or 0:.2f}"
    if isinstance(value, (int, float)):
        return f"{value:.2f}"
    return "—"


def formats_section(run: Path, names: list[str], backbones: dict[str, Any]) -> list[str]:
    """Markdown lines of the table (and report_tables/formats.csv), or none for a LiteRT-only run."""
    rows, csv_rows = [], []
    for name in names:
        variants = (backbones.get(name) or {}).get("variants") or {}
        if not any(is_other_format(label) for label in variants):
            continue
        order = list(RUNTIMES)
        labels = sorted(
            (label for label in variants if label != "keras"),
            key=lambda label: (order.index(runfolder.split_label(label)[0]), runfolder.split_label(label)[1]),
        )
        for label in labels:
            fmt, variant = runfolder.split_label(label)
            ours = variants[label]
            display = (backbones.get(name) or {}).get("display_name", name)
            rows.append(
                [display, RUNTIMES[fmt], variant, *(_cell(ours.get(k)) for k in KEYS), str(ours.get("n_models", "—"))]
            )
            csv_row: dict[str, Any] = {"backbone": name, "runtime": RUNTIMES[fmt], "variant": variant}
            for key in KEYS:
                value = ours.get(key)
                csv_row[f"{key}_mean"] = value.get("mean", "") if isinstance(value, dict) else ""
                csv_row[f"{key}_std"] = value.get("std", "") if isinstance(value, dict) else ""
            csv_row["n_models"] = ours.get("n_models", "")
            csv_rows.append(csv_row)
    if not rows:
        return []
    write_csv(runfolder.report_tables_dir(run) / "formats.csv", csv_rows)
    table = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    return [
        "## Model file formats — LiteRT, ONNX Runtime, OpenVINO",
        "",
        "The same fold models converted to each format (`export --formats tflite onnx openvino`); int8 from "
        "the same calibration images. Latency: batch 1, median invoke, measured by `evaluate` on the machine "
        "named above (shared with other work).",
        "",
        *table,
        "",
        "CSV: [report_tables/formats.csv](report_tables/formats.csv)",
        "",
    ]
