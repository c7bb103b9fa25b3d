"""Where int8 gains or loses against fp32: EfficientNet-Lite0 timed stage by stage, side by side.

Figures: docs/results.md, "Where int8 loses without dot-product instructions".

Usage (from the repository root)::

    python bench/int8_stages.py [NEU-DET folder] [--threads 1 2] [--rounds 5] [--runs 20] [--out FILE.json]

Builds Lite0 (real ImageNet weights, preprocessing inside) cut after the stem, after each of its
seven MBConv stages and after the 1x1 head conv; converts every prefix to fp32 and to full-integer
int8 (uint8 input, calibrated on NEU images) and times them at batch 1 in interleaved rounds. A
stage's time is the difference between consecutive prefixes, so the table shows which layers make
int8 slower or faster than fp32 on this CPU. Prints the CPU model, its int8 dot-product features
and the thread count beside the figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import keras
import numpy as np

import benchio
from steeldefect.core.cpuinfo import cpu_model, int8_features
from steeldefect.data.dataset import scan_dataset
from steeldefect.data.loading import load_images
from steeldefect.deploy import export as quantize
from steeldefect.models import backbones
from steeldefect.models.efficientnet_lite import LITE0_STAGES
from steeldefect.runtime.litert import delegate_partitions, make_interpreter
from steeldefect.study.evaluate import measure_latency

DEFAULT_NEU_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "NEU-DET"


def cut_points(model: keras.Model) -> list[tuple[str, str]]:
    """(label, layer name) after the stem, each stage and the head conv."""
    names = {layer.name for layer in model.layers}
    points = [("stem 3x3/2", "stem_relu")]
    block = -1
    for stage, (repeats, kernel, stride, _expand, channels) in enumerate(LITE0_STAGES, start=1):
        block += repeats
        last = f"block{block}_add" if f"block{block}_add" in names else f"block{block}_project_bn"
        points.append((f"stage {stage}: {repeats}x k{kernel} s{stride} -> {channels}", last))
    points.append(("head 1x1 -> 1280", "head_relu"))
    return points


def calibration_images(data: Path, count: int) -> np.ndarray:
    if data.is_dir():
        dataset = scan_dataset(data)
        pick = np.linspace(0, len(dataset) - 1, count).astype(int)  # spread over every class
        return load_images(dataset.subset(pick), progress=False)[1]
    print(f"note: {data} not found; calibrating on random images")
    return np.random.default_rng(0).integers(0, 256, (count, 224, 224, 3), dtype=np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, nargs="?", default=DEFAULT_NEU_DIR)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all models")
    parser.add_argument("--runs", type=int, default=20, help="timed invokes per model per round")
    parser.add_argument("--calibration", type=int, default=24, help="calibration images per int8 prefix")
    parser.add_argument("--out", type=Path, default=benchio.RESULTS_DIR / "int8_stages.json", help="results JSON file")
    args = parser.parse_args(argv)

    print(f"cpu:       {cpu_model()} ({platform.machine()}), {os.cpu_count()} logical cores")
    print(f"int8 dot:  {', '.join(int8_features()) or 'none (no VNNI / AMX / dotprod)'}")
    print(
        f"protocol:  batch 1, {args.rounds} interleaved rounds x {args.runs} timed invokes; stage = prefix difference"
    )

    full = backbones.build_backbone("efficientnet_lite0")
    images = calibration_images(args.data, args.calibration)
    points = cut_points(full)
    with tempfile.TemporaryDirectory() as scratch:
        paths: dict[tuple[int, str], Path] = {}
        for index, (_, layer) in enumerate(points):
            prefix = keras.Model(full.input, full.get_layer(layer).output, name=f"prefix{index}")
            for variant in ("fp32", "int8"):
                path = Path(scratch) / f"prefix{index}.{variant}.tflite"
                quantize.export_model(prefix, variant, path, images if variant == "int8" else None)
                paths[index, variant] = path
        image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
        results: dict = {
            "protocol": {
                "batch": 1,
                "rounds": args.rounds,
                "runs": args.runs,
                "calibration_images": len(images),
                "statistic": "median over rounds of each round's median ms; stage = prefix difference",
            },
            "threads": {},
        }
        for threads in args.threads:
            interpreters = {key: make_interpreter(path, threads) for key, path in paths.items()}
            split = [key for key, interpreter in interpreters.items() if delegate_partitions(interpreter) != 1]
            medians: dict[tuple[int, str], list[float]] = {key: [] for key in interpreters}
            for round_index in range(args.rounds):
                for key, interpreter in interpreters.items():
                    warmup = 5 if round_index == 0 else 2
                    timing = measure_latency(interpreter, image, warmup=warmup, runs=args.runs)
                    medians[key].append(timing["latency_ms_median"])
            ms = {key: float(np.median(values)) for key, values in medians.items()}
            print()
            print(f"threads {threads}" + (f"  (not one XNNPACK partition: {split})" if split else ""))
            print(f"{'stage':<34} {'fp32 ms':>8} {'int8 ms':>8} {'int8/fp32':>9}   cumulative fp32 / int8 / ratio")
            rows = []
            previous = {"fp32": 0.0, "int8": 0.0}
            for index, (label, layer) in enumerate(points):
                stage = {v: ms[index, v] - previous[v] for v in ("fp32", "int8")}
                ratio = stage["int8"] / stage["fp32"] if stage["fp32"] > 0.05 else float("nan")
                cumulative = ms[index, "int8"] / ms[index, "fp32"]
                print(
                    f"{label:<34} {stage['fp32']:>8.2f} {stage['int8']:>8.2f} {ratio:>9.2f}   "
                    f"{ms[index, 'fp32']:6.2f} / {ms[index, 'int8']:6.2f} / {cumulative:.2f}"
                )
                rows.append(
                    {
                        "stage": label,
                        "cut_after_layer": layer,
                        "fp32_ms": stage["fp32"],
                        "int8_ms": stage["int8"],
                        # null when the fp32 stage is too short (<= 0.05 ms) for a meaningful ratio
                        "int8_over_fp32": None if np.isnan(ratio) else ratio,
                        "cumulative_fp32_ms": ms[index, "fp32"],
                        "cumulative_int8_ms": ms[index, "int8"],
                        "cumulative_int8_over_fp32": cumulative,
                    }
                )
                previous = {v: ms[index, v] for v in ("fp32", "int8")}
            results["threads"][str(threads)] = {
                "stages": rows,
                "not_one_xnnpack_partition": [f"prefix{index}.{variant}" for index, variant in split],
            }
    benchio.save("int8_stages", results, threads=args.threads, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
