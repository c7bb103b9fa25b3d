"""The bench scripts (and the experiments moved out of bench/) still import and build their options after
refactors, and each saves its figures to the file --out names, with the machine and commit they were
measured on (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from steeldefect.core.cpuinfo import cpu_model

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
EXPERIMENTS_DIR = BENCH_DIR.parent / "experiments"  # scripts whose variant was not adopted
SCRIPTS = sorted(
    path.stem for folder in (BENCH_DIR, EXPERIMENTS_DIR) for path in folder.glob("*.py") if path.stem != "benchio"
)


def _load(name: str):
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))  # as when a script runs as `python bench/<name>.py`
    path = next(folder / f"{name}.py" for folder in (BENCH_DIR, EXPERIMENTS_DIR) if (folder / f"{name}.py").is_file())
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchio_writes_results_with_machine_versions_and_commit(tmp_path):
    benchio = _load("benchio")
    out = tmp_path / "nested" / "figures.json"
    assert benchio.save("demo", {"fp32": {"median_ms": 8.1}}, threads=[1, 2], out=out) == out
    record = json.loads(out.read_text())
    assert record["bench"] == "demo"
    assert record["results"] == {"fp32": {"median_ms": 8.1}}
    assert record["machine"]["threads"] == [1, 2]
    assert record["machine"]["cpu_model"] == cpu_model()
    assert isinstance(record["machine"]["int8_dot_product"], list)
    assert record["environment"]["tensorflow"] and record["environment"]["source"]
    assert record["command"]


def test_the_benches_are_found():
    assert {"data_cache", "export_speed", "feature_throughput", "grid_search_speed", "int8_stages", "latency"} <= set(
        SCRIPTS
    )


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_bench_takes_an_out_file(name, capsys):
    module = _load(name)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out


def _row(case: str, draw: int, forms: tuple[str, ...], macro: float) -> dict:
    return {
        "case": case,
        "draw": draw,
        "rarest_class": "crazing",
        **{form: {"accuracy": macro, "recall_macro": macro, "rarest_recall": 2 * macro} for form in forms},
    }


def test_small_sample_int8_summary_is_mean_and_population_std_per_case():
    module = _load("small_sample_int8")
    rows = [_row("255..8 order 1", d, module.FORMS, macro) for d, macro in enumerate((98.0, 99.0, 100.0))]
    rows.append(_row("255..8 order 2", 0, module.FORMS, 97.0))
    summary = module.summarise(rows)
    assert [entry["case"] for entry in summary] == ["255..8 order 1", "255..8 order 2"]
    assert summary[0]["draws"] == 3 and summary[1]["draws"] == 1
    assert summary[0]["int8"]["recall_macro"] == {"mean": 99.0, "std": 0.82}
    assert summary[0]["int8"]["rarest_recall"] == {"mean": 198.0, "std": 1.63}
    assert summary[1]["fp32"]["recall_macro"] == {"mean": 97.0, "std": 0.0}


def test_small_sample_int8_cases_option_rejects_unknown_values(capsys):
    module = _load("small_sample_int8")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--data", "x", "--cases", "balanced"])
    assert exit_info.value.code == 2
    assert "--cases" in capsys.readouterr().err


def test_int8_robust_head_views_are_the_eight_dihedral_views_view_major():
    module = _load("int8_robust_head")
    images = np.arange(2 * 3 * 3 * 1, dtype=np.uint8).reshape(2, 3, 3, 1)
    views = module.all_views(images)
    assert views.shape == (16, 3, 3, 1)
    assert np.array_equal(views[:2], images)  # view 0 = the images, in order
    assert np.array_equal(views[2:4], np.rot90(images, 1, axes=(1, 2)))
    assert np.array_equal(views[8:10], images[:, :, ::-1])  # view 4 = the mirror image
    assert len({view.tobytes() for view in views[::2]}) == 8  # all eight symmetries differ


def test_int8_robust_head_summary_per_order_and_method():
    module = _load("int8_robust_head")
    forms = ("fp32", "int8", "int8_minus_fp32")
    rows = []
    for draw, macro in enumerate((98.0, 100.0)):
        row = {"case": "255..8 order 1", "draw": draw}
        for method in module.METHODS:
            value = macro + (method == "int8_rows")
            row[method] = {form: {"recall_macro": value, "rarest_recall": 95.0} for form in forms}
        rows.append(row)
    summary = module.summarise(rows)
    assert [(entry["case"], entry["method"]) for entry in summary] == [("255..8 order 1", m) for m in module.METHODS]
    by_method = {entry["method"]: entry for entry in summary}
    assert by_method["baseline"]["int8"]["recall_macro"] == {"mean": 99.0, "std": 1.0}
    assert by_method["int8_rows"]["fp32"]["recall_macro"] == {"mean": 100.0, "std": 1.0}
    assert "int8_full" not in by_method["baseline"]
