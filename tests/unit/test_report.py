"""report.write_report on a fake run folder: tables, not-run rows, plots, CSVs, no TensorFlow, determinism."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from steeldefect.core.runfolder import NotARunError
from steeldefect.study.report import write_report

ROOT = Path(__file__).resolve().parents[2]


def _load_fixture_module():
    # Loaded by path: tests/fixtures is not a package and conftest.py belongs to someone else.
    spec = importlib.util.spec_from_file_location("run_fixture", ROOT / "tests" / "fixtures" / "run_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fx = _load_fixture_module()


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return fx.make_fake_run(tmp_path / "run")


def sections(text: str) -> dict[str, str]:
    """report.md split at its '## ' headings: heading line -> body."""
    out = {}
    for chunk in text.split("\n## ")[1:]:
        heading, _, body = chunk.partition("\n")
        out[heading] = body
    return out


def table_section(text: str, number: int) -> str:
    matches = [body for heading, body in sections(text).items() if heading.startswith(f"Table {number} ")]
    assert len(matches) == 1, f"Table {number} missing or repeated"
    return matches[0]


def row_of(body: str, display: str, variant: str | None = None) -> str:
    rows = [line for line in body.splitlines() if line.startswith(f"| {display} |")]
    if variant is not None:
        rows = [line for line in rows if line.startswith(f"| {display} | {variant} |")]
    assert len(rows) == 1, (display, variant, body)
    return rows[0]


def test_report_has_the_four_metric_tables_with_ours_and_reference(run: Path) -> None:
    path = write_report(run)
    assert path == run.resolve() / "report.md"
    text = path.read_text(encoding="utf-8")
    summary = json.loads((run / "summary.json").read_text())
    variants = summary["backbones"]["efficientnetb0"]["variants"]
    reference = {"keras": "99.48 ± 0.38", "fp32": "99.48 ± 0.38", "fp16": "99.48 ± 0.38", "int8": "97.56 ± 1.01"}
    for number, variant in enumerate(("keras", "fp32", "fp16", "int8"), start=1):
        body = table_section(text, number)
        row = row_of(body, "EfficientNetB0")
        for metric in ("accuracy", "precision_macro", "recall_macro"):
            value = variants[variant][metric]
            assert f"{value['mean']:.2f} ± {value['std']:.2f}" in row
        assert reference[variant] in row
        assert "| 3 |" in row  # number of our fold models
        # The reference-only backbones still show the reference's figures.
        assert "99.63 ± 0.33" in row_of(body, "VGG-16") or variant == "int8"
        assert "not in reference" not in row
    assert "58.07 ± 6.03" in row_of(table_section(text, 4), "MobileNetV1")
    assert "99.56 ± 0.28" in row_of(table_section(text, 4), "VGG-16")
    assert "94.44 ± 0.94" in row_of(table_section(text, 3), "MobileNetV1")


def test_table5_sizes_and_latencies(run: Path) -> None:
    text = write_report(run).read_text(encoding="utf-8")
    body = table_section(text, 5)
    keras_mib = fx.KERAS_FILE_BYTES / 2**20
    assert f"{keras_mib:.2f}" in row_of(body, "EfficientNetB0", "keras")
    assert "108.08" in row_of(body, "EfficientNetB0", "keras")
    for variant, ref_size, ref_latency in (
        ("fp32", "45.95", "82.90 ± 16.05"),
        ("fp16", "23.04", "78.37 ± 3.23"),
        ("int8", "12.34", "95.84 ± 1.15"),
    ):
        row = row_of(body, "EfficientNetB0", variant)
        assert f"{fx.SIZE_MIB[variant]:.2f}" in row and ref_size in row and ref_latency in row
        # Fold latencies are base + 0, 1, 2: mean base + 1, population std sqrt(2/3).
        assert f"{fx.LATENCY_MS[variant] + 1:.2f} ± 0.82" in row
    assert "592.98 ± 21.98" in row_of(body, "VGG-16", "fp32")
    assert "9.48" in row_of(body, "MobileNetV1", "int8")
    assert "median of 50 timed invokes after 10 warm-ups" in body
    assert "without warm-up" in body


def test_not_run_backbones_are_marked(run: Path) -> None:
    text = write_report(run).read_text(encoding="utf-8")
    assert "**MobileNetV1: not run: weights missing**" in text
    for number in (1, 2, 3, 4):
        assert "not run: weights missing" in row_of(table_section(text, number), "MobileNetV1")
        assert "| not run |" in row_of(table_section(text, number), "VGG-16")  # absent from the run
    assert "not run: weights missing" in row_of(table_section(text, 5), "MobileNetV1", "fp32")
    assert "EfficientNet-Lite0" not in text  # not in the reference and not in this run


def test_header_cv_grid_and_csvs(run: Path) -> None:
    text = write_report(run).read_text(encoding="utf-8")
    assert f"`{run.resolve()}`" in text
    assert "fingerprint `0123456789abcdef`" in text and "0123456789abcdef0" not in text
    assert "crazing 30" in text and "Fake CPU (x86_64), 2 cores with 2 thread(s)" in text
    assert "tensorflow 2.21.0" in text and "2025-01-02T03:04:05" in text
    assert "best learning rate 0.001" in text and "812.3 s" in text
    assert "| EfficientNetB0 | 31.2 | 120.5 | 1.2 | 20.1 | 60.3 | 15.0 | 40.2 | 288.5 |" in text
    cv = sections(text)["Cross-validation grid"]
    best = [line for line in cv.splitlines() if "**best**" in line]
    assert len(best) == 1 and "| 0.001 |" in best[0] and "| 3 |" in best[0]
    tables = run / "report_tables"
    names = sorted(p.name for p in tables.glob("*.csv"))
    assert names == [
        "cv_grid.csv",
        "per_class_recall.csv",
        "table1_keras.csv",
        "table2_fp32.csv",
        "table3_fp16.csv",
        "table4_int8.csv",
        "table5_size_latency.csv",
    ]
    with open(tables / "table4_int8.csv", newline="") as handle:
        rows = {row["backbone"]: row for row in csv.DictReader(handle)}
    assert rows["mobilenet"]["status"] == "not run: weights missing" and rows["mobilenet"]["accuracy_mean"] == ""
    assert float(rows["mobilenet"]["ref_accuracy_mean"]) == 58.07
    assert rows["efficientnetb0"]["status"] == "done" and rows["efficientnetb0"]["n_models"] == "3"
    assert not list(run.rglob(".*.tmp")), "atomic writes left temporary files"


def test_every_plot_is_a_png_and_linked(run: Path) -> None:
    text = write_report(run).read_text(encoding="utf-8")
    expected = {
        "confusion_efficientnetb0_keras.png",
        "confusion_efficientnetb0_int8.png",
        "cv_grid_efficientnetb0.png",
        "training_curves_efficientnetb0.png",
        "accuracy_size_latency.png",
    }
    written = {p.name for p in (run / "plots").iterdir()}
    assert written == expected
    for name in expected:
        data = (run / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name
        assert f"(plots/{name})" in text
    assert "(efficientnetb0/quant_debug.png)" in text and "(efficientnetb0/quant_debug.csv)" in text


def test_report_is_deterministic(run: Path) -> None:
    first = write_report(run).read_bytes()
    first_tables = {p.name: p.read_bytes() for p in (run / "report_tables").iterdir()}
    second = write_report(run).read_bytes()
    assert first == second
    assert first_tables == {p.name: p.read_bytes() for p in (run / "report_tables").iterdir()}


def test_report_does_not_import_tensorflow(run: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from steeldefect.study.report import write_report; "
        f"write_report(Path({str(run)!r})); "
        "heavy = sorted(m for m in ('tensorflow', 'keras', 'sklearn', 'ai_edge_litert') if m in sys.modules); "
        "assert not heavy, heavy"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (run / "report.md").is_file()


def test_folder_without_a_run_is_refused_and_nothing_written(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    for path, reason in (
        (tmp_path / "empty", "no summary.json"),
        (tmp_path / "runs-typo", "no such run folder"),
        (tmp_path / "afile", "is a file"),
    ):
        with pytest.raises(NotARunError, match=f"^{path}: .*{reason}"):
            write_report(path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["afile", "empty"]


def test_partial_run_folder_still_gets_a_report(tmp_path: Path) -> None:
    # A summary that lost its config: the reference tables are still there and the gap is named.
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "summary.json").write_text('{"schema_version": 1, "backbones": {}}')
    text = write_report(tmp_path / "bare").read_text(encoding="utf-8")
    assert "config.json` missing" in text
    for number in range(1, 6):
        table_section(text, number)
    assert "99.63 ± 0.33" in row_of(table_section(text, 1), "VGG-16")
    assert "No plots" in text

    # Trained but never exported / evaluated: TFLite rows say so, the Keras rows have numbers.
    run = fx.make_fake_run(tmp_path / "partial")
    summary = json.loads((run / "summary.json").read_text())
    for variant in ("fp32", "fp16", "int8"):
        del summary["backbones"]["efficientnetb0"]["variants"][variant]
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "efficientnetb0" / "test_metrics_int8.json").write_text("{not json")
    text = write_report(run).read_text(encoding="utf-8")
    assert "not measured" in row_of(table_section(text, 2), "EfficientNetB0")
    assert "not measured" not in row_of(table_section(text, 1), "EfficientNetB0")
    assert not (run / "plots" / "confusion_efficientnetb0_int8.png").exists()
    assert not (run / "plots" / "accuracy_size_latency.png").exists()


def test_report_shows_recall_per_class(run):
    text = write_report(run).read_text()
    section = text.split("## Recall per class (%)")[1].split("\n## ")[0]
    rows = {
        tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line
        for line in section.splitlines()
        if line.startswith("| EfficientNetB0")
    }
    int8 = rows[("EfficientNetB0", "int8")]
    assert int8.count("±") == 6
    with open(run / "report_tables" / "per_class_recall.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    keras_row = next(r for r in csv_rows if r["variant"] == "keras")
    # The fixture's error e of fold f moves an image of class (f + e) % 6: the Keras models (0, 1, 2
    # errors) never miss crazing, the int8 fold 0 (3 errors) misses one of its 5.
    assert float(keras_row["recall_crazing_mean"]) == pytest.approx(100.0)
    int8_row = next(r for r in csv_rows if r["variant"] == "int8")
    assert float(int8_row["recall_crazing_mean"]) < 100.0
