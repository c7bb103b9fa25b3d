"""RUN/report.md: the reference study's five tables regenerated with our figures beside its own.

The report only reads what the pipeline wrote (summary.json, config.json, the per-backbone CSV/JSON
files and model file sizes); it never recomputes a metric and never imports TensorFlow, so it runs in
seconds on any machine a run folder was copied to. Whatever is missing is marked, never fatal.
Output is deterministic: the only dates in it are those read from the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Figure + the Agg canvas instead of pyplot: no global backend switch, no GUI, no shared state.
from steeldefect.core import runfolder
from steeldefect.core.files import atomic_write_text, write_csv
from steeldefect.core.runfolder import require_run
from steeldefect.deploy import int8guard
from steeldefect.study.formats_report import formats_section, is_other_format
from steeldefect.study.report_data import (
    BACKBONE_ORDER,
    METRIC_TABLES,
    METRICS,
    MISSING,
    REFERENCE_LATENCY_MS,
    REFERENCE_METRICS,
    REFERENCE_SIZE_MB,
    REFERENCE_TITLE,
    STAGES,
    VARIANTS,
    _cv_stats,
    _display,
    _fmt,
    _keras_size_mib,
    _latency_method,
    _load,
    _machine,
    _md_table,
    _mean,
    _mean_std,
    _ours_note,
    _read_cv_rows,
    _status,
    _training_setup,
    _variant,
)
from steeldefect.study.report_plots import _gallery_section, _plots_section


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
    lines += formats_section(run, names, backbones)
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
        if entry is not None and _status(entry) == "done" and entry.get("best_learning_rate") is not None:
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
        extra = [v for v in ((entry or {}).get("variants") or {}) if v not in VARIANTS and not is_other_format(v)]
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
        "`int8-mixed`: int8 except the high-resolution start, kept in float (see docs/export.md).",
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


def _cv_section(run: Path, names: list[str], backbones: dict[str, Any]) -> list[str]:
    rows, csv_rows = [], []
    for name in names:
        entry = backbones.get(name)
        if entry is None or _status(entry) != "done":
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
