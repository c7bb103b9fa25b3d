"""A run's data: the images it trains on (scanned, decoded through the image cache, fingerprinted,
split), the check that a run folder is resumed on the same data, the record of that data, what
travels with each model file, and reading a finished run's options and data back for the later
stages and the benches. Used by :mod:`steeldefect.study.pipeline` and :mod:`steeldefect.study.training_stage`."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from steeldefect.core import runfolder
from steeldefect.core.files import default_cache_dir, read_json, write_json
from steeldefect.core.options import DataOptions, TrainOptions
from steeldefect.data import dataset as data_module
from steeldefect.data import loading
from steeldefect.data import splits as splits_module

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    dataset: Any
    images: np.ndarray
    fingerprint: str
    splits: Any
    roots: list[dict[str, Any]] | None = None  # several --data roots: each one's record


Data = Path | Sequence[Path]


def data_roots(data: Data) -> list[Path]:
    """``train --data``'s roots: one path, or several."""
    return [Path(data)] if isinstance(data, (str, Path)) else [Path(root) for root in data]


def shown(data: Data) -> str:
    return " + ".join(str(root) for root in data_roots(data))


def recorded_data(data: Data) -> str | list[str]:
    """``data`` as config.json records it: one root as a string (as always), several as a list."""
    roots = [str(root.resolve()) for root in data_roots(data)]
    return roots[0] if len(roots) == 1 else roots


def load_data(data: Data, options: DataOptions, *, progress: bool = True) -> PreparedData:
    """Scan, decode (through the image cache) and fingerprint a dataset, and fix its split.

    Every class needs enough usable images for the test split and the folds asked for (also after
    ``skip_bad`` dropped some); a class that is too small is refused with one line naming it.
    Several roots are merged (classes are the union by name, :func:`data.dataset.merge_datasets`);
    the merged dataset has its own fingerprint and ``roots`` records each root's.
    """
    size = (options.image_size, options.image_size)
    min_per_class = splits_module.minimum_class_size(options.test_fraction, options.n_folds)
    dataset, parts = data_module.scan_datasets(data_roots(data), skip_bad=options.skip_bad, min_per_class=min_per_class)
    dataset, images = loading.load_images(
        dataset,
        image_size=size,
        cache_dir=options.cache_dir or default_cache_dir(),
        skip_bad=options.skip_bad,
        min_per_class=min_per_class,
        progress=progress,
    )
    fingerprint = data_module.dataset_fingerprint(dataset, size)
    splits = splits_module.make_splits(
        dataset.labels,
        test_fraction=options.test_fraction,
        n_folds=options.n_folds,
        seed=options.seed,
        class_names=dataset.class_names,
    )
    roots = data_module.root_records(dataset, parts, size) if len(parts) > 1 else None
    return PreparedData(dataset, images, fingerprint, splits, roots)


def check_same_data(prepared: PreparedData, data: Data, run: Path) -> None:
    """A run folder holds one dataset: refuse data whose fingerprint differs from the recorded one."""
    dataset_record = runfolder.dataset_path(run)
    if dataset_record.is_file():
        recorded = read_json(dataset_record).get("fingerprint")
        if recorded != prepared.fingerprint:
            raise ValueError(
                f"{run}: this run folder was made from other data (fingerprint {str(recorded)[:16]}), "
                f"{shown(data)} now gives {prepared.fingerprint[:16]}; use a new --out"
            )


def record_data(prepared: PreparedData, data: Data, run: Path) -> None:
    """Write the dataset record and split of a run (with several roots, each root's record too)."""
    dataset, splits = prepared.dataset, prepared.splits
    dataset_record = runfolder.dataset_path(run)
    splits_module.write_splits_csv(runfolder.splits_path(run), dataset, splits)
    height, width = (int(v) for v in prepared.images.shape[1:3])
    several = {"roots": prepared.roots} if prepared.roots else {}
    write_json(
        dataset_record,
        {
            "root": recorded_data(data),
            "layout": dataset.layout,
            "fingerprint": prepared.fingerprint,
            "image_size": [height, width],
            "n_images": len(dataset.paths),
            "class_names": list(dataset.class_names),
            "counts": dataset.counts(),
            "n_test": int(len(splits.test_indices)),
            "n_train": int(len(splits.train_indices)),
        }
        | several,
    )
    log.info("dataset %s: %d images, fingerprint %s", shown(data), len(dataset.paths), prepared.fingerprint[:16])


def model_metadata(
    backbone: str,
    variant: str,
    fold: int | str,
    learning_rate: float,
    prepared: PreparedData,
    options: TrainOptions,
    weights_id: str,
) -> dict[str, Any]:
    """What travels with a model file so that `predict` needs nothing else."""
    height, width = (int(v) for v in prepared.images.shape[1:3])
    return {
        "class_names": list(prepared.dataset.class_names),
        "input": {"height": height, "width": width, "channels": 3, "pixels": "RGB 0..255"},
        "backbone": backbone,
        "variant": variant,
        "fold": fold,
        "learning_rate": learning_rate,
        "head": options.head,
        "preprocessing": options.preprocessing,
        "weights": weights_id,
        "dataset_fingerprint": prepared.fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def run_train_options(run: Path) -> tuple[Data, TrainOptions]:
    """The dataset folder (or folders) and training options a run was made with, from its config.json."""
    path = runfolder.config_path(run)
    if not path.is_file():
        raise FileNotFoundError(f"{run}: not a run folder (no config.json; run `steeldefect train` first)")
    recorded = dict(read_json(path)["commands"]["train"]["options"])
    given = recorded.pop("data")
    data: Data = [Path(root) for root in given] if isinstance(given, list) else Path(given)
    if isinstance(recorded.get("image_size"), list):  # run folders made before options were dataclasses
        recorded["image_size"] = int(recorded["image_size"][0])
    known = {spec.name for spec in fields(TrainOptions)}
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k in known}
    return data, TrainOptions(**values)


def load_run_data(run: Path, *, progress: bool = True) -> tuple[PreparedData, TrainOptions]:
    """The images and split a run was trained on, re-read through the image cache."""
    run = Path(run)
    data, options = run_train_options(run)
    prepared = load_data(data, options, progress=progress)
    recorded = read_json(runfolder.dataset_path(run))["fingerprint"]
    if prepared.fingerprint != recorded:
        raise ValueError(
            f"{shown(data)}: the images changed since {run} was trained (fingerprint {prepared.fingerprint[:12]} "
            f"!= {recorded[:12]})"
        )
    splits = splits_module.read_splits_csv(runfolder.splits_path(run), prepared.dataset)
    return PreparedData(prepared.dataset, prepared.images, prepared.fingerprint, splits, prepared.roots), options


def trained_backbones(run: Path) -> list[str]:
    return [name for name, entry in runfolder.load_summary(run)["backbones"].items() if entry.get("status") == "done"]
