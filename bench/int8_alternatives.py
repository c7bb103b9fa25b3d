"""Why the int8 guard cannot fix `shifted`: other conversions of the same fold models, scored as
the guard scores (against the model's own float output on its fold's out-of-fold images) and on
the test split, with their size and latency side by side.

Figures: docs/int8-guard.md, "Design notes".

Usage (from the repository root)::

    nice -n 10 python bench/int8_alternatives.py --data ../shared/data/NEU-DET/IMAGES
        [--dataset shifted] [--per-class 100] [--folds 2] [--work /tmp/int8_guard_bench] [--out FILE.json]

The dataset and its trained run are bench/int8_guard.py's (built and trained under ``--work`` when
missing, reused otherwise). Per fold model, each conversion:

* ``int8``: full-integer, calibrated on the fold's training images, as `export` converts it;
* ``int8, calibrated on the check images``: the same, calibrated on the very images it is scored
  on. If this still loses, no choice of calibration images can fix the conversion;
* ``int16x8``: 16-bit activations, 8-bit weights (the converter's experimental 16x8 mode): whether
  activation resolution is what is lost;
* ``int8, head in float``: the pooled head (pooling and dense layers) kept in float (the guard's
  selective quantization): whether the loss is in the head;
* ``dynamic-range``: 8-bit weights, activations quantized per image at run time (float in and out).

Latency: median ms of one invoke at batch 1, LiteRT (XNNPACK), 1 and 2 threads, the float model and
every conversion timed in interleaved rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
from pathlib import Path
from typing import Any

import numpy as np

import benchio
import int8_guard as guard_bench
from steeldefect.core import runfolder
from steeldefect.core.cpuinfo import cpu_description
from steeldefect.deploy import int8guard
from steeldefect.models import conversion
from steeldefect.runtime.litert import make_interpreter
from steeldefect.study import pipeline

BACKBONE = guard_bench.BACKBONE
KEEP = ("fp32_accuracy", "int8_accuracy", "accuracy_drop", "worst_class", "worst_class_recall_drop", "top1_changed")


def _converted(converter) -> bytes:
    with contextlib.redirect_stdout(io.StringIO()):  # the SavedModel step prints every variable
        return conversion.order_outputs(converter.convert())


def int16x8(model, calibration: np.ndarray) -> bytes:
    import tensorflow as tf

    converter = conversion.batch1_converter(model, model.input_shape[1:])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = conversion.representative_dataset(calibration)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    return _converted(converter)


def dynamic_range(model) -> bytes:
    import tensorflow as tf

    converter = conversion.batch1_converter(model, model.input_shape[1:])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no representative dataset: weights only
    return _converted(converter)


def head_in_float(model, calibration: np.ndarray, int8_flatbuffer: bytes) -> bytes:
    """int8 with every tensor of the pooled head (its Keras sub-model is named ``head``) in float."""
    names = [detail["name"] for detail in make_interpreter(int8_flatbuffer).get_tensor_details()]
    head = [name for name in names if "/head_1/" in name]
    if not head:
        raise SystemExit("no tensor of the pooled head found in the int8 file (is this a pooled-head run?)")
    return conversion.convert_with_float_layers(model, calibration, head)


def latency(flatbuffers: dict[str, bytes], image: np.ndarray, threads: int, rounds: int = 5, runs: int = 20) -> dict:
    """Median ms per invoke of each flatbuffer, timed in interleaved rounds."""
    interpreters = {name: make_interpreter(flatbuffer, threads=threads) for name, flatbuffer in flatbuffers.items()}
    times: dict[str, list[float]] = {name: [] for name in interpreters}
    for _ in range(rounds):
        for name, interpreter in interpreters.items():
            detail = interpreter.get_input_details()[0]
            interpreter.set_tensor(detail["index"], image.astype(detail["dtype"]))
            for _ in range(3):
                interpreter.invoke()
            started = time.perf_counter()
            for _ in range(runs):
                interpreter.invoke()
            times[name].append(1000 * (time.perf_counter() - started) / runs)
    return {name: round(float(np.median(values)), 2) for name, values in times.items()}


def fold_figures(model, prepared, fold: int) -> dict[str, Any]:
    labels, names = prepared.dataset.labels, prepared.dataset.class_names
    fold_train, validation = prepared.splits.folds[fold]
    check = int8guard.check_data(prepared.images, labels, names, validation, fold_train, "out-of-fold")
    test = prepared.splits.test_indices
    reference = int8guard.float_probabilities(model, check.images)
    reference_test = int8guard.float_probabilities(model, prepared.images[test])
    plain = conversion.convert(model, "int8", check.calibration_images)
    builds = {
        "int8": lambda: plain,
        "int8, calibrated on the check images": lambda: conversion.convert(model, "int8", check.images),
        "int16x8": lambda: int16x8(model, check.calibration_images),
        "int8, head in float": lambda: head_in_float(model, check.calibration_images, plain),
        "dynamic-range": lambda: dynamic_range(model),
    }
    rows: dict[str, Any] = {}
    flatbuffers = {"fp32": conversion.convert(model, "fp32")}
    for name, build in builds.items():
        started = time.perf_counter()
        flatbuffer = flatbuffers[name] = build()
        oof = int8guard.measure(
            reference, int8guard.tflite_probabilities(flatbuffer, check.images), check.labels, names
        )
        on_test = int8guard.measure(
            reference_test, int8guard.tflite_probabilities(flatbuffer, prepared.images[test]), labels[test], names
        )
        rows[name] = {
            "out_of_fold": {key: oof[key] for key in KEEP},
            "test": {key: on_test[key] for key in KEEP},
            "size_mib": round(len(flatbuffer) / 2**20, 2),
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(
            f"fold {fold} {name:38s} points lost out of fold: {oof['accuracy_drop']:.2f} (recall of "
            f"{oof['worst_class']} {oof['worst_class_recall_drop']:.2f}); on test: {on_test['accuracy_drop']:.2f}",
            flush=True,
        )
    rows["fp32"] = {"size_mib": round(len(flatbuffers["fp32"]) / 2**20, 2)}
    image = prepared.images[test][:1]
    for threads in (1, 2):
        for name, ms in latency(flatbuffers, image, threads).items():
            rows[name][f"latency_ms_{threads}t"] = ms
    speeds = {name: (row["latency_ms_1t"], row["latency_ms_2t"]) for name, row in rows.items()}
    print(f"fold {fold} latency ms (1 / 2 threads):", speeds, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    import keras

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="NEU-DET IMAGES folder")
    parser.add_argument("--dataset", default="shifted", choices=guard_bench.DATASETS)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/int8_guard_bench"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    print(cpu_description(), "(shared 2-core machine: times are indicative)")
    images = guard_bench.build(args.dataset, args.data, args.work, args.per_class)
    run = args.work / args.dataset / f"trained-224px-{args.folds}folds"
    if not runfolder.fold_model_path(run, BACKBONE, runfolder.FINAL, "keras").is_file():
        pipeline.train(images, run, **guard_bench.TRAIN, image_size=224, n_folds=args.folds)
    prepared, _ = pipeline.load_run_data(run, progress=False)
    results: dict[str, Any] = {"dataset": args.dataset, "per_class": args.per_class, "folds": args.folds}
    for fold in range(len(prepared.splits.folds)):
        model = keras.models.load_model(runfolder.fold_model_path(run, BACKBONE, fold, "keras"))
        results[f"fold {fold}"] = fold_figures(model, prepared, fold)
        benchio.save(f"int8_alternatives_{args.dataset}", results, threads=[1, 2], out=args.out)


if __name__ == "__main__":
    main()
