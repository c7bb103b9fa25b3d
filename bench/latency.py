"""fp32 vs fp16 vs int8 LiteRT latency, measured side by side in one run, as ratios.

Usage (from the repository root, after `steeldefect export RUN`)::

    python bench/latency.py RUN [--threads 1 2] [--rounds 5] [--runs 30]

For every trained backbone in RUN it takes the fold-0 model of each variant and times ``invoke()``
at batch 1 in interleaved rounds (fp32, fp16, int8, fp32, ...), so a noisy neighbour slows all
variants alike and the ratios stay fair. Prints the CPU model, its int8 dot-product features and
the thread count beside every figure: int8 only beats float where the CPU has such instructions.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np

from steeldefect.cpuinfo import cpu_flags, cpu_model, int8_features
from steeldefect.evaluate import measure_latency
from steeldefect.runfolder import fold_model_path, load_summary
from steeldefect.runtime import delegate_partitions, make_interpreter

VARIANTS = ("fp32", "fp16", "int8")
OPTIONAL = ("int8-mixed",)  # timed too when the run has it (`steeldefect export RUN --variants int8-mixed`)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--threads", type=int, nargs="+", default=[os.cpu_count() or 1])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the variants")
    parser.add_argument("--runs", type=int, default=30, help="timed invokes per model per round")
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)

    flags = cpu_flags()
    simd = [flag for flag in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm") if flag in flags]
    print(f"cpu:       {cpu_model()} ({platform.machine()}), {os.cpu_count()} logical cores")
    print(f"simd:      {' '.join(simd) or 'none found'}")
    print(f"int8 dot:  {', '.join(int8_features()) or 'none (no VNNI / AMX / dotprod: expect int8 ~ fp32 speed)'}")
    print(f"protocol:  batch 1, {args.warmup} warm-up invokes, {args.rounds} interleaved rounds x {args.runs} timed invokes")
    print()

    summary = load_summary(args.run)
    names = [name for name, entry in summary["backbones"].items() if entry.get("status") == "done"]
    if not names:
        print(f"{args.run}: no trained backbone with exported models", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    header = f"{'backbone':<20} {'threads':>7} " + " ".join(f"{v + ' ms':>10}" for v in VARIANTS)
    header += f" {'mixed ms':>10} {'fp16/fp32':>10} {'int8/fp32':>10} {'mixed/fp32':>10}  partitions"
    print(header)
    print("-" * len(header))
    for name in names:
        paths = {variant: fold_model_path(args.run, name, 0, variant) for variant in VARIANTS}
        missing = [str(path) for path in paths.values() if not path.is_file()]
        optional = {variant: fold_model_path(args.run, name, 0, variant) for variant in OPTIONAL}
        paths |= {variant: path for variant, path in optional.items() if path.is_file()}
        if missing:
            print(f"{name:<20} missing: {', '.join(missing)} (run `steeldefect export {args.run}`)")
            continue
        for threads in args.threads:
            interpreters = {variant: make_interpreter(path, threads) for variant, path in paths.items()}
            height, width = interpreters["fp32"].get_input_details()[0]["shape"][1:3]
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            medians: dict[str, list[float]] = {variant: [] for variant in paths}
            for round_index in range(args.rounds):
                for variant in paths:
                    result = measure_latency(
                        interpreters[variant], image, warmup=args.warmup if round_index == 0 else 2, runs=args.runs
                    )
                    medians[variant].append(result["latency_ms_median"])
            median = {variant: float(np.median(values)) for variant, values in medians.items()}
            partitions = ",".join(str(delegate_partitions(interpreters[v])) for v in paths)
            has_mixed = "int8-mixed" in median
            mixed_ms = f"{median['int8-mixed']:>10.2f}" if has_mixed else f"{'-':>10}"
            mixed = f"{median['int8-mixed'] / median['fp32']:>10.2f}" if has_mixed else f"{'-':>10}"
            print(
                f"{name:<20} {threads:>7} "
                + " ".join(f"{median[v]:>10.2f}" for v in VARIANTS)
                + f" {mixed_ms} {median['fp16'] / median['fp32']:>10.2f} {median['int8'] / median['fp32']:>10.2f} {mixed}  {partitions}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
