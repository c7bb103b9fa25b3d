"""Where a bench's figures go: printed for the reader and saved as JSON beside the machine they were
measured on (CPU model, int8 dot-product flags, SIMD flags, cores, threads, library versions, git
commit), so a figure on a docs page (docs/results.md) can be traced to the file and command that produced it.

Default file: ``bench/results/<name>.json`` (``--out`` in each bench overrides it).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

from steeldefect.core.cpuinfo import cpu_flags, cpu_model, int8_features
from steeldefect.core.files import write_json
from steeldefect.core.runfolder import environment

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def machine(threads: Any = None) -> dict[str, Any]:
    """The CPU a figure was measured on and the thread setting it used."""
    return {
        "cpu_model": cpu_model(),
        "architecture": platform.machine(),
        "logical_cores": os.cpu_count(),
        "simd_flags": sorted(set(SIMD_FLAGS) & cpu_flags()),
        "int8_dot_product": int8_features(),
        "threads": threads,
    }


def save(name: str, results: dict[str, Any], *, threads: Any = None, out: Path | None = None) -> Path:
    """Write ``results`` with the machine, versions, commit and command line; print where."""
    path = Path(out) if out is not None else RESULTS_DIR / f"{name}.json"
    record = {
        "bench": name,
        "command": " ".join(shlex.quote(arg) for arg in [Path(sys.executable).name, *sys.argv]),
        "measured": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(threads),
        "environment": environment(),
        "results": results,
    }
    write_json(path, record)
    print(f"results saved: {path}")
    return path


def mean_std(values: Any) -> dict[str, float]:
    """{"mean", "std"} (population std, as the study reports) of ``values``, rounded to 0.01."""
    import numpy as np

    values = np.asarray(list(values), dtype=float)
    return {"mean": round(float(values.mean()), 2), "std": round(float(values.std()), 2)}


def mean_std_per_metric(scores: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """For score dicts of the same metrics (one per draw): :func:`mean_std` of each metric."""
    return {metric: mean_std(score[metric] for score in scores) for metric in scores[0]}


def pm(value: dict[str, float]) -> str:
    """``mean ± std`` of a :func:`mean_std` result, for printing."""
    return f"{value['mean']:.2f} ± {value['std']:.2f}"
