"""Feature-extraction throughput, side by side: backbones x engines (Keras, LiteRT float32).

Figures: docs/results.md, "Feature extraction".

Usage (from the repository root)::

    python bench/feature_throughput.py [NEU-DET folder] [--images 256] [--rounds 3] [--out FILE.json]

Every backbone takes the same NEU images, alternating batch by batch (32 images) between backbones
and engines, so that a noisy neighbour slows all alike. Engines: Keras ``predict_on_batch`` (batch
32) and the LiteRT interpreter on the converted float32 model (XNNPACK, one image per invoke), which
is what ``steeldefect`` extracts features with; the one-off conversion is timed apart.
EfficientNet-Lite0 has its real ImageNet weights, the Keras backbones random ones (timing does not
depend on them, and their official files are not on every machine). Prints images/s, the Lite0 /
EfficientNetB0 ratio per engine and the LiteRT / Keras ratio per backbone.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

import benchio
from steeldefect.core.cpuinfo import cpu_description
from steeldefect.data.dataset import scan_dataset
from steeldefect.data.loading import load_images
from steeldefect.models import backbones
from steeldefect.models.conversion import convert
from steeldefect.runtime.litert import make_interpreter, predict_tflite

DEFAULT_NEU_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "NEU-DET"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, nargs="?", default=DEFAULT_NEU_DIR)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnetb0", "mobilenet"])
    parser.add_argument(
        "--out", type=Path, default=benchio.RESULTS_DIR / "feature_throughput.json", help="results JSON file"
    )
    args = parser.parse_args(argv)

    dataset, images = load_images(scan_dataset(args.data), progress=False)
    images = images[np.random.default_rng(0).permutation(len(images))[: args.images]]
    models, interpreters, conversion = {}, {}, {}
    for name in args.backbones:
        models[name] = backbones.build_backbone(name, weights="imagenet" if name == "efficientnet_lite0" else "none")
        started = time.perf_counter()
        interpreters[name] = make_interpreter(convert(models[name], "fp32"))
        conversion[name] = time.perf_counter() - started
        print(f"{name}: converted to LiteRT float32 in {conversion[name]:.1f} s (once per feature cache)")
        models[name].predict_on_batch(images[: args.batch_size].astype(np.float32))  # trace outside the timing
        predict_tflite(interpreters[name], images[:2])
    print(f"cpu: {cpu_description()}; threads: TensorFlow default, LiteRT {os.cpu_count()} (all cores)")

    seconds = {(name, engine): 0.0 for name in models for engine in ("keras", "litert")}
    for _ in range(args.rounds):
        for start in range(0, len(images), args.batch_size):
            batch = images[start : start + args.batch_size]
            for name in models:
                started = time.perf_counter()
                models[name].predict_on_batch(batch.astype(np.float32))
                seconds[name, "keras"] += time.perf_counter() - started
                started = time.perf_counter()
                predict_tflite(interpreters[name], batch)
                seconds[name, "litert"] += time.perf_counter() - started
    rate = {key: args.rounds * len(images) / value for key, value in seconds.items()}
    results: dict = {
        "protocol": {
            "images": len(images),
            "rounds": args.rounds,
            "batch_size": args.batch_size,
            "keras": f"predict_on_batch, batch {args.batch_size}",
            "litert": "float32, one image per invoke",
        },
        "backbones": {
            name: {
                "weights": "imagenet" if name == "efficientnet_lite0" else "random",
                "conversion_s": conversion[name],
                "images_per_s": {"keras": rate[name, "keras"], "litert": rate[name, "litert"]},
                "litert_over_keras": rate[name, "litert"] / rate[name, "keras"],
            }
            for name in models
        },
    }
    print(f"\n{'images/s':<20} {'keras':>8} {'litert':>8} {'litert/keras':>13}")
    for name in models:
        ratio = results["backbones"][name]["litert_over_keras"]
        print(f"{name:<20} {rate[name, 'keras']:8.1f} {rate[name, 'litert']:8.1f} {ratio:12.2f}x")
    if {"efficientnet_lite0", "efficientnetb0"} <= set(models):
        results["lite0_over_efficientnetb0_throughput"] = {}
        for engine in ("keras", "litert"):
            ratio = rate["efficientnet_lite0", engine] / rate["efficientnetb0", engine]
            results["lite0_over_efficientnetb0_throughput"][engine] = ratio
            print(f"Lite0 / EfficientNetB0 throughput, {engine}: {ratio:.2f}x")
        # What a feature cache miss costs on the whole dataset: conversion once, then every image.
        whole = {name: conversion[name] + len(dataset.paths) / rate[name, "litert"] for name in models}
        speedup = whole["efficientnetb0"] / whole["efficientnet_lite0"]
        results["whole_dataset_litert_with_conversion"] = {
            "images": len(dataset.paths),
            "seconds": whole,
            "lite0_over_efficientnetb0": speedup,
        }
        print(
            f"whole dataset ({len(dataset.paths)} images) with LiteRT, conversion included: "
            + ", ".join(f"{name} {total:.0f} s" for name, total in whole.items())
            + f"; Lite0 / EfficientNetB0 {speedup:.2f}x"
        )
    print(f"({args.rounds} rounds x {len(images)} images)")
    benchio.save(
        "feature_throughput", results, threads={"keras": "TensorFlow default", "litert": os.cpu_count()}, out=args.out
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
