"""fp32 vs fp16 vs int8 LiteRT latency, measured side by side in one run, as ratios.

Figures: docs/results.md, "Latency".

Usage (from the repository root, after `steeldefect export RUN`)::

    python bench/latency.py RUN [--threads 1 2] [--rounds 5] [--runs 30] [--out FILE.json]

For every trained backbone in RUN it takes the fold-0 model of each exported variant (fp32 needed,
as the baseline; fp16, int8 and int8-mixed when the run has them, "-" otherwise) and times
``invoke()`` at batch 1 in interleaved rounds (fp32, fp16, int8, int8-mixed, fp32, ...), so a noisy
neighbour slows all variants alike and the ratios stay fair. Prints the CPU model, its int8
dot-product features and the thread count beside every figure: int8 only beats float where the CPU
has such instructions.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np

import benchio
from steeldefect.core.cpuinfo import cpu_flags, cpu_model, int8_features
from steeldefect.core.runfolder import fold_model_path, load_summary
from steeldefect.runtime.litert import delegate_partitions, make_interpreter
from steeldefect.study.evaluate import measure_latency

BASELINE = "fp32"
VARIANTS = ("fp32", "fp16", "int8", "int8-mixed")  # each but the baseline timed when the run has it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--threads", type=int, nargs="+", default=[os.cpu_count() or 1])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the variants")
    parser.add_argument("--runs", type=int, default=30, help="timed invokes per model per round")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, default=benchio.RESULTS_DIR / "latency.json", help="results JSON file")
    args = parser.parse_args(argv)

    flags = cpu_flags()
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
    simd = [flag for flag in wanted if flag in flags]
    print(f"cpu:       {cpu_model()} ({platform.machine()}), {os.cpu_count()} logical cores")
    print(f"simd:      {' '.join(simd) or 'none found'}")
    print(f"int8 dot:  {', '.join(int8_features()) or 'none (no VNNI / AMX / dotprod: expect int8 ~ fp32 speed)'}")
    print(
        f"protocol:  batch 1, {args.warmup} warm-up invokes, {args.rounds} interleaved rounds x "
        f"{args.runs} timed invokes"
    )
    print()

    summary = load_summary(args.run)
    names = [name for name, entry in summary["backbones"].items() if entry.get("status") == "done"]
    if not names:
        print(f"{args.run}: no trained backbone with exported models", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    short = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int8-mixed": "mixed"}
    ratios = [variant for variant in VARIANTS if variant != BASELINE]
    header = f"{'backbone':<20} {'threads':>7} " + " ".join(f"{short[v] + ' ms':>10}" for v in VARIANTS)
    header += " " + " ".join(f"{short[v] + '/fp32':>10}" for v in ratios) + "  partitions"
    print(header)
    print("-" * len(header))
    results: dict = {
        "run": str(args.run),
        "fold": 0,
        "protocol": {
            "batch": 1,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "runs": args.runs,
            "statistic": "median over rounds of each round's median ms",
        },
        "backbones": {},
    }
    for name in names:
        present = {variant: fold_model_path(args.run, name, 0, variant) for variant in VARIANTS}
        paths = {variant: path for variant, path in present.items() if path.is_file()}
        if BASELINE not in paths:
            print(f"{name:<20} missing: {present[BASELINE]} (run `steeldefect export {args.run}`)")
            results["backbones"][name] = {"missing": str(present[BASELINE])}
            continue
        entry = results["backbones"][name] = {
            "models": {variant: str(path) for variant, path in paths.items()},
            "not_exported": [variant for variant in VARIANTS if variant not in paths],
            "threads": {},
        }
        for threads in args.threads:
            interpreters = {variant: make_interpreter(path, threads) for variant, path in paths.items()}
            height, width = interpreters[BASELINE].get_input_details()[0]["shape"][1:3]
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            medians: dict[str, list[float]] = {variant: [] for variant in paths}
            for round_index in range(args.rounds):
                for variant in paths:
                    result = measure_latency(
                        interpreters[variant], image, warmup=args.warmup if round_index == 0 else 2, runs=args.runs
                    )
                    medians[variant].append(result["latency_ms_median"])
            median = {variant: float(np.median(values)) for variant, values in medians.items()}
            over = {variant: median[variant] / median[BASELINE] for variant in ratios if variant in median}
            partitions = {variant: delegate_partitions(interpreters[variant]) for variant in paths}
            entry["threads"][str(threads)] = {
                "median_ms": median,
                "over_fp32": over,
                "xnnpack_partitions": partitions,
                "round_medians_ms": medians,
            }
            print(
                f"{name:<20} {threads:>7} "
                + " ".join(f"{median[v]:>10.2f}" if v in median else f"{'-':>10}" for v in VARIANTS)
                + " "
                + " ".join(f"{over[v]:>10.2f}" if v in over else f"{'-':>10}" for v in ratios)
                + "  "
                + ",".join(str(partitions[v]) for v in paths)
            )
    benchio.save("latency", results, threads=args.threads, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
