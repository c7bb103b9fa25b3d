"""The bench scripts still import and build their options after refactors, and each saves its figures
to the file --out names, with the machine and commit they were measured on (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from steeldefect.cpuinfo import cpu_model

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(path.stem for path in BENCH_DIR.glob("*.py") if path.stem != "benchio")


def _load(name: str):
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))  # as when a script runs as `python bench/<name>.py`
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
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
