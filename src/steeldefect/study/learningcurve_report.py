"""The learning curve's results as a reader sees them: the summary per point (mean and spread over the
draws), the plots (accuracy against images per class, the imbalance plot) and report.md, from the
rows :func:`steeldefect.study.learningcurve.learning_curve` wrote."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from steeldefect.core.files import atomic_write_bytes, atomic_write_text
from steeldefect.core.options import LearningCurveOptions
from steeldefect.study.learningcurve_points import Point

PLOT_NAME = "learning_curve.png"
IMBALANCE_PLOT_NAME = "imbalance.png"
REPORT_NAME = "report.md"

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
        groups.items(), key=lambda item: (order.get((item[0][0], item[0][1]), len(order)), item[0][2:])
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
            recalls = [float(m[f"recall_{name}"]) for m in members if f"recall_{name}" in m]
            entry[f"recall_{name}_mean"] = round(float(np.mean(recalls)), 3) if recalls else ""
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
