"""How much the decoded-image cache saves: load the real NEU images twice into a fresh cache.

Figures: docs/results.md, "Data cache" (and docs/data.md, "The image cache").

Usage (from the repository root)::

    PYTHONPATH=src python bench/data_cache.py [NEU-DET folder] [--size 224] [--out bench/results/data_cache.json]

The first load decodes, resizes and writes the cache; the second only hashes the files and maps the
cached array. Both are timed in the same run, on the same machine, so the ratio is like for like. A
cache hit maps the file lazily, so each load is also timed together with one full read of every pixel
(the fair figure when every image is used), and the second load is repeated in a fresh process, which
is what a resumed run sees.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import benchio
from steeldefect.core.cpuinfo import cpu_model
from steeldefect.data.dataset import scan_dataset
from steeldefect.data.loading import load_images

DEFAULT_NEU_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "NEU-DET"

_CHILD = """
import sys, time
import numpy as np
from steeldefect.data.dataset import scan_dataset
from steeldefect.data.loading import load_images
root, size, cache_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dataset = scan_dataset(root)
started = time.perf_counter()
_, images = load_images(dataset, image_size=(size, size), cache_dir=cache_dir, progress=False)
loaded = time.perf_counter() - started
np.add.reduce(images.reshape(-1), dtype=np.uint64)
print(loaded, time.perf_counter() - started)
"""


def _read_every_pixel(images: np.ndarray) -> float:
    started = time.perf_counter()
    np.add.reduce(images.reshape(-1), dtype=np.uint64)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, default=DEFAULT_NEU_DIR, help=f"default: {DEFAULT_NEU_DIR}")
    parser.add_argument("--size", type=int, default=224, help="square image size (default 224)")
    parser.add_argument("--out", type=Path, default=benchio.RESULTS_DIR / "data_cache.json", help="results JSON file")
    args = parser.parse_args(argv)
    image_size = (args.size, args.size)

    started = time.perf_counter()
    dataset = scan_dataset(args.root)
    scan_seconds = time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix="steeldefect-bench-") as cache_dir:
        started = time.perf_counter()
        _, first = load_images(dataset, image_size=image_size, cache_dir=cache_dir, progress=False)
        first_seconds = time.perf_counter() - started
        first_read = _read_every_pixel(first)
        shape, dtype, first_digest = first.shape, first.dtype, hashlib.sha256(first.tobytes()).hexdigest()
        # Released before the second load, as a resumed run in a new process would not hold it.
        del first

        started = time.perf_counter()
        _, second = load_images(dataset, image_size=image_size, cache_dir=cache_dir, progress=False)
        second_seconds = time.perf_counter() - started
        second_read = _read_every_pixel(second)
        same = hashlib.sha256(second.tobytes()).hexdigest() == first_digest
        del second

        child = subprocess.run(
            [sys.executable, "-c", _CHILD, str(dataset.root), str(args.size), cache_dir],
            check=True,
            capture_output=True,
            text=True,
        )
        child_load, child_total = (float(v) for v in child.stdout.split()[-2:])
        cache_bytes = sum(path.stat().st_size for path in Path(cache_dir).rglob("*") if path.is_file())

    if not same:
        print("error: the cached array differs from the decoded one", file=sys.stderr)
        return 1

    first_total = first_seconds + first_read
    second_total = second_seconds + second_read
    results = {
        "data": {"root": str(dataset.root), "images": len(dataset), "layout": dataset.layout},
        "array": {
            "shape": list(shape),
            "dtype": str(dtype),
            "cache_mib": cache_bytes / 2**20,
            "identical_on_reload": same,
        },
        "scan_s": scan_seconds,
        # Seconds: "load" alone, and "load_and_read" = load + one full read of every pixel.
        "first_load_decode_and_cache": {"load_s": first_seconds, "load_and_read_s": first_total},
        "second_load_same_process": {"load_s": second_seconds, "load_and_read_s": second_total},
        "second_load_new_process": {"load_s": child_load, "load_and_read_s": child_total},
        "speedup": {
            "same_process_load": first_seconds / second_seconds,
            "same_process_load_and_read": first_total / second_total,
            "new_process_load": first_seconds / child_load,
            "new_process_load_and_read": first_total / child_total,
        },
    }
    print(f"data:         {dataset.root} ({len(dataset)} images, layout {dataset.layout})")
    print(f"array:        {shape} {dtype}, cache on disk {cache_bytes / 2**20:.1f} MiB, identical on reload")
    print(f"cpu:          {cpu_model()} ({platform.machine()}), os.cpu_count() = {os.cpu_count()}")
    print(f"python:       {platform.python_version()}, numpy {np.__version__}")
    print(f"scan:         {scan_seconds:.3f} s")
    print(f"{'':27}{'load':>9}   load + read every pixel")
    print(f"first load (decode+cache)  {first_seconds:7.3f} s  {first_total:7.3f} s")
    print(f"second load, same process  {second_seconds:7.3f} s  {second_total:7.3f} s")
    print(f"second load, new process   {child_load:7.3f} s  {child_total:7.3f} s")
    print(
        f"speed-up:     same process {first_seconds / second_seconds:.1f}x load, "
        f"{first_total / second_total:.1f}x with a full read; "
        f"new process {first_seconds / child_load:.1f}x load, {first_total / child_total:.1f}x with a full read"
    )
    # Decoding runs in one Python thread; the cache read is a memory map.
    benchio.save("data_cache", results, threads=1, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
