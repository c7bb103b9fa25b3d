"""Latency of several model files side by side: what a feature choice or `export --tta` costs per image.

Figures: docs/results.md, "Model latency: features and the 8-view average".

Usage (from the repository root)::

    python bench/model_latency.py LABEL=MODEL.tflite ... [--threads 1 2] [--rounds 5] [--runs 30] [--out FILE.json]

Each file is timed at batch 1 (``invoke()`` on a random image, as `evaluate` does) in interleaved
rounds (A, B, C, A, B, C, ...), so a noisy neighbour slows every model alike; the figure per model is
the median over rounds of each round's median, and the ratio is to the first model. Prints and saves
the CPU model, its int8 dot-product features and the thread count beside the figures.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

import benchio
from steeldefect.core.cpuinfo import cpu_description
from steeldefect.runtime.litert import make_interpreter
from steeldefect.study.evaluate import measure_latency


def labelled(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=MODEL.tflite")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{path}: model file not found")
    return label, Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=labelled, nargs="+", help="LABEL=MODEL.tflite; the first is the baseline")
    parser.add_argument("--threads", type=int, nargs="+", default=[os.cpu_count() or 1])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    print(cpu_description())
    print(f"batch 1, {args.warmup} warm-up invokes, {args.rounds} interleaved rounds x {args.runs} timed invokes")
    rng = np.random.default_rng(0)
    baseline = args.models[0][0]
    results: dict = {"models": {label: str(path) for label, path in args.models}, "threads": {}}
    for threads in args.threads:
        interpreters = {label: make_interpreter(path, threads) for label, path in args.models}
        medians: dict[str, list[float]] = {label: [] for label in interpreters}
        for round_index in range(args.rounds):
            for label, interpreter in interpreters.items():
                height, width = interpreter.get_input_details()[0]["shape"][1:3]
                image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                timing = measure_latency(
                    interpreter, image, warmup=args.warmup if round_index == 0 else 2, runs=args.runs
                )
                medians[label].append(timing["latency_ms_median"])
        median = {label: float(np.median(values)) for label, values in medians.items()}
        results["threads"][str(threads)] = {
            "median_ms": median,
            "over_baseline": {label: median[label] / median[baseline] for label in median},
            "round_medians_ms": medians,
        }
        for label, path in args.models:
            print(
                f"threads {threads}  {label:<28} {median[label]:8.2f} ms  x{median[label] / median[baseline]:5.2f}  "
                f"{path.stat().st_size / 2**20:6.2f} MiB"
            )
    benchio.save("model_latency", results, threads=args.threads, out=args.out)


if __name__ == "__main__":
    main()
