"""The int8 guard on data NEU alone does not give: fp32, int8 before the guard, int8 after, and the
guard's cost, per dataset.

Usage (from the repository root)::

    nice -n 10 python bench/int8_guard.py --data ../shared/data/NEU-DET/IMAGES [--per-class 100]
        [--datasets neu neu-cls-bmp imbalanced shifted] [--work /tmp/int8_guard_bench] [--out FILE.json]

Every dataset is a temporary derived copy of NEU-DET images under ``--work`` (outside the
repository, never committed):

* ``neu``: the first ``--per-class`` images of each class, as they are (links);
* ``neu-cls-bmp``: the same images as NEU-CLS names them and stores them: ``Cr_12.bmp``, grayscale
  (mode L) BMPs in one flat folder;
* ``imbalanced``: a re-cut with 150/90/55/35/20/12 images per class (crazing ... scratches);
* ``shifted``: as another camera would give them: darker and lower contrast
  (``v -> 30 + 0.45 v``) and re-encoded as JPEG quality 35.

On each: one `train` (Lite0, pooled head, learning rate 0.01, 15 epochs, 3 folds: the small run the
integration tests train), copied into two run folders before export; one is exported with
``--int8-guard off`` (the int8 file as converted before the guard), the other with ``fix`` (the
default); the fp32 and int8 files of both are scored on the test split (which the guard never
sees). Figures: test accuracy
(mean over the 3 fold models, and the deploy model) of fp32 and of int8 off/fix, the guard's own
check figures (drop on the out-of-fold images before/after, which remedy shipped), and its cost:
the sum of the guard's seconds over the models and the difference in export wall time.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import benchio
from steeldefect.core import runfolder
from steeldefect.core.cpuinfo import cpu_description
from steeldefect.core.files import read_json
from steeldefect.data.dataset import NEU_CLS_PREFIXES
from steeldefect.runtime.litert import make_interpreter, predict_tflite
from steeldefect.study import pipeline

CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
IMBALANCED = (150, 90, 55, 35, 20, 12)
DATASETS = ("neu", "neu-cls-bmp", "imbalanced", "shifted")
BACKBONE = "efficientnet_lite0"
KEYS = ("folds_accuracy", "deploy_accuracy")
TRAIN = dict(backbones=[BACKBONE], head="pooled", learning_rates=[0.01], epochs=15, n_folds=3, progress=False)


def neu_files(data: Path, cls: str, count: int) -> list[Path]:
    files = sorted(data.glob(f"{cls}_*.jpg"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if len(files) < count:
        raise SystemExit(f"{data}: only {len(files)} {cls} images, {count} wanted")
    return files[:count]


def build(kind: str, data: Path, root: Path, per_class: int) -> Path:
    """The derived dataset ``kind`` under ``root`` (rebuilt only when missing)."""
    target = root / kind / "images"
    if target.is_dir():
        return target
    staging = target.with_name("images.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    prefix = {name: short for short, name in NEU_CLS_PREFIXES.items()}
    for position, cls in enumerate(CLASSES):
        count = IMBALANCED[position] if kind == "imbalanced" else per_class
        for source in neu_files(data, cls, count):
            number = source.stem.rsplit("_", 1)[1]
            if kind in ("neu", "imbalanced"):
                (staging / source.name).symlink_to(source.resolve())
            elif kind == "neu-cls-bmp":
                Image.open(source).convert("L").save(staging / f"{prefix[cls]}_{number}.bmp")
            elif kind == "shifted":
                pixels = np.asarray(Image.open(source).convert("L"), dtype=np.float32)
                shifted = np.clip(30 + 0.45 * pixels, 0, 255).astype(np.uint8)
                Image.fromarray(shifted, mode="L").save(staging / source.name, quality=35)
            else:
                raise SystemExit(f"unknown dataset {kind!r} (choose from {', '.join(DATASETS)})")
    staging.rename(target)
    return target


def test_accuracy(run: Path, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Test accuracy (%) of the fp32 and int8 files: mean over the fold models, and the deploy model."""
    out: dict[str, Any] = {}
    for variant in ("fp32", "int8"):
        scores = {}
        for fold in (*range(TRAIN["n_folds"]), runfolder.FINAL):
            path = runfolder.fold_model_path(run, BACKBONE, fold, variant)
            predicted = predict_tflite(make_interpreter(path), images).argmax(axis=1)
            scores[fold] = 100 * float(np.mean(predicted == labels))
        folds = [scores[fold] for fold in range(TRAIN["n_folds"])]
        out[variant] = {
            "folds_accuracy": round(float(np.mean(folds)), 2),
            "per_fold": [round(v, 2) for v in folds],
            "deploy_accuracy": round(scores[runfolder.FINAL], 2),
        }
    return out


def guard_records(run: Path) -> dict[str, Any]:
    checks = read_json(run / "summary.json")["backbones"][BACKBONE].get("int8_check", {})
    return {fold: record["int8"] for fold, record in checks.items() if "int8" in record}


def run_dataset(kind: str, data: Path, work: Path, per_class: int) -> dict[str, Any]:
    images = build(kind, data, work, per_class)
    trained = work / kind / "trained"
    if not (trained / "summary.json").is_file() or not any(trained.glob("*/models/*final*.keras")):
        started = time.perf_counter()
        pipeline.train(images, trained, **TRAIN)
        print(f"{kind}: trained in {time.perf_counter() - started:.0f} s")
    prepared, _ = pipeline.load_run_data(trained, progress=False)
    test = prepared.splits.test_indices
    test_images, test_labels = prepared.images[test], prepared.dataset.labels[test]
    result: dict[str, Any] = {
        "images": len(prepared.dataset.labels),
        "per_class": np.bincount(prepared.dataset.labels).tolist(),
        "test_images": len(test),
    }
    for mode in ("off", "fix"):
        run = work / kind / f"guard-{mode}"
        if not (run / "summary.json").is_file():
            shutil.copytree(trained, run, symlinks=True)
        started = time.perf_counter()
        pipeline.export(run, variants=["fp32", "int8"], int8_guard=mode, quant_report=False, progress=False)
        export_seconds = time.perf_counter() - started
        guard = guard_records(run)
        result[mode] = test_accuracy(run, test_images, test_labels) | {
            "guard": guard,
            "guard_seconds": round(sum(record.get("guard_seconds") or 0 for record in guard.values()), 1),
            "export_seconds": round(export_seconds, 1),
        }
    off, fix = result["off"], result["fix"]
    result["summary"] = {
        "fp32": off["fp32"],
        "int8_before_guard": off["int8"],
        "int8_after_guard": fix["int8"],
        "drop_before": {k: round(off["fp32"][k] - off["int8"][k], 2) for k in KEYS},
        "drop_after": {k: round(fix["fp32"][k] - fix["int8"][k], 2) for k in KEYS},
        "remedies_shipped": {fold: record["shipped"] for fold, record in fix["guard"].items()},
        "guard_seconds": fix["guard_seconds"],
        "export_seconds_off_fix": [off["export_seconds"], fix["export_seconds"]],
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="NEU-DET IMAGES folder")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--work", type=Path, default=Path("/tmp/int8_guard_bench"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print(cpu_description(), "(shared 2-core machine: times are indicative)")
    results: dict[str, Any] = {"options": {"per_class": args.per_class, "train": TRAIN, "imbalanced": IMBALANCED}}
    for kind in args.datasets:
        results[kind] = run_dataset(kind, args.data, args.work, args.per_class)
        row = results[kind]["summary"]
        print(
            f"{kind:12s} fp32 {row['fp32']['folds_accuracy']:6.2f}  "
            f"int8 before {row['int8_before_guard']['folds_accuracy']:6.2f}"
            f"  after {row['int8_after_guard']['folds_accuracy']:6.2f}  (deploy: {row['fp32']['deploy_accuracy']} / "
            f"{row['int8_before_guard']['deploy_accuracy']} / {row['int8_after_guard']['deploy_accuracy']})  "
            f"guard {row['guard_seconds']:.0f} s  shipped {row['remedies_shipped']}",
            flush=True,
        )
        benchio.save("int8_guard", results, threads=0, out=args.out)


if __name__ == "__main__":
    main()
