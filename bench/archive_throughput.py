"""Scoring an image archive: today's `predict` loop vs the local engine vs the Ray engine, side by side.

Usage (from the repository root)::

    python bench/archive_throughput.py [--run runs/neu-pooled] [--count 20000] [--local 2x1 1x2] [--ray 1 2]

The archive is the NEU JPEGs listed again and again in a manifest up to ``--count`` entries, so that
every image is read and decoded from disk each time (the page cache keeps the 1,800 files in memory:
this measures decode + inference, not a disk). The model is the run's deployable int8 model. Every arm
scores the same manifest into a fresh output; the arms run one after another in one process tree,
and each reports images/s, its ratio to today's loop, and the resident memory of the process and its
children (Ray's workers) sampled every 0.5 s: first/max/last after the first 10 % of the run. All
arms must give the same class and probability for every image. Prints a table and saves JSON (CPU
model, int8 flags, threads, versions, git commit) to ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from steeldefect import batch
from steeldefect.cpuinfo import cpu_flags, cpu_model, int8_features
from steeldefect.files import write_json
from steeldefect.predict import predict_paths
from steeldefect.runfolder import deployable_model, source_revision

DEFAULT_RUN = Path("runs/neu-pooled")
DEFAULT_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "NEU-DET" / "IMAGES"


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and every descendant (Ray's raylet and workers), from /proc."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children[ppid].append(int(entry))
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss[int(entry)] = int(line.split()[1]) * 1024
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        total += rss.get(current, 0)
        stack.extend(children.get(current, []))
    return total


class RssSampler:
    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), tree_rss_bytes(os.getpid())))
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        """MiB after the first 10 % of the run (start-up excluded): first, max, last."""
        if not self.samples:
            return {}
        start, end = self.samples[0][0], self.samples[-1][0]
        steady = [rss for t, rss in self.samples if t >= start + 0.1 * (end - start)] or [self.samples[-1][1]]
        mib = 2**20
        return {"first_mib": round(steady[0] / mib, 1), "max_mib": round(max(steady) / mib, 1),
                "last_mib": round(steady[-1] / mib, 1), "samples": len(self.samples)}


def read_results(out: Path) -> collections.Counter:
    import pyarrow.parquet as pq

    table = pq.read_table(out, columns=["path", "class", "probability", "error"])
    return collections.Counter(
        (p, c, round(prob, 6) if prob is not None else None, e)
        for p, c, prob, e in zip(*(table.column(name).to_pylist() for name in ("path", "class", "probability", "error")))
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN, help="run folder whose deployable int8 model is used")
    parser.add_argument("--model", type=Path, default=None, help="a .tflite model instead of the run's")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of JPEGs (NEU-DET/IMAGES)")
    parser.add_argument("--count", type=int, default=20000, help="manifest entries (images scored per arm)")
    parser.add_argument("--local", nargs="*", default=["2x1", "1x2"],
                        help="local-engine arms as WORKERSxTHREADS (interpreters x threads each)")
    parser.add_argument("--ray", nargs="*", type=int, default=[1, 2], help="Ray arms: number of actors")
    parser.add_argument("--no-baseline", action="store_true", help="skip today's predict loop")
    parser.add_argument("--batch-size", type=int, default=batch.DEFAULT_BATCH_SIZE)
    parser.add_argument("--out", type=Path, default=Path("bench/results/archive_throughput.json"))
    args = parser.parse_args(argv)

    model = args.model or deployable_model(args.run, "int8")
    jpegs = sorted(args.images.glob("*.jpg"))
    if not jpegs:
        print(f"{args.images}: no JPEGs", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="archive-bench-"))
    manifest = work / "archive.txt"
    entries = [str(jpegs[i % len(jpegs)]) for i in range(args.count)]
    manifest.write_text("\n".join(entries) + "\n")
    cores = os.cpu_count()
    print(f"cpu:      {cpu_model()} ({platform.machine()}), {cores} logical cores; "
          f"int8 dot: {', '.join(int8_features()) or 'none'}")
    print(f"model:    {model}")
    print(f"archive:  {args.count} manifest entries over {len(jpegs)} JPEGs in {args.images}")
    print()

    arms: list[dict] = []
    reference: collections.Counter | None = None

    def record(name: str, seconds: float, rss: RssSampler, results: collections.Counter, **extra) -> None:
        nonlocal reference
        if reference is None:
            reference = results
        row = {"arm": name, "images": args.count, "seconds": round(seconds, 2),
               "images_per_second": round(args.count / seconds, 1), "rss": rss.summary(),
               "identical_predictions": results == reference, **extra}
        arms.append(row)
        base = arms[0]["images_per_second"]
        print(f"{name:<24} {row['images_per_second']:>8.1f} img/s  x{row['images_per_second'] / base:5.2f}  "
              f"{seconds:7.1f} s  RSS {row['rss'].get('first_mib')}->{row['rss'].get('max_mib')}"
              f"->{row['rss'].get('last_mib')} MiB  identical={row['identical_predictions']}", flush=True)

    if not args.no_baseline:
        with RssSampler() as rss:
            start = time.perf_counter()
            predictions = predict_paths(model, [manifest.parent / e for e in entries], threads=None)
            seconds = time.perf_counter() - start
        results = collections.Counter((str(p.path), p.top[0][0] if p.top else None,
                                       round(p.top[0][1], 6) if p.top else None, p.error) for p in predictions)
        del predictions
        record(f"today predict_paths ({cores}t)", seconds, rss, results, workers=1, threads=cores)

    for spec in args.local:
        workers, threads = (int(v) for v in spec.lower().split("x"))
        out = work / f"local-{spec}.parquet"
        with RssSampler() as rss:
            result = batch.score_archive(model, [manifest], out, workers=workers, threads=threads,
                                         batch_size=args.batch_size)
        record(f"local {workers}x{threads}", result.seconds, rss, read_results(out), workers=workers, threads=threads)

    for actors in args.ray:
        out = work / f"ray-{actors}.parquet"
        with RssSampler() as rss:
            result = batch.score_archive_ray(model, [manifest], out, actors=actors, threads=1,
                                             batch_size=args.batch_size, num_cpus=cores)
        record(f"ray {actors} actor(s) x1t", result.seconds, rss, read_results(out), actors=actors, threads=1,
               ray=result.details)

    def package(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    report = {
        "bench": "archive_throughput",
        "command": "python bench/archive_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu_model": cpu_model(),
        "cpu_flags_int8": int8_features(),
        "cpu_flags_simd": sorted(f for f in cpu_flags() if f in {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni"}),
        "logical_cores": cores,
        "model": str(model),
        "count": args.count,
        "distinct_images": len(jpegs),
        "batch_size": args.batch_size,
        "arms": arms,
        "versions": {name: package(name) for name in ("steeldefect", "ai-edge-litert", "pillow", "numpy", "pyarrow",
                                                      "ray")} | {"python": platform.python_version()},
        "git_commit": source_revision(),
    }
    write_json(args.out, report)
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nsaved {args.out}")
    return 0 if all(arm["identical_predictions"] for arm in arms) else 1


if __name__ == "__main__":
    raise SystemExit(main())
