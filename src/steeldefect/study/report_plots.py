"""The report's figures: the confusion matrices, the CV grid, the training curves, accuracy against size
and latency, and the gallery of test images, each saved as a PNG in the run folder and linked from
RUN/report.md (:mod:`steeldefect.study.report`)."""

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
from steeldefect.core.files import atomic_write_bytes
from steeldefect.study.report_data import (
    _cv_stats,
    _display,
    _fmt,
    _load,
    _md_table,
    _mean,
    _read_cv_rows,
    _status,
    _variant,
)

log = logging.getLogger(__name__)


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
        if entry is None or _status(entry) != "done":
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
            size, accuracy, latency = (_mean(values.get(key)) for key in ("size_mib", "accuracy", "latency_ms_median"))
            if size is not None and accuracy is not None and latency is not None:
                points.append((_display(name, backbones[name]), variant, size, accuracy, latency))
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
        fold_rates, accuracies = zip(*points)
        ax.scatter(fold_rates, accuracies, s=18, alpha=0.7, label=f"fold {fold}")
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

    tiles: list[Image.Image | None] = []
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
