"""The run folder: one place that knows where every artefact of a run lives. Every other module asks
here for a path; none builds one by hand.

Layout (``RUN`` is the ``--out`` folder)::

    RUN/config.json                  every resolved option of every command run into this folder
    RUN/dataset.json                 dataset root, layout, fingerprint, classes, counts
    RUN/splits.csv                   file, class, role (test | fold<k>)
    RUN/calibration.csv              the training images that calibrated int8
    RUN/summary.json                 the stable summary (schema in docs/training.md)
    RUN/<backbone>/cv_grid.csv       validation metrics per (learning rate, fold)
    RUN/<backbone>/grid/lr<rate>/fold<k>/{head.npz,history.json,metrics.json}
    RUN/<backbone>/test_metrics_<variant>.{json,csv}
    RUN/<backbone>/models/fold<k>.keras (+ fold<k>.<variant>.tflite), each with a <model>.json sidecar
                                     and, once evaluated, a <model>.eval.json record
    RUN/<backbone>/quant_debug.{csv,png}
    RUN/<backbone>/gallery/{gallery.csv,gallery.json,*.png}   heatmaps of test images for the report
    RUN/tflite_metrics.{json,csv}
    RUN/report.md, RUN/report_tables/*.csv, RUN/plots/*.png
"""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from steeldefect.core.files import read_json, sidecar_path, write_json  # noqa: F401  (sidecar_path: part of the layout)
from steeldefect.core.options import (
    EvaluateOptions,
    ExportOptions,
    TrainOptions,
    additive_options,
    recorded_defaults,
    resume_free_options,
)

SUMMARY_SCHEMA_VERSION = 1


def default_run_dir(command: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{command}-{stamp}"


def config_path(run: Path) -> Path:
    return Path(run) / "config.json"


def dataset_path(run: Path) -> Path:
    return Path(run) / "dataset.json"


def splits_path(run: Path) -> Path:
    return Path(run) / "splits.csv"


def summary_path(run: Path) -> Path:
    return Path(run) / "summary.json"


def calibration_path(run: Path) -> Path:
    return Path(run) / "calibration.csv"


def tflite_metrics_path(run: Path, suffix: str) -> Path:
    """``suffix``: ``"json"`` or ``"csv"``."""
    return Path(run) / f"tflite_metrics.{suffix}"


def report_path(run: Path) -> Path:
    return Path(run) / "report.md"


def report_tables_dir(run: Path) -> Path:
    return Path(run) / "report_tables"


def plots_dir(run: Path) -> Path:
    return Path(run) / "plots"


def backbone_dir(run: Path, backbone: str) -> Path:
    return Path(run) / backbone


def trust_dir(run: Path, backbone: str) -> Path:
    """Calibration and uncertainty of a backbone's models: out-of-fold probabilities, the fitted
    temperature, the reliability diagram, the deploy model's test predictions with their flags."""
    return backbone_dir(run, backbone) / "trust"


def oof_probabilities_path(run: Path, backbone: str) -> Path:
    return trust_dir(run, backbone) / "oof_probabilities.npz"


def calibration_record_path(run: Path, backbone: str) -> Path:
    return trust_dir(run, backbone) / "calibration.json"


def reliability_plot_path(run: Path, backbone: str) -> Path:
    return trust_dir(run, backbone) / "reliability.png"


def test_predictions_path(run: Path, backbone: str) -> Path:
    """The deploy model's (int8 when exported) answer for every test image, with its uncertain flag."""
    return trust_dir(run, backbone) / "test_predictions.csv"


def cv_grid_path(run: Path, backbone: str) -> Path:
    return backbone_dir(run, backbone) / "cv_grid.csv"


def grid_dir(run: Path, backbone: str) -> Path:
    return backbone_dir(run, backbone) / "grid"


def grid_cell_dir(run: Path, backbone: str, learning_rate: float, fold: int) -> Path:
    return grid_dir(run, backbone) / f"lr{learning_rate:g}" / f"fold{fold}"


def head_path(run: Path, backbone: str, learning_rate: float, fold: int) -> Path:
    """A trained head's weights (``head.npz``)."""
    return grid_cell_dir(run, backbone, learning_rate, fold) / "head.npz"


def history_path(run: Path, backbone: str, learning_rate: float, fold: int) -> Path:
    return grid_cell_dir(run, backbone, learning_rate, fold) / "history.json"


def cell_metrics_path(run: Path, backbone: str, learning_rate: float, fold: int) -> Path:
    """A grid cell's validation metrics, written last: its presence means the cell is done."""
    return grid_cell_dir(run, backbone, learning_rate, fold) / "metrics.json"


def head_paths(run: Path, backbone: str) -> list[tuple[float, int, Path]]:
    """(learning rate, fold, path) of every head still stored in the grid."""
    found = []
    for path in grid_dir(run, backbone).glob("lr*/fold*/head.npz"):
        found.append(
            (float(path.parent.parent.name.removeprefix("lr")), int(path.parent.name.removeprefix("fold")), path)
        )
    return sorted(found)


def history_paths(run: Path, backbone: str, learning_rate: float) -> list[tuple[int, Path]]:
    """(fold, path) of the training histories of one learning rate, in fold order."""
    found = grid_cell_dir(run, backbone, learning_rate, 0).parent.glob("fold*/history.json")
    return sorted((int(path.parent.name.removeprefix("fold")), path) for path in found)


def test_metrics_path(run: Path, backbone: str, variant: str, suffix: str = "json") -> Path:
    return backbone_dir(run, backbone) / f"test_metrics_{variant}.{suffix}"


def quant_debug_path(run: Path, backbone: str, suffix: str) -> Path:
    """``suffix``: ``"csv"`` (per-layer int8 error) or ``"png"`` (its chart)."""
    return backbone_dir(run, backbone) / f"quant_debug.{suffix}"


def gallery_dir(run: Path, backbone: str) -> Path:
    """Heatmap overlays of test images (two correct per class, every wrong or uncertain one)."""
    return backbone_dir(run, backbone) / "gallery"


def gallery_csv_path(run: Path, backbone: str) -> Path:
    """``file,label,predicted,probability,uncertain,png`` of each gallery image."""
    return gallery_dir(run, backbone) / "gallery.csv"


def gallery_record_path(run: Path, backbone: str) -> Path:
    """What the gallery was computed from (model digest, method, uncertain flags): unchanged -> kept."""
    return gallery_dir(run, backbone) / "gallery.json"


def models_dir(run: Path, backbone: str) -> Path:
    return backbone_dir(run, backbone) / "models"


# The model refitted on the whole training split after the grid: the one to deploy.
FINAL = "final"


# Model file formats `export --formats` writes, and the suffix of each (an OpenVINO IR is the .xml
# plus its .bin beside it).
FORMAT_SUFFIXES = {"tflite": ".tflite", "onnx": ".onnx", "openvino": ".xml"}


def model_label(fmt: str, variant: str) -> str:
    """How a (format, variant) is named in tables and summary.json: the LiteRT variants keep their
    plain names (``int8``), the others carry the format (``onnx-int8``, ``openvino-fp32``)."""
    return variant if fmt == "tflite" else f"{fmt}-{variant}"


def split_label(label: str) -> tuple[str, str]:
    """(format, variant) of a :func:`model_label`."""
    fmt, _, variant = label.partition("-")
    return (fmt, variant) if fmt in FORMAT_SUFFIXES and fmt != "tflite" and variant else ("tflite", label)


def fold_model_path(run: Path, backbone: str, fold: int | str, variant: str, fmt: str = "tflite") -> Path:
    """``fold``: a fold number, or :data:`FINAL` for the model refitted on all training images."""
    suffix = ".keras" if variant == "keras" else f".{variant}{FORMAT_SUFFIXES[fmt]}"
    stem = FINAL if fold == FINAL else f"fold{int(fold)}"
    return models_dir(run, backbone) / f"{stem}{suffix}"


def parse_model_format(path: Path) -> str:
    """``keras``, ``tflite``, ``onnx`` or ``openvino`` by the file's suffix."""
    suffix = Path(path).suffix
    if suffix == ".keras":
        return "keras"
    for fmt, known in FORMAT_SUFFIXES.items():
        if suffix == known:
            return fmt
    raise ValueError(f"{path}: not a model file ({', '.join(['.keras', *FORMAT_SUFFIXES.values()])})")


def parse_model_name(path: Path) -> tuple[int | str, str]:
    """(fold or :data:`FINAL`, variant) of a model file named by :func:`fold_model_path` (any format:
    ``fold0.int8.onnx`` is fold 0, variant ``int8``; see :func:`parse_model_format` for the format)."""
    name = Path(path).name
    stem, _, rest = name.partition(".")
    variant = rest
    if rest != "keras":
        for known in FORMAT_SUFFIXES.values():
            variant = variant.removesuffix(known) if variant.endswith(known) else variant
    is_fold = stem.startswith("fold") and stem[4:].isdigit()
    if not (is_fold or stem == FINAL) or not variant or rest == variant and rest != "keras":
        raise ValueError(
            f"{path}: not a model file name of a run (fold<k>|final).keras or .<variant>.tflite|.onnx|.xml)"
        )
    return (int(stem[4:]) if is_fold else FINAL), variant


def final_head_path(run: Path, backbone: str) -> Path:
    return backbone_dir(run, backbone) / FINAL / "head.npz"


def final_history_path(run: Path, backbone: str) -> Path:
    return backbone_dir(run, backbone) / FINAL / "history.json"


def exported_models(run: Path, backbone: str, formats: tuple[str, ...] = ("tflite",)) -> list[Path]:
    """Every exported fold model of a backbone in ``formats``, sorted by name."""
    folder = models_dir(run, backbone)
    return sorted(path for fmt in formats for path in folder.glob(f"fold*{FORMAT_SUFFIXES[fmt]}"))


def final_models(run: Path, backbone: str, formats: tuple[str, ...] = ("tflite",)) -> list[Path]:
    """The exported files of the model refitted on all training images, in ``formats``."""
    folder = models_dir(run, backbone)
    return sorted(path for fmt in formats for path in folder.glob(f"{FINAL}.*{FORMAT_SUFFIXES[fmt]}"))


def keras_models(run: Path, backbone: str) -> list[Path]:
    """Every joined fold .keras model of a backbone, sorted by name."""
    return sorted(models_dir(run, backbone).glob("fold*.keras"))


def evaluation_record_path(model_path: Path) -> Path:
    """Where `evaluate` keeps one model's test metrics, size and latency."""
    return Path(str(model_path) + ".eval.json")


def deploy_dir(run: Path) -> Path:
    return Path(run) / "deploy"


def deploy_model_path(run: Path, variant: str, fmt: str = "tflite") -> Path:
    """``RUN/deploy/model.<variant>.tflite`` (``.onnx``/``.xml`` for the other formats; ``model.keras``
    for ``variant="keras"``)."""
    return deploy_dir(run) / ("model.keras" if variant == "keras" else f"model.{variant}{FORMAT_SUFFIXES[fmt]}")


def deploy_record_path(run: Path) -> Path:
    return deploy_dir(run) / "deploy.json"


def deployable_model(run: Path, variant: str = "int8") -> Path:
    """The one model of a run to put on a line: ``RUN/deploy/model.<variant>.tflite``."""
    run = Path(run)
    if not config_path(run).is_file():
        raise FileNotFoundError(f"{run}: not a run folder (no config.json)")
    deployed = deploy_model_path(run, variant)
    if not deployed.is_file():
        raise FileNotFoundError(
            f"{deployed}: this run has no {variant} model to deploy (run `steeldefect export {run}`)"
        )
    return deployed


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
    from steeldefect.core.cpuinfo import cpu_description

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
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=package_dir, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
            cwd=package_dir,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def record_config(run: Path, command: str, options: dict[str, Any]) -> Path:
    """Add this command's resolved options to RUN/config.json, keeping earlier commands' entries.

    A run folder may be resumed, but only with the same options for the same command: mixing two
    configurations in one folder would make its numbers unattributable.
    """
    path = config_path(run)
    config = read_json(path) if path.exists() else {"commands": {}}
    if _nothing_computed(run):
        # A start that failed before computing anything (bad data, say) leaves only config.json:
        # such a folder may take corrected options.
        config = {"commands": {}}
    previous = config["commands"].get(command)
    if previous is not None:
        for key in _ADDITIVE_OPTIONS & options.keys():
            earlier = list(previous["options"].get(key) or [])
            options = {**options, key: earlier + [v for v in options[key] if v not in earlier]}
        earlier_options = {key: previous["options"].get(key, _DEFAULTS.get(key)) for key in options}
        changed = {
            key: (earlier_options[key], value)
            for key, value in options.items()
            if key not in _RESUME_FREE_OPTIONS | _ADDITIVE_OPTIONS and earlier_options[key] != value
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


def _nothing_computed(run: Path) -> bool:
    return all(entry.name == config_path(run).name for entry in Path(run).iterdir()) if Path(run).is_dir() else True


# Options that change how a run is carried out but not what it computes (evaluate re-measures
# every model whose recorded thread count or timing protocol differs), and list options that may
# grow (exporting another variant adds files and changes none, so the folder records the union).
_OPTION_CLASSES = (TrainOptions, ExportOptions, EvaluateOptions)
_RESUME_FREE_OPTIONS = resume_free_options(*_OPTION_CLASSES)
_ADDITIVE_OPTIONS = additive_options(*_OPTION_CLASSES)
# An option added after a folder was made (e.g. `augment`) is absent from its config.json: that run
# computed what the option's default computes, so absent counts as the default.
_DEFAULTS = recorded_defaults(*_OPTION_CLASSES)


def load_summary(run: Path) -> dict[str, Any]:
    path = summary_path(run)
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
    write_json(summary_path(run), summary)
    return summary


def set_summary_field(run: Path, key: str, value: Any) -> dict[str, Any]:
    summary = load_summary(run)
    summary[key] = value
    write_json(summary_path(run), summary)
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
