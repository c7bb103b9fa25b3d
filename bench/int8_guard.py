"""The int8 guard on data NEU alone does not give: fp32, int8 before the guard, int8 after, and the
guard's cost, per dataset.

Figures: docs/int8-guard.md.

Usage (from the repository root)::

    nice -n 10 python bench/int8_guard.py --data ../shared/data/NEU-DET/IMAGES [--per-class 100]
        [--image-size 224] [--folds 2] [--datasets neu neu-cls-bmp imbalanced shifted]
        [--work /tmp/int8_guard_bench] [--out FILE.json]

Every dataset is a temporary derived copy of NEU-DET images under ``--work`` (outside the
repository, never committed):

* ``neu``: the first ``--per-class`` images of each class, as they are (links);
* ``neu-cls-bmp``: the same images as NEU-CLS names them and stores them: ``Cr_12.bmp``, grayscale
  (mode L) BMPs in one flat folder;
* ``imbalanced``: a re-cut with 150/90/55/35/20/12 images per class (crazing ... scratches);
* ``shifted``: as another camera would give them: darker and lower contrast
  (``v -> 30 + 0.45 v``) and re-encoded as JPEG quality 35.

On each: one `train` (Lite0 at ``--image-size``, pooled head, learning rate 0.01, 15 epochs,
``--folds`` folds; a run already trained in ``--work`` is reused), then one `export --variants int8` with the
guard on (``fix``, the default), one fold at a time (``workers=1``). The guard's own first
conversion is exactly what ``--int8-guard off`` would write (same call, same calibration images);
the bench keeps a copy of it beside the run (``before/``) instead of exporting a second time, and
scores on the test split (which the guard never sees): fp32 = the Keras model the int8 file was
converted from (the guard's reference), int8 before the guard, int8 after (the file export wrote).
Also saved: the guard's own check figures on the out-of-fold images before/after, which remedy
shipped per model, and the guard's seconds
(summed over the models; the conversion itself is not counted).
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
from steeldefect.core.files import atomic_write_bytes, read_json
from steeldefect.data.dataset import NEU_CLS_PREFIXES
from steeldefect.deploy import int8guard
from steeldefect.runtime.litert import make_interpreter, predict_tflite
from steeldefect.study import pipeline

CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
IMBALANCED = (150, 90, 55, 35, 20, 12)
DATASETS = ("neu", "neu-cls-bmp", "imbalanced", "shifted")
BACKBONE = "efficientnet_lite0"
KEYS = ("folds_accuracy", "deploy_accuracy")
TRAIN = dict(backbones=[BACKBONE], head="pooled", learning_rates=[0.01], epochs=15, progress=False)


def neu_files(data: Path, cls: str, count: int) -> list[Path]:
    files = sorted(data.glob(f"{cls}_*.jpg"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if len(files) < count:
        raise SystemExit(f"{data}: only {len(files)} {cls} images, {count} wanted")
    return files[:count]


def build(kind: str, data: Path, root: Path, per_class: int) -> Path:
    """The derived dataset ``kind`` under ``root`` (rebuilt only when missing)."""
    target = root / kind / ("images" if kind == "imbalanced" else f"images-{per_class}")
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


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    return round(100 * float(np.mean(predicted.argmax(axis=1) == labels)), 2)


def test_accuracy(run: Path, before: Path, images: np.ndarray, labels: np.ndarray, n_folds: int) -> dict[str, Any]:
    """Test accuracy (%) per model (folds, final) of fp32 (the Keras model), int8 before and after."""
    import keras

    out: dict[str, Any] = {}
    for fold in (*range(n_folds), runfolder.FINAL):
        model = keras.models.load_model(runfolder.fold_model_path(run, BACKBONE, fold, "keras"))
        shipped = runfolder.fold_model_path(run, BACKBONE, fold, "int8")
        out[str(fold)] = {
            "fp32": accuracy(model.predict(images.astype(np.float32), batch_size=16, verbose=0), labels),
            "int8_before": accuracy(predict_tflite(make_interpreter(before / shipped.name), images), labels),
            "int8_after": accuracy(predict_tflite(make_interpreter(shipped), images), labels),
        }
    folds = [out[str(fold)] for fold in range(n_folds)]
    out["folds_mean"] = {key: round(float(np.mean([row[key] for row in folds])), 2) for key in folds[0]}
    return out


def guard_records(run: Path) -> dict[str, Any]:
    checks = read_json(run / "summary.json")["backbones"][BACKBONE].get("int8_check", {})
    return {fold: record["int8"] for fold, record in checks.items() if "int8" in record}


def keep_as_converted(before: Path):
    """Wrap the guard so the conversion it starts from (what ``--int8-guard off`` writes) is kept."""
    original = int8guard.guarded_convert

    def wrapper(model, variant, calibration_images, check, settings, **kwargs):
        flatbuffer, record, as_converted = original(model, variant, calibration_images, check, settings, **kwargs)
        name = kwargs.get("name", "model").split()[-1]
        fold = runfolder.FINAL if name == "final" else int(name)
        target = before / runfolder.fold_model_path(before, BACKBONE, fold, variant).name
        atomic_write_bytes(target, as_converted)
        return flatbuffer, record, as_converted

    return wrapper


def run_dataset(kind: str, data: Path, work: Path, per_class: int, image_size: int, folds: int) -> dict[str, Any]:
    images = build(kind, data, work, per_class)
    run = work / kind / f"trained-{image_size}px-{folds}folds"
    if not runfolder.fold_model_path(run, BACKBONE, runfolder.FINAL, "keras").is_file():
        started = time.perf_counter()
        pipeline.train(images, run, **TRAIN, image_size=image_size, n_folds=folds)
        print(f"{kind}: trained in {time.perf_counter() - started:.0f} s", flush=True)
    before = run.with_name(run.name + "-before")
    before.mkdir(exist_ok=True)
    int8guard.guarded_convert = keep_as_converted(before)
    started = time.perf_counter()
    pipeline.export(run, variants=["int8"], int8_guard="fix", quant_report=False, workers=1, progress=False)
    export_seconds = time.perf_counter() - started
    prepared, _ = pipeline.load_run_data(run, progress=False)
    test = prepared.splits.test_indices
    guard = guard_records(run)
    n_folds = len(prepared.splits.folds)
    scores = test_accuracy(run, before, prepared.images[test], prepared.dataset.labels[test], n_folds)
    return {
        "images": len(prepared.dataset.labels),
        "per_class": np.bincount(prepared.dataset.labels).tolist(),
        "test_images": len(test),
        "folds": n_folds,
        "test_accuracy": scores,
        "guard": guard,
        "summary": {
            "fp32": scores["folds_mean"]["fp32"],
            "int8_before_guard": scores["folds_mean"]["int8_before"],
            "int8_after_guard": scores["folds_mean"]["int8_after"],
            "deploy": scores[runfolder.FINAL],
            "shipped": {fold: record["shipped"] for fold, record in guard.items()},
            "guard_seconds": round(sum(record.get("guard_seconds") or 0 for record in guard.values()), 1),
            "export_seconds": round(export_seconds, 1),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="NEU-DET IMAGES folder")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=224, help="Lite0 input size (smaller: faster)")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/int8_guard_bench"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    print(cpu_description(), "(shared 2-core machine: times are indicative)")
    results: dict[str, Any] = {
        "options": {
            "per_class": args.per_class,
            "image_size": args.image_size,
            "folds": args.folds,
            "train": TRAIN,
            "imbalanced": IMBALANCED,
        }
    }
    for kind in args.datasets:
        results[kind] = run_dataset(kind, args.data, args.work, args.per_class, args.image_size, args.folds)
        row = results[kind]["summary"]
        print(
            f"{kind:12s} test accuracy, mean of the fold models: fp32 {row['fp32']:6.2f}  int8 before the guard "
            f"{row['int8_before_guard']:6.2f}  after {row['int8_after_guard']:6.2f}; deploy model {row['deploy']}; "
            f"guard {row['guard_seconds']:.0f} s; shipped {row['shipped']}",
            flush=True,
        )
        benchio.save("int8_guard", results, threads=0, out=args.out)


if __name__ == "__main__":
    main()
