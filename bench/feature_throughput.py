"""Feature-extraction throughput: EfficientNet-Lite0 vs Keras EfficientNetB0, side by side.

Usage (from the repository root)::

    python bench/feature_throughput.py [NEU-DET folder] [--images 256] [--rounds 3]

Both backbones take the same NEU images in the same batches, alternating batch by batch so that a
noisy neighbour slows both alike. EfficientNetB0 has random weights (timing does not depend on
them); Lite0 has its real ImageNet weights. Prints images/s for each and the ratio.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from steeldefect import backbones
from steeldefect.cpuinfo import cpu_description
from steeldefect.data import load_images, scan_dataset

DEFAULT_NEU_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "NEU-DET"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, nargs="?", default=DEFAULT_NEU_DIR)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    print(f"cpu: {cpu_description()}; threads: TensorFlow default ({os.cpu_count()} cores)")
    dataset, images = load_images(scan_dataset(args.data), progress=False)
    images = images[np.random.default_rng(0).permutation(len(images))[: args.images]].astype(np.float32)
    models = {
        "efficientnet_lite0 (ImageNet)": backbones.build_backbone("efficientnet_lite0"),
        "efficientnetb0 (random weights)": backbones.build_backbone("efficientnetb0", weights="none"),
    }
    for model in models.values():  # trace and warm up outside the timing
        model.predict_on_batch(images[: args.batch_size])
    seconds = {name: 0.0 for name in models}
    for _ in range(args.rounds):
        for start in range(0, len(images), args.batch_size):
            batch = images[start : start + args.batch_size]
            for name, model in models.items():
                started = time.perf_counter()
                model.predict_on_batch(batch)
                seconds[name] += time.perf_counter() - started
    rates = {name: args.rounds * len(images) / value for name, value in seconds.items()}
    for name, rate in rates.items():
        print(f"{name:<34} {rate:7.1f} images/s")
    lite, b0 = rates.values()
    print(f"Lite0 / EfficientNetB0 throughput ratio: {lite / b0:.2f}x  ({args.rounds} rounds x {len(images)} images, batch {args.batch_size})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
