"""LiteRT vs ONNX Runtime vs OpenVINO on the same deploy model, fp32 and int8, side by side in one run.

Usage (from the repository root; the run must have been exported with
``steeldefect export RUN --variants fp32 int8 --formats tflite onnx openvino``)::

    python bench/runtimes.py --run RUN [--count 2000] [--runs 200] [--rounds 3]

Three measurements, each over the six models (the final model of the run's deployed backbone):

1. per-image latency (batch 1, one invoke, input prepared beforehand, as `evaluate` times it) at 1
   and at 2 threads, median of ``--runs`` invokes, in ``--rounds`` interleaved rounds;
2. CPU milliseconds per image split into decode (JPEG -> 224x224 RGB) and inference (1 thread),
   measured with each thread's CPU clock, so a busy neighbour does not inflate them;
3. archive throughput with the local engine (`predict --out`, 2 worker processes x 1 thread) for
   every model, beside today's `predict` loop (``predict_paths`` on the LiteRT int8, as
   bench/archive_throughput.py runs it), on the same manifest slices, interleaved.

Then each runtime's own profiler names the kernels that bound its int8 model: ONNX Runtime's
``enable_profiling`` trace and OpenVINO's ``PERF_COUNT`` per-node counters (LiteRT's Python
interpreter has no op profiler; its int8 split is in bench/int8_stages.py). Prints a table and
saves JSON with the CPU model, int8 dot-product flags (VNNI or not) and thread counts.

Figures: docs/formats.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import benchio
from archive_throughput import DEFAULT_IMAGES, RssSampler, read_results
from steeldefect.core import runfolder
from steeldefect.core.cpuinfo import cpu_model, int8_features
from steeldefect.deploy import batch
from steeldefect.deploy.predict import predict_paths
from steeldefect.runtime.backends import OnnxBackend, OpenVinoBackend, open_backend, size_on_disk

FORMATS = (("tflite", "LiteRT"), ("onnx", "ONNX Runtime"), ("openvino", "OpenVINO"))
VARIANTS = ("fp32", "int8")


def model_paths(run: Path, fold: int | str = runfolder.FINAL) -> dict[str, Path]:
    backbone = runfolder.load_summary(run).get("deploy", {}).get("backbone") or next(
        iter(runfolder.load_summary(run)["backbones"])
    )
    paths = {}
    for fmt, runtime in FORMATS:
        for variant in VARIANTS:
            path = runfolder.fold_model_path(run, backbone, fold, variant, fmt)
            if not path.is_file():
                raise SystemExit(f"{path}: missing (export the run with --variants fp32 int8 --formats ...)")
            paths[f"{runtime} {variant}"] = path
    return paths


def latency_rounds(paths: dict[str, Path], image: np.ndarray, runs: int, rounds: int) -> dict[str, dict]:
    # Imported here, not at the top: the archive engine's spawned workers import this script as
    # their main module, and steeldefect.study (scikit-learn, Matplotlib) costs each of them 1.4 s.
    from steeldefect.study.evaluate import measure_latency

    results: dict[str, dict[int, list[float]]] = {name: {1: [], 2: []} for name in paths}
    backends = {(name, t): open_backend(path, t) for name, path in paths.items() for t in (1, 2)}
    for round_index in range(rounds):
        for (name, threads), backend in backends.items():
            timing = measure_latency(backend, image, warmup=10, runs=runs)
            results[name][threads].append(timing["latency_ms_median"])
        print(f"  latency round {round_index + 1}/{rounds} done", flush=True)
    return {
        name: {f"{t}t_ms": round(float(np.median(values)), 3) for t, values in by_threads.items()}
        for name, by_threads in results.items()
    }


def components(paths: dict[str, Path], jpegs: list[Path]) -> dict[str, dict]:
    """CPU ms per image, one thread: decode+resize (same for every model) and inference."""
    from steeldefect.data.decode import read_image

    start = time.thread_time()
    images = [read_image(path, (224, 224)) for path in jpegs]
    decode = 1000 * (time.thread_time() - start) / len(jpegs)
    out = {}
    for name, path in paths.items():
        backend = open_backend(path, 1)
        for image in images[:10]:
            backend.run_one(image)
        start = time.thread_time()
        for image in images:
            backend.run_one(image)
        out[name] = {
            "decode_cpu_ms": round(decode, 3),
            "inference_cpu_ms": round(1000 * (time.thread_time() - start) / len(images), 3),
        }
    return out


def onnx_profile(path: Path, image: np.ndarray, runs: int = 50) -> list[dict]:
    """ONNX Runtime's own trace (1 thread): total microseconds per op type, largest first."""
    folder = Path(tempfile.mkdtemp(prefix="ort-profile-"))
    backend = OnnxBackend(path, 1, profile=str(folder / "ort"))
    prepared = backend.prepare(image)
    for _ in range(runs):
        backend.invoke(prepared)
    trace = Path(backend.session.end_profiling())
    events = json.loads(trace.read_text())
    totals: dict[str, float] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            totals[event.get("args", {}).get("op_name", "?")] += event.get("dur", 0)
    shutil.rmtree(folder, ignore_errors=True)
    total = sum(totals.values()) or 1
    return [
        {"op": op, "ms_per_image": round(us / runs / 1000, 3), "share": round(us / total, 3)}
        for op, us in sorted(totals.items(), key=lambda kv: -kv[1])[:8]
    ]


def openvino_profile(path: Path, image: np.ndarray, runs: int = 50) -> list[dict]:
    """OpenVINO's PERF_COUNT counters (1 thread): CPU time per (node type, kernel), largest first."""
    backend = OpenVinoBackend(path, 1, profile=True)
    prepared = backend.prepare(image)
    totals: dict[tuple[str, str], float] = collections.Counter()
    for _ in range(5):  # warm-up: the first invokes compile and pack kernels
        backend.invoke(prepared)
    for _ in range(runs):
        backend.invoke(prepared)
        for info in backend.request.profiling_info:
            totals[info.node_type, info.exec_type] += info.cpu_time.total_seconds() * 1e6
    total = sum(totals.values()) or 1
    return [
        {"op": f"{node} [{kernel}]", "ms_per_image": round(us / runs / 1000, 3), "share": round(us / total, 3)}
        for (node, kernel), us in sorted(totals.items(), key=lambda kv: -kv[1])[:8]
    ]


def archive(paths: dict[str, Path], jpegs: list[Path], count: int, rounds: int, work: Path) -> dict[str, dict]:
    entries = [str(jpegs[i % len(jpegs)]) for i in range(count)]
    arms = [("today predict (LiteRT int8)", "today", paths["LiteRT int8"])]
    arms += [(f"local 2x1 {name}", "local", path) for name, path in paths.items()]
    totals = {name: {"seconds": 0.0, "cpu": 0.0, "images": 0, "results": collections.Counter()} for name, *_ in arms}
    per_round = count // rounds
    for round_index in range(rounds):
        chunk = entries[round_index * per_round : (round_index + 1) * per_round]
        manifest = work / f"round{round_index}.txt"
        manifest.write_text("\n".join(chunk) + "\n")
        for name, kind, path in arms:
            out = work / f"out-{round_index}.parquet"
            with RssSampler() as usage:
                if kind == "today":
                    start = time.perf_counter()
                    predictions = predict_paths(path, [Path(e) for e in chunk], threads=None)
                    seconds = time.perf_counter() - start
                    results = collections.Counter(
                        (str(p.path), p.top[0][0] if p.top else None, round(p.top[0][1], 6) if p.top else None, p.error)
                        for p in predictions
                    )
                else:
                    result = batch.score_archive(path, [manifest], out, workers=2, threads=1)
                    seconds, results = result.seconds, read_results(out)
            out.unlink(missing_ok=True)
            total = totals[name]
            total["seconds"] += seconds
            total["cpu"] += usage.cpu_seconds()
            total["images"] += len(chunk)
            total["results"] += results
            print(f"  round {round_index + 1}/{rounds} {name:<36} {len(chunk) / seconds:7.1f} img/s", flush=True)
    base = totals[arms[0][0]]["images"] / totals[arms[0][0]]["seconds"]
    rows = {}
    for name, _, path in arms:
        total = totals[name]
        rate = total["images"] / total["seconds"]
        classes = collections.Counter(c for (_, c, _, _), n in total["results"].items() for _ in range(n))
        rows[name] = {
            "model": str(path),
            "images": total["images"],
            "images_per_second": round(rate, 1),
            "ratio_to_today": round(rate / base, 3),
            "cpu_ms_per_image": round(1000 * total["cpu"] / total["images"], 3),
            "predicted_classes": dict(classes),
        }
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="run folder exported in every format")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of JPEGs (NEU-DET/IMAGES)")
    parser.add_argument("--count", type=int, default=2000, help="archive images per arm")
    parser.add_argument("--runs", type=int, default=200, help="timed invokes per latency measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (latency and archive)")
    parser.add_argument(
        "--fold", default="final", help="which model: final (the deploy model, with its texture output) or a fold"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON (default bench/results/runtimes.json)")
    args = parser.parse_args(argv)

    paths = model_paths(args.run, runfolder.FINAL if args.fold == "final" else int(args.fold))
    jpegs = sorted(args.images.glob("*.jpg"))
    if not jpegs:
        print(f"{args.images}: no JPEGs", file=sys.stderr)
        return 1
    for path in jpegs:
        path.read_bytes()  # page cache warm: the archive arms measure decode + inference, not the disk
    print(
        f"cpu: {cpu_model()}, {os.cpu_count()} logical cores; int8 dot product: {', '.join(int8_features()) or 'none'}"
    )
    print("(a shared machine: other work ran beside this bench; CPU ms per image is the steadier figure)\n")
    from steeldefect.data.decode import read_image

    image = read_image(jpegs[0], (224, 224))
    latency = latency_rounds(paths, image, args.runs, args.rounds)
    parts = components(paths, jpegs[:: max(1, len(jpegs) // 200)])
    reference = latency["LiteRT fp32"]["1t_ms"]
    print(
        f"\n{'model':<22} {'MiB':>6} {'1 thread':>9} {'2 threads':>9} {'x LiteRT fp32 (1t)':>19} "
        f"{'decode':>7} {'infer':>7} CPU ms"
    )
    for name, path in paths.items():
        row = latency[name]
        row["size_mib"] = round(size_on_disk(path) / 2**20, 2)
        row["ratio_to_litert_fp32_1t"] = round(row["1t_ms"] / reference, 3)
        row |= parts[name]
        print(
            f"{name:<22} {row['size_mib']:6.2f} {row['1t_ms']:9.2f} {row['2t_ms']:9.2f} "
            f"{row['ratio_to_litert_fp32_1t']:19.2f} {row['decode_cpu_ms']:7.2f} {row['inference_cpu_ms']:7.2f}"
        )
    profiles = {
        "ONNX Runtime int8": onnx_profile(paths["ONNX Runtime int8"], image),
        "ONNX Runtime fp32": onnx_profile(paths["ONNX Runtime fp32"], image),
        "OpenVINO int8": openvino_profile(paths["OpenVINO int8"], image),
        "OpenVINO fp32": openvino_profile(paths["OpenVINO fp32"], image),
    }
    for name, top in profiles.items():
        print(
            f"\n{name}, own profiler, 1 thread: "
            + "; ".join(f"{r['op']} {r['ms_per_image']:.2f} ms ({100 * r['share']:.0f}%)" for r in top[:5])
        )
    print()
    work = Path(tempfile.mkdtemp(prefix="runtimes-bench-"))
    try:
        throughput = archive(paths, jpegs, args.count, args.rounds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    for name, row in throughput.items():
        print(
            f"{name:<36} {row['images_per_second']:7.1f} img/s  x{row['ratio_to_today']:.2f} of today  "
            f"{row['cpu_ms_per_image']:.2f} CPU ms/img"
        )
    benchio.save(
        "runtimes",
        {
            "run": str(args.run),
            "models": {name: str(path) for name, path in paths.items()},
            "latency_batch1": latency,
            "profiles_1_thread": profiles,
            "archive_local_2x1": throughput,
            "count": args.count,
            "runs": args.runs,
            "rounds": args.rounds,
        },
        threads=[1, 2],
        out=args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
