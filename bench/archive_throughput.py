"""Scoring an image archive: today's `predict` loop vs the local engine vs the Ray engine, side by side.

Figures: docs/results.md, "Archive throughput".

Usage (from the repository root)::

    python bench/archive_throughput.py [--run runs/neu-pooled] [--count 20000] [--local 2x1 1x2] [--ray 1 2]

The archive is the NEU JPEGs listed again and again in a manifest up to ``--count`` entries, so that
every image is read and decoded from disk each time (the page cache keeps the 1,800 files in memory:
this measures decode + inference, not a disk). The model is the run's deployable int8 model. The
arms (today's ``predict_paths`` loop, local-engine WORKERSxTHREADS settings, Ray with N actors) run
in ``--rounds`` interleaved rounds, each round on its own slice of the manifest, so that a noisy
neighbour on a shared machine slows every arm alike. Ray is started once (its start-up is timed
apart); each Ray arm still pays for starting its actors. Reported per arm: images/s, the ratio to
today's loop (and to the best local arm for Ray), CPU milliseconds per image, identical predictions
to today's loop, and the resident memory sampled every 0.5 s (the process for today's loop, the
local engine with its worker processes; with raylet, object store and actors for Ray; CPU likewise).
On a machine shared with other work, images/s measures the share of the cores each arm got as much
as the arm itself; CPU ms per image does not. Prints a table and saves JSON (CPU model, int8 flags,
threads, versions, git commit) to ``--out``.
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

import benchio
from steeldefect.core.cpuinfo import cpu_flags, cpu_model, int8_features
from steeldefect.core.runfolder import deployable_model, source_revision
from steeldefect.deploy import batch, batch_ray
from steeldefect.deploy.predict import predict_paths

DEFAULT_RUN = Path("runs/neu-pooled")
DEFAULT_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "NEU-DET" / "IMAGES"


def tree_usage(pid: int) -> tuple[dict[int, int], dict[int, float]]:
    """Resident bytes and CPU seconds so far of ``pid`` and every descendant (worker processes, Ray's
    raylet and actors), from /proc."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    rss: dict[int, int] = {}
    cpu: dict[int, float] = {}
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        children[int(fields[1])].append(int(entry))
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss[int(entry)] = int(line.split()[1]) * 1024
    tree_rss, stack, tree_cpu = {}, [pid], {}
    while stack:
        current = stack.pop()
        tree_rss[current] = rss.get(current, 0)
        tree_cpu[current] = cpu.get(current, 0.0)
        stack.extend(children.get(current, []))
    return tree_rss, tree_cpu


class RssSampler:
    """Resident memory and CPU time every ``interval`` s of this process and its children: all of
    them (``tree``, for Ray: raylet, object store, actors) or only those started during the arm
    (worker processes; an idle Ray cluster started before is not the arm's)."""

    def __init__(self, tree: bool = False, interval: float = 0.5) -> None:
        self.tree, self.interval, self.samples = tree, interval, []
        self.cpu_start: dict[int, float] = {}
        self.cpu_seen: dict[int, float] = {}
        self.before: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._run_once()
            self._stop.wait(self.interval)

    def _run_once(self) -> None:
        rss_by_pid, cpu = tree_usage(os.getpid())
        if not self.samples:
            self.before = set(cpu) - {os.getpid()}
        if not self.tree:  # an idle Ray cluster started before the arm is not the arm's
            cpu = {pid: seconds for pid, seconds in cpu.items() if pid not in self.before}
        for pid, seconds in cpu.items():
            self.cpu_start.setdefault(pid, seconds if not self.samples else 0.0)
            self.cpu_seen[pid] = max(self.cpu_seen.get(pid, 0.0), seconds)
        self.samples.append((time.perf_counter(), sum(rss_by_pid.get(pid, 0) for pid in cpu)))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._run_once()

    def cpu_seconds(self) -> float:
        """CPU seconds used by the process and its children while sampling (a child that lived less
        than one interval between samples is missed)."""
        return sum(self.cpu_seen[pid] - self.cpu_start.get(pid, 0.0) for pid in self.cpu_seen)

    def summary(self) -> dict:
        """MiB after the first 10 % of the run (start-up excluded): first, max, last."""
        if not self.samples:
            return {}
        start, end = self.samples[0][0], self.samples[-1][0]
        steady = [rss for t, rss in self.samples if t >= start + 0.1 * (end - start)] or [self.samples[-1][1]]
        mib = 2**20
        return {
            "first_mib": round(steady[0] / mib, 1),
            "max_mib": round(max(steady) / mib, 1),
            "last_mib": round(steady[-1] / mib, 1),
            "samples": len(self.samples),
        }


def measure_components(model: Path, jpegs: list[Path]) -> dict:
    """CPU milliseconds per image of the two parts of the work, each alone on one thread: what the
    engines can overlap (decoding) and what they cannot avoid (inference)."""
    from steeldefect.data.decode import read_image
    from steeldefect.runtime.modelfile import Classifier

    classifier = Classifier(model, 1)
    start = time.thread_time()
    images = [read_image(path, classifier.info.input_size) for path in jpegs]
    decode = (time.thread_time() - start) / len(jpegs)
    for image in images[:10]:
        classifier.probabilities(image[None])
    start = time.thread_time()
    for image in images:
        classifier.probabilities(image[None])
    invoke = (time.thread_time() - start) / len(images)
    return {"images": len(jpegs), "decode_cpu_ms": round(1000 * decode, 3), "invoke_cpu_ms": round(1000 * invoke, 3)}


def read_results(out: Path) -> collections.Counter:
    import pyarrow.parquet as pq

    columns = ("path", "class", "probability", "error")
    table = pq.read_table(out, columns=list(columns))
    return collections.Counter(
        (p, c, round(prob, 6) if prob is not None else None, e)
        for p, c, prob, e in zip(*(table.column(name).to_pylist() for name in columns))
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN, help="run folder whose deployable int8 model is used")
    parser.add_argument("--model", type=Path, default=None, help="a .tflite model instead of the run's")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of JPEGs (NEU-DET/IMAGES)")
    parser.add_argument("--count", type=int, default=20000, help="manifest entries (images scored per arm)")
    parser.add_argument(
        "--local",
        nargs="*",
        default=["2x1", "1x2"],
        help="local-engine arms as WORKERSxTHREADS (interpreters x threads each)",
    )
    parser.add_argument("--ray", nargs="*", type=int, default=[1, 2], help="Ray arms: number of actors")
    parser.add_argument("--no-baseline", action="store_true", help="skip today's predict loop")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"images per batch (default: each engine's own, {batch.DEFAULT_BATCH_SIZE} local, "
        f"{batch_ray.DEFAULT_RAY_BATCH_SIZE} ray)",
    )
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds over the arms")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/archive_throughput.json"))
    args = parser.parse_args(argv)

    model = args.model or deployable_model(args.run, "int8")
    sizes = {} if args.batch_size is None else {"batch_size": args.batch_size}  # else each engine's default
    jpegs = sorted(args.images.glob("*.jpg"))
    if not jpegs:
        print(f"{args.images}: no JPEGs", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="archive-bench-"))
    manifest = work / "archive.txt"
    entries = [str(jpegs[i % len(jpegs)]) for i in range(args.count)]
    manifest.write_text("\n".join(entries) + "\n")
    cores = os.cpu_count()
    print(
        f"cpu:      {cpu_model()} ({platform.machine()}), {cores} logical cores; "
        f"int8 dot: {', '.join(int8_features()) or 'none'}"
    )
    print(f"model:    {model}")
    print(f"archive:  {args.count} manifest entries over {len(jpegs)} JPEGs in {args.images}")
    print()

    # Warm the page cache so the first arm does not pay for the disk alone.
    for path in jpegs:
        path.read_bytes()
    components = measure_components(model, jpegs[:: max(1, len(jpegs) // 300)])
    print(
        f"per image, CPU time of one thread over {components['images']} JPEGs: decode+resize "
        f"{components['decode_cpu_ms']:.2f} ms, int8 invoke (1 thread) {components['invoke_cpu_ms']:.2f} ms\n"
    )
    arm_specs: list[tuple[str, dict]] = []
    if not args.no_baseline:
        arm_specs.append((f"today predict_paths ({cores}t)", {"kind": "today", "threads": cores}))
    for spec in args.local:
        workers, threads = (int(v) for v in spec.lower().split("x"))
        arm_specs.append((f"local {workers}x{threads}", {"kind": "local", "workers": workers, "threads": threads}))
    ray_start = None
    if args.ray:
        import ray

        start = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - start
        for actors in args.ray:
            arm_specs.append((f"ray {actors} actor(s) x1t", {"kind": "ray", "actors": actors, "threads": 1}))

    # Interleaved rounds: each round runs every arm on its own slice of the manifest, so a noisy
    # neighbour on this shared machine slows every arm alike and the ratios stay fair.
    per_round = [args.count // args.rounds + (1 if r < args.count % args.rounds else 0) for r in range(args.rounds)]
    totals = {
        name: {"seconds": 0.0, "cpu": 0.0, "images": 0, "results": collections.Counter(), "rss": []}
        for name, _ in arm_specs
    }
    offset = 0
    for round_index, n in enumerate(per_round):
        manifest = work / f"round{round_index}.txt"
        round_entries = entries[offset : offset + n]
        offset += n
        manifest.write_text("\n".join(round_entries) + "\n")
        for name, spec in arm_specs:
            out = work / f"{name.split()[0]}-{round_index}-{len(totals[name]['rss'])}.parquet"
            with RssSampler(tree=spec["kind"] == "ray") as rss:
                if spec["kind"] == "today":
                    start = time.perf_counter()
                    predictions = predict_paths(model, [Path(e) for e in round_entries], threads=None)
                    seconds = time.perf_counter() - start
                    results = collections.Counter(
                        (str(p.path), p.top[0][0] if p.top else None, round(p.top[0][1], 6) if p.top else None, p.error)
                        for p in predictions
                    )
                    del predictions
                elif spec["kind"] == "local":
                    result = batch.score_archive(
                        model,
                        [manifest],
                        out,
                        workers=spec["workers"],
                        threads=spec["threads"],
                        **sizes,
                    )
                    seconds, results = result.seconds, read_results(out)
                else:
                    result = batch_ray.score_archive_ray(
                        model, [manifest], out, actors=spec["actors"], threads=1, **sizes
                    )
                    seconds, results = result.seconds, read_results(out)
            out.unlink(missing_ok=True)
            total = totals[name]
            total["seconds"] += seconds
            total["cpu"] += rss.cpu_seconds()
            total["images"] += n
            total["results"] += results
            total["rss"].append(rss.summary())
            print(
                f"  round {round_index + 1}/{args.rounds} {name:<26} {n / seconds:8.1f} img/s "
                f"{1000 * rss.cpu_seconds() / n:6.2f} CPU ms/img  RSS max {total['rss'][-1].get('max_mib')} MiB",
                flush=True,
            )
    # What a Ray arm pays once per run, whatever the archive's size (the actors' processes start,
    # import Ray Data and build their interpreters; the driver plans the job): the same arm on one
    # image per actor, so that an arm's CPU ms per image splits into start-up and per-image work.
    ray_fixed = {}
    for name, spec in arm_specs:
        if spec["kind"] != "ray":
            continue
        manifest = work / "tiny.txt"
        manifest.write_text("\n".join(entries[: spec["actors"]]) + "\n")
        out = work / "tiny.parquet"
        with RssSampler(tree=True) as rss:
            result = batch_ray.score_archive_ray(model, [manifest], out, actors=spec["actors"], threads=1, **sizes)
        out.unlink(missing_ok=True)
        ray_fixed[name] = {"seconds": round(result.seconds, 2), "cpu_seconds": round(rss.cpu_seconds(), 2)}
        print(f"  {name}: one run on {spec['actors']} image(s): {result.seconds:.1f} s, {rss.cpu_seconds():.2f} CPU s")
    if args.ray:
        ray.shutdown()

    print()
    reference = totals[arm_specs[0][0]]["results"]
    base = totals[arm_specs[0][0]]["images"] / totals[arm_specs[0][0]]["seconds"]
    arms = []
    for name, spec in arm_specs:
        total = totals[name]
        rate = total["images"] / total["seconds"]
        row = {
            "arm": name,
            **spec,
            "images": total["images"],
            "seconds": round(total["seconds"], 2),
            "images_per_second": round(rate, 1),
            "ratio_to_today": round(rate / base, 3),
            "cpu_ms_per_image": round(1000 * total["cpu"] / total["images"], 3),
            "identical_predictions": total["results"] == reference,
            "rss_mib_first_max_last_per_round": [
                [r.get("first_mib"), r.get("max_mib"), r.get("last_mib")] for r in total["rss"]
            ],
        }
        arms.append(row)
        rss_all = [value for r in total["rss"] for value in (r.get("first_mib"), r.get("last_mib")) if value]
        print(
            f"{name:<28} {rate:8.1f} img/s  x{rate / base:5.2f} of today  {total['seconds']:7.1f} s  "
            f"{row['cpu_ms_per_image']:5.2f} CPU ms/img  "
            f"RSS {min(rss_all, default=0):.0f}..{max(rss_all, default=0):.0f} MiB  "
            f"identical={row['identical_predictions']}",
            flush=True,
        )
    local_rates = [a["images_per_second"] for a in arms if a["kind"] == "local"]
    for arm in arms:
        if arm["kind"] == "ray" and local_rates:
            arm["ratio_to_best_local"] = round(arm["images_per_second"] / max(local_rates), 3)
            print(f"{arm['arm']:<28} x{arm['ratio_to_best_local']:.2f} of the best local arm")
    if ray_start is not None:
        print(f"ray start-up (ray.init, not in the arms' times): {ray_start:.1f} s")
    for arm in arms:
        fixed = ray_fixed.get(arm["arm"])
        if fixed:
            per_run = 1000 * fixed["cpu_seconds"] * args.rounds / arm["images"]
            arm["run_start"] = fixed | {"cpu_ms_per_image_in_this_bench": round(per_run, 3)}
            print(
                f"{arm['arm']:<28} of its {arm['cpu_ms_per_image']:.2f} CPU ms/img, {per_run:.2f} are the start of "
                f"each run ({fixed['cpu_seconds']:.2f} CPU s, {fixed['seconds']:.1f} s x {args.rounds} rounds)"
            )

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
        "batch_size": args.batch_size or {"local": batch.DEFAULT_BATCH_SIZE, "ray": batch_ray.DEFAULT_RAY_BATCH_SIZE},
        "rounds": args.rounds,
        "components": components,
        "ray_init_seconds": None if ray_start is None else round(ray_start, 2),
        "arms": arms,
        "versions": {
            name: package(name) for name in ("steeldefect", "ai-edge-litert", "pillow", "numpy", "pyarrow", "ray")
        }
        | {"python": platform.python_version()},
        "git_commit": source_revision(),
    }
    benchio.save("archive_throughput", report, out=args.out)
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nsaved {args.out}")
    return 0 if all(arm["identical_predictions"] for arm in arms) else 1


if __name__ == "__main__":
    raise SystemExit(main())
