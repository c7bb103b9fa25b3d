"""The run folder: one place that knows where every artefact of a run lives.

Layout (``RUN`` is the ``--out`` folder)::

    RUN/config.json                  every resolved option of every command run into this folder
    RUN/dataset.json                 dataset root, layout, fingerprint, classes, counts
    RUN/splits.csv                   file, class, role (test | fold<k>)
    RUN/summary.json                 the stable summary (schema in the README)
    RUN/<backbone>/cv_grid.csv       validation metrics per (learning rate, fold)
    RUN/<backbone>/grid/lr<rate>/fold<k>/{head.weights.h5,history.json,metrics.json}
    RUN/<backbone>/test_metrics.{json,csv}
    RUN/<backbone>/models/fold<k>.keras (+ .tflite variants), each with a <model>.json sidecar
    RUN/<backbone>/tflite_metrics.{json,csv}, quant_debug.{csv,png}
    RUN/report.md, RUN/plots/*.png
"""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from steeldefect.files import read_json, write_json
from steeldefect.modelfile import sidecar_path  # noqa: F401  (re-exported: part of the layout)

SUMMARY_SCHEMA_VERSION = 1


def default_run_dir(command: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{command}-{stamp}"


def backbone_dir(run: Path, backbone: str) -> Path:
    return Path(run) / backbone


def models_dir(run: Path, backbone: str) -> Path:
    return backbone_dir(run, backbone) / "models"


def fold_model_path(run: Path, backbone: str, fold: int, variant: str) -> Path:
    suffix = ".keras" if variant == "keras" else f".{variant}.tflite"
    return models_dir(run, backbone) / f"fold{fold}{suffix}"


def parse_model_name(path: Path) -> tuple[int, str]:
    """(fold, variant) of a fold model file named by :func:`fold_model_path`."""
    name = Path(path).name
    stem, _, rest = name.partition(".")
    variant = "keras" if rest == "keras" else rest.removesuffix(".tflite")
    if not stem.startswith("fold") or not stem[4:].isdigit() or not variant or rest == variant:
        raise ValueError(f"{path}: not a fold model file name (fold<k>.keras or fold<k>.<variant>.tflite)")
    return int(stem[4:]), variant


def exported_models(run: Path, backbone: str) -> list[Path]:
    """Every exported fold .tflite of a backbone, sorted by name."""
    return sorted(models_dir(run, backbone).glob("fold*.tflite"))


def evaluation_record_path(model_path: Path) -> Path:
    """Where `evaluate` keeps one model's test metrics, size and latency."""
    return Path(str(model_path) + ".eval.json")


def deploy_dir(run: Path) -> Path:
    return Path(run) / "deploy"


def deploy_model_path(run: Path, variant: str) -> Path:
    return deploy_dir(run) / f"model.{variant}.tflite"


def deployable_model(run: Path, variant: str = "int8") -> Path:
    """The one model of a run to put on a line: ``RUN/deploy/model.<variant>.tflite`` when the run has
    one, else the fold model of that variant with the best recorded test accuracy (ties: lowest
    fold; fold 0 when nothing was evaluated)."""
    run = Path(run)
    deployed = deploy_model_path(run, variant)
    if deployed.is_file():
        return deployed
    candidates = []
    for backbone in load_summary(run)["backbones"]:
        for path in exported_models(run, backbone):
            fold, found_variant = parse_model_name(path)
            if found_variant != variant:
                continue
            record = evaluation_record_path(path)
            accuracy = read_json(record).get("accuracy", 0.0) if record.is_file() else 0.0
            candidates.append((-float(accuracy), backbone, fold, path))
    if not candidates:
        raise FileNotFoundError(f"{run}: no exported {variant} model in this run folder (run `steeldefect export` first)")
    return min(candidates)[3]


def environment() -> dict[str, str]:
    """Library versions and machine, recorded beside every number."""
    import keras
    import numpy
    import sklearn
    import tensorflow as tf

    try:
        from importlib.metadata import version

        litert = version("ai-edge-litert")
    except Exception:  # pragma: no cover - the interpreter package is a hard dependency
        litert = "unknown"
    from steeldefect import __version__
    from steeldefect.cpuinfo import cpu_description

    return {
        "steeldefect": __version__,
        "python": sys.version.split()[0],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "ai_edge_litert": litert,
        "numpy": numpy.__version__,
        "scikit_learn": sklearn.__version__,
        "platform": platform.platform(),
        "cpu": cpu_description(),
        "source": source_revision(),
    }


def source_revision() -> str:
    """The git commit the package was run from (``+dirty`` with local edits), or "unknown" outside
    a checkout: the version number alone does not say which code produced a number."""
    package_dir = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package_dir, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], cwd=package_dir,
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def record_config(run: Path, command: str, options: dict[str, Any]) -> Path:
    """Add this command's resolved options to RUN/config.json, keeping earlier commands' entries.

    A run folder may be resumed, but only with the same options for the same command: mixing two
    configurations in one folder would make its numbers unattributable.
    """
    path = Path(run) / "config.json"
    config = read_json(path) if path.exists() else {"commands": {}}
    previous = config["commands"].get(command)
    if previous is not None:
        for key in _ADDITIVE_OPTIONS & options.keys():
            earlier = list(previous["options"].get(key) or [])
            options = {**options, key: earlier + [v for v in options[key] if v not in earlier]}
        changed = {
            key: (previous["options"].get(key), value)
            for key, value in options.items()
            if key not in _RESUME_FREE_OPTIONS | _ADDITIVE_OPTIONS and previous["options"].get(key) != value
        }
        if changed:
            details = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
            raise ValueError(
                f"{path}: this run folder was made by `{command}` with other options ({details}); "
                "use a new --out folder"
            )
    config["commands"][command] = {
        "options": options,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "environment": environment(),
    }
    return write_json(path, config)


# Options that change how a run is carried out but not what it computes (evaluate re-measures
# every model whose recorded thread count or timing protocol differs).
_RESUME_FREE_OPTIONS = {"progress", "cache_dir", "threads", "warmup", "runs", "out", "skip_missing_weights"}
# List options that may grow: exporting another variant adds files and changes none, so the folder
# records the union of what was asked.
_ADDITIVE_OPTIONS = {"variants"}


def load_summary(run: Path) -> dict[str, Any]:
    path = Path(run) / "summary.json"
    if path.exists():
        return read_json(path)
    return {"schema_version": SUMMARY_SCHEMA_VERSION, "backbones": {}}


def update_summary(run: Path, backbone: str, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into summary.json's entry for ``backbone`` (nested dicts merged one level)."""
    summary = load_summary(run)
    entry = summary["backbones"].setdefault(backbone, {})
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(entry.get(key), dict):
            entry[key].update(value)
        else:
            entry[key] = value
    write_json(Path(run) / "summary.json", summary)
    return summary


def set_summary_field(run: Path, key: str, value: Any) -> dict[str, Any]:
    summary = load_summary(run)
    summary[key] = value
    write_json(Path(run) / "summary.json", summary)
    return summary


class NotARunError(ValueError):
    """A path given as a run folder is not one (missing, a file, or holding no run)."""


def require_run(run: Path) -> Path:
    """``run`` when it is a run folder (it holds ``summary.json``), else NotARunError naming it and why.

    Commands that read a run check this first so that a mistyped path is refused before anything is
    written, instead of producing an empty report in a new folder.
    """
    run = Path(run)
    if not run.exists():
        raise NotARunError(f"{run}: no such run folder")
    if not run.is_dir():
        raise NotARunError(f"{run}: is a file, not a run folder")
    if not (run / "summary.json").is_file():
        raise NotARunError(
            f"{run}: not a run folder (no summary.json; give the --out folder of `train` or `reproduce`)"
        )
    return run
