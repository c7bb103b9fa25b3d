"""`steeldefect serve` over loopback HTTP against the bare interpreter loop, side by side in one run.

Figures: docs/results.md, "Service throughput"; docs/security.md, "History readers do not slow predictions".

Usage (from the repository root; the serve extra installed)::

    python bench/serve_throughput.py [--model runs/neu-pooled] [--images ../shared/data/NEU-DET/IMAGES]
        [--requests 10000] [--level-requests 1000] [--concurrency 1 4 16] [--workers 2] [--threads 1]

1. Bare loop: one interpreter (all cores) decodes and classifies images one after another, as
   `predict` does. Run over all NEU JPEGs first: its class for each image is what every HTTP answer
   below must say.
2. The real `steeldefect serve` process (audit log on) on a free 127.0.0.1 port: images/s and
   client-side p50/p99 at each concurrency (raw-body POSTs on keep-alive connections), interleaved
   in rounds with the bare loop on the same images (a busy shared machine then slows both alike);
   then concurrency 1 and 4 again with ``--no-audit``, to show what the audit commit costs.
3. Soak: ``--requests`` requests at concurrency 4, every answer checked against the bare loop's class
   for that image, the server's resident memory sampled; SIGKILL right after the last answer, then
   every answered request must be in the audit log.
4. The same soak with ``--bad-fraction`` bad images (truncated JPEG, text, empty) mixed in: each bad
   one must get a 4xx, every good one its correct answer.
5. Before all that, what one audit commit costs alone, without and with ``--audit-fsync``.
6. History readers (``--history-readers``, default 50): predictions at concurrency 4 alone and with
   that many clients reading ``/v1/history?limit=100`` as fast as the server lets them (each honours
   a 503's ``Retry-After``), interleaved in rounds on one server, so the slowdown of predictions
   is read side by side. The readers run in a process of their own (so that they do not share the
   prediction client's GIL) at ``nice +10`` (so that the load generator's own CPU does not count as
   the server's); the server runs at the normal priority. ``--only history`` runs only this part.

The load generator runs on the same machine as the server and takes CPU from it: on a 2-core box
the HTTP figures are a lower bound. Prints and saves (``--out``) every figure with the CPU model, its
int8 flags, the thread settings, library versions and the git commit.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

import benchio
from steeldefect.core.cpuinfo import cpu_flags, cpu_model, int8_features
from steeldefect.core.runfolder import source_revision
from steeldefect.data.decode import decode_image
from steeldefect.runtime.litert import resolve_threads
from steeldefect.runtime.modelfile import Classifier, read_model_info
from steeldefect.serve.service import resolve_model

REPO = Path(__file__).resolve().parents[1]
SIMD = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def installed(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    values = np.asarray(latencies_s) * 1000
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p99_ms": round(float(np.percentile(values, 99)), 3),
        "mean_ms": round(float(values.mean()), 3),
    }


class Bare:
    """`predict`'s loop on one interpreter: decode + one invoke per image, one image after another."""

    def __init__(self, model: Path, threads: int | None) -> None:
        self.info = read_model_info(model)
        self.classifier = Classifier(model, threads, self.info)
        self.threads = resolve_threads(threads)

    def run(self, images: list[bytes]) -> tuple[dict, list[str]]:
        with_decode, invoke_only, classes = [], [], []
        start = time.perf_counter()
        for data in images:
            t0 = time.perf_counter()
            image = decode_image(data, self.info.input_size)
            t1 = time.perf_counter()
            probabilities = self.classifier.probabilities(image[None])[0]
            t2 = time.perf_counter()
            with_decode.append(t2 - t0)
            invoke_only.append(t2 - t1)
            classes.append(self.info.class_names[int(np.argmax(probabilities))])
        wall = time.perf_counter() - start
        return {
            "images": len(images),
            "decode_and_invoke": {"images_per_s": round(len(images) / wall, 2), **percentiles(with_decode)},
            "invoke_only": {"images_per_s": round(len(images) / sum(invoke_only), 2), **percentiles(invoke_only)},
            "_seconds": with_decode,
        }, classes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, model: Path, folder: Path, workers: int, threads: int, audit: bool, queue: int) -> None:
        self.port = free_port()
        self.audit_path = folder / f"audit-{self.port}.sqlite"
        self.log_path = folder / f"serve-{self.port}.log"
        args = [
            sys.executable,
            "-m",
            "steeldefect",
            "serve",
            str(model),
            "--port",
            str(self.port),
            "--workers",
            str(workers),
            "--threads",
            str(threads),
            "--queue",
            str(queue),
        ]
        args += ["--audit", str(self.audit_path)] if audit else ["--no-audit"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        env.pop("STEELDEFECT_TOKEN", None)
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited: {self.log_path.read_text()[-2000:]}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/readyz")
                if connection.getresponse().status == 200:
                    connection.close()
                    return
            except OSError:
                time.sleep(0.3)
        self.kill()
        raise SystemExit("server not ready after 180 s")

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far (all its threads)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(timeout=60)
        self.log.close()


def load(port: int, bodies: list[tuple[int, bytes]], concurrency: int, on_progress=None) -> list[dict]:
    """POST every (image index, body) once, ``concurrency`` keep-alive connections in parallel.

    Returns one record per request: index, status, latency, class and audit id of the answer.
    """
    results: list[dict | None] = [None] * len(bodies)
    next_item = iter(range(len(bodies)))
    lock = threading.Lock()
    done = [0]

    def worker() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                position = next(next_item, None)
            if position is None:
                break
            index, body = bodies[position]
            started = time.perf_counter()
            try:
                connection.request(
                    "POST",
                    "/v1/predict?top_k=1",
                    body=body,
                    headers={"Content-Type": "image/jpeg", "X-Client-Id": f"bench-{position}"},
                )
                response = connection.getresponse()
                payload = json.loads(response.read())
                status = response.status
            except (OSError, http.client.HTTPException, ValueError) as error:
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                payload, status = {"error": f"{type(error).__name__}: {error}"}, 0
            results[position] = {
                "index": index,
                "status": status,
                "seconds": time.perf_counter() - started,
                "class": payload.get("class"),
                "audit_id": payload.get("audit_id"),
                "error": payload.get("error"),
            }
            with lock:
                done[0] += 1
                if on_progress is not None:
                    on_progress(done[0])
        connection.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r for r in results if r is not None]


def level(server: Server, bare: Bare, images: list[bytes], concurrency: int, n: int, seed: int, rounds: int) -> dict:
    """The bare loop and HTTP at ``concurrency`` on the same ``n`` images, interleaved in ``rounds``
    (bare chunk, HTTP chunk, bare chunk, ...) so that a noisy neighbour on a shared machine slows both
    alike; images/s = images / summed time of each side. CPU milliseconds per image (the server
    process's, the bare loop's) do not depend on what else runs on the machine."""
    port = server.port
    rng = np.random.default_rng(seed)
    load(port, [(int(i), images[i]) for i in rng.integers(0, len(images), 4 * concurrency + 20)], concurrency)
    chosen = [int(i) for i in rng.integers(0, len(images), n)]
    bare_seconds, http_seconds, bare_cpu, server_cpu, records, bare_rows = 0.0, 0.0, 0.0, 0.0, [], []
    for chunk in np.array_split(np.arange(n), rounds):
        picked = [chosen[j] for j in chunk]
        start, cpu = time.perf_counter(), time.process_time()
        figures, _ = bare.run([images[i] for i in picked])
        bare_seconds += time.perf_counter() - start
        bare_cpu += time.process_time() - cpu
        bare_rows.append(figures)
        start, cpu = time.perf_counter(), server.cpu_seconds()
        records += load(port, [(i, images[i]) for i in picked], concurrency)
        http_seconds += time.perf_counter() - start
        server_cpu += server.cpu_seconds() - cpu
    errors = sum(r["status"] != 200 for r in records)
    bare_latency = [s for row in bare_rows for s in row.pop("_seconds")]
    row = {
        "concurrency": concurrency,
        "requests": n,
        "rounds": rounds,
        "errors": errors,
        "images_per_s": round(n / http_seconds, 2),
        **percentiles([r["seconds"] for r in records]),
        "server_cpu_ms_per_image": round(1000 * server_cpu / n, 3),
        "bare": {
            "images_per_s": round(n / bare_seconds, 2),
            **percentiles(bare_latency),
            "cpu_ms_per_image": round(1000 * bare_cpu / n, 3),
        },
    }
    row["p99_over_p50"] = round(row["p99_ms"] / row["p50_ms"], 2)
    row["vs_bare"] = round(row["images_per_s"] / row["bare"]["images_per_s"], 3)
    return row


def audit_commit_cost(folder: Path, n: int = 200) -> dict:
    """Milliseconds per one-row commit of the audit log, without and with fsync (``--audit-fsync``):
    what one answer waits for when it is alone (concurrent answers share a commit)."""
    from steeldefect.serve.audit import AuditLog, AuditRow

    row = AuditRow("bench", "0" * 64, 12345, [("crazing", 0.99), ("patches", 0.01)], None, None, "0" * 64, 3.2)
    figures = {}
    for fsync in (False, True):
        audit = AuditLog(folder / f"commit-cost-{fsync}.sqlite", fsync=fsync)
        try:
            for _ in range(10):
                audit.submit([row]).result()
            start = time.perf_counter()
            for _ in range(n):
                audit.submit([row]).result()
            figures["fsync" if fsync else "no_fsync"] = round(1000 * (time.perf_counter() - start) / n, 4)
        finally:
            audit.close()
    return {"ms_per_commit": figures, "commits": n}


def make_bad(kind: int, good: bytes) -> bytes:
    return (good[: len(good) // 3], b"coil 4711 line 3 shift B\n" * 8, b"")[kind % 3]


def soak(server: Server, images: list[bytes], expected: list[str], n: int, bad_fraction: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    bodies: list[tuple[int, bytes]] = []
    for k, i in enumerate(rng.integers(0, len(images), n)):
        bad = rng.random() < bad_fraction
        bodies.append((-1 - k if bad else int(i), make_bad(k, images[i]) if bad else images[i]))
    samples: list[tuple[int, float]] = [(0, server.rss_mib())]
    step = max(1, n // 20)
    started = time.perf_counter()

    def progress(count: int) -> None:
        if count % step == 0:
            samples.append((count, server.rss_mib()))
            rate = count / (time.perf_counter() - started)
            print(
                f"  {count}/{n} requests, {rate:.0f}/s, server RSS {samples[-1][1]:.0f} MiB, "
                f"ETA {(n - count) / rate:.0f} s",
                flush=True,
            )

    records = load(server.port, bodies, 4, progress)
    wall = time.perf_counter() - started
    server.kill(signal.SIGKILL)  # right after the last answer: only committed rows survive
    good = [r for r in records if r["index"] >= 0]
    bad = [r for r in records if r["index"] < 0]
    wrong = sum(r["status"] != 200 or r["class"] != expected[r["index"]] for r in good)
    bad_not_refused = sum(not 400 <= r["status"] < 500 for r in bad)
    answered_ids = sorted(r["audit_id"] for r in good if r["status"] == 200)
    with sqlite3.connect(server.audit_path) as db:
        stored = {row[0] for row in db.execute("SELECT id FROM predictions")}
    missing = sum(audit_id not in stored for audit_id in answered_ids)
    warm = [rss for count, rss in samples if count >= n // 10] or [samples[-1][1]]
    growth = (max(warm) - warm[0]) / warm[0] * 100
    return {
        "requests": n,
        "good": len(good),
        "bad": len(bad),
        "seconds": round(wall, 2),
        "images_per_s": round(n / wall, 2),
        **percentiles([r["seconds"] for r in records]),
        "good_wrong_or_failed": wrong,
        "bad_not_refused_4xx": bad_not_refused,
        "answered": len(answered_ids),
        "answered_missing_from_audit_after_sigkill": missing,
        "audit_rows": len(stored),
        "rss_mib_samples": [[count, round(rss, 1)] for count, rss in samples],
        "rss_growth_after_warmup_percent": round(growth, 2),
    }


def _history_reader_process(port: int, readers: int, rows: int, go, stop, out) -> None:
    """``readers`` threads, each on its own keep-alive connection, reading pages of 100 while ``go`` is
    set; a 503 is honoured (sleep Retry-After). Counts go to ``out`` when ``stop`` is set."""
    os.nice(10)
    counts = {"200": 0, "503": 0, "reconnects": 0, "seconds_200": []}
    lock = threading.Lock()

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while not stop.is_set():
            if not go.wait(0.05):
                continue
            started = time.perf_counter()
            try:
                connection.request("GET", f"/v1/history?after={int(rng.integers(0, rows - 100))}&limit=100")
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):  # the server closes a keep-alive idle for 5 s
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                status = 0
            with lock:
                if status == 200:
                    counts["200"] += 1
                    counts["seconds_200"].append(time.perf_counter() - started)
                else:
                    counts["503" if status == 503 else "reconnects"] += 1
            if status == 503:
                time.sleep(float(response.headers.get("Retry-After", "1")))
        connection.close()

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(readers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put(counts)


def history_readers(
    server: Server, images: list[bytes], n: int, readers: int, rounds: int, seed: int, rows: int = 600
) -> dict:
    """Predictions at concurrency 4 alone vs. with ``readers`` history clients, interleaved in ``rounds``."""
    import multiprocessing

    rng = np.random.default_rng(seed)
    port = server.port
    load(port, [(int(i), images[i]) for i in rng.integers(0, len(images), rows)], 4)  # rows to read, warm-up
    context = multiprocessing.get_context("spawn")
    go, stop, out = context.Event(), context.Event(), context.Queue()
    process = context.Process(target=_history_reader_process, args=(port, readers, rows, go, stop, out))
    process.start()
    seconds = {"alone": 0.0, "with_readers": 0.0}
    latencies: dict[str, list[float]] = {"alone": [], "with_readers": []}
    errors = {"alone": 0, "with_readers": 0}
    try:
        for round_index in range(rounds):
            for case in ("alone", "with_readers") if round_index % 2 == 0 else ("with_readers", "alone"):
                if case == "with_readers":
                    go.set()
                    time.sleep(1.0)  # every reader has a request in flight or is backing off
                picked = [int(i) for i in rng.integers(0, len(images), n // rounds)]
                started = time.perf_counter()
                records = load(port, [(i, images[i]) for i in picked], 4)
                seconds[case] += time.perf_counter() - started
                latencies[case] += [r["seconds"] for r in records]
                errors[case] += sum(r["status"] != 200 for r in records)
                go.clear()
                time.sleep(0.5)  # the readers' last requests drain
    finally:
        stop.set()
        go.set()
        counts = out.get(timeout=120)
        process.join(timeout=60)
    count = (n // rounds) * rounds
    alone = {"images_per_s": round(count / seconds["alone"], 2), **percentiles(latencies["alone"])}
    with_readers = {"images_per_s": round(count / seconds["with_readers"], 2), **percentiles(latencies["with_readers"])}
    reader_seconds = counts.pop("seconds_200")
    return {
        "predictions_per_case": count,
        "rounds": rounds,
        "prediction_concurrency": 4,
        "history_readers": readers,
        "history_page_limit": 100,
        "alone": {**alone, "errors": errors["alone"]},
        "with_readers": {**with_readers, "errors": errors["with_readers"]},
        "throughput_change_percent": round(100 * (with_readers["images_per_s"] / alone["images_per_s"] - 1), 2),
        "p50_change_percent": round(100 * (with_readers["p50_ms"] / alone["p50_ms"] - 1), 2),
        "audit_rows_before": rows,
        "history_answers": {"200": counts["200"], "503": counts["503"], "reconnects": counts["reconnects"]},
        "history_200_latency": percentiles(reader_seconds) if reader_seconds else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "runs" / "neu-pooled", help=".tflite or run folder")
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "NEU-DET" / "IMAGES")
    parser.add_argument("--requests", type=int, default=10_000, help="requests per soak")
    parser.add_argument("--level-requests", type=int, default=1000, help="timed requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="server interpreters")
    parser.add_argument("--threads", type=int, default=1, help="threads per server interpreter")
    parser.add_argument("--bare-threads", type=int, default=0, help="bare loop threads (0 = all cores)")
    parser.add_argument("--queue", type=int, default=32, help="server --queue")
    parser.add_argument("--rounds", type=int, default=10, help="bare/HTTP interleaving rounds per level")
    parser.add_argument("--bad-fraction", type=float, default=0.10)
    parser.add_argument("--history-readers", type=int, default=50, help="concurrent /v1/history clients")
    parser.add_argument("--history-requests", type=int, default=3000, help="predictions per case (alone, readers)")
    parser.add_argument("--only", choices=["all", "history"], default="all", help="'history': only part 6")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "serve_throughput.json")
    args = parser.parse_args(argv)

    model = resolve_model(args.model)
    paths = sorted(args.images.glob("*.jpg"))
    if not paths:
        print(f"{args.images}: no .jpg images", file=sys.stderr)
        return 1
    images = [path.read_bytes() for path in paths]
    flags = cpu_flags()
    machine = {
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "simd": [f for f in SIMD if f in flags],
        "int8_features": int8_features(),
        "server": {"workers": args.workers, "threads_per_interpreter": args.threads},
        "bare_threads": resolve_threads(args.bare_threads or None),
        "server_queue": args.queue,
        "versions": {
            name: installed(name)
            for name in (
                "ai-edge-litert",
                "fastapi",
                "uvicorn",
                "starlette",
                "httptools",
                "uvloop",
                "numpy",
                "pillow",
                "prometheus-client",
            )
        }
        | {"python": platform.python_version()},
        "git": source_revision(),
    }
    print(f"cpu:      {machine['cpu']} ({machine['arch']}), {machine['logical_cores']} logical cores")
    print(
        f"simd:     {' '.join(machine['simd']) or 'none found'}; "
        f"int8 dot: {', '.join(machine['int8_features']) or 'none'}"
    )
    print(f"model:    {model} ({len(images)} NEU JPEGs from {args.images})")
    print(
        f"server:   {args.workers} worker(s) x {args.threads} thread(s), queue {args.queue}; "
        f"bare loop: {machine['bare_threads']} thread(s)"
    )
    print(f"commit:   {machine['git']}")

    result: dict = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": machine,
        "model": str(model),
    }
    bare = Bare(model, args.bare_threads or None)
    bare.run(images[:20])  # warm-up: XNNPACK packs weights on the first invokes
    reference, expected = bare.run(images)  # every image's class: what each HTTP answer must say
    reference.pop("_seconds")
    result["bare_all_images"] = reference
    print(
        f"\nbare loop, all {len(images)} images: "
        f"decode+invoke {reference['decode_and_invoke']['images_per_s']} img/s "
        f"(p50 {reference['decode_and_invoke']['p50_ms']} ms, p99 {reference['decode_and_invoke']['p99_ms']} ms); "
        f"invoke only {reference['invoke_only']['images_per_s']} img/s (p50 {reference['invoke_only']['p50_ms']} ms)"
    )

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        folder = Path(tmp)
        print(f"\nhistory readers: predictions at concurrency 4, alone and with {args.history_readers} readers")
        server = Server(model, folder, args.workers, args.threads, True, args.queue)
        try:
            h = result["history_readers"] = history_readers(
                server, images, args.history_requests, args.history_readers, args.rounds, seed=11
            )
        finally:
            server.kill(signal.SIGTERM)
        print(
            f"  alone {h['alone']['images_per_s']} img/s (p50 {h['alone']['p50_ms']} ms, p99 {h['alone']['p99_ms']} ms)"
            f" | with {h['history_readers']} readers {h['with_readers']['images_per_s']} img/s "
            f"(p50 {h['with_readers']['p50_ms']} ms, p99 {h['with_readers']['p99_ms']} ms) | throughput "
            f"{h['throughput_change_percent']:+}% | history pages answered {h['history_answers']['200']}, "
            f"503 {h['history_answers']['503']}, errors {h['alone']['errors'] + h['with_readers']['errors']}",
            flush=True,
        )
        if args.only == "history":
            args.out.parent.mkdir(parents=True, exist_ok=True)
            benchio.save("serve_throughput", result, out=args.out)
            print(f"\nsaved: {args.out}")
            return 0
        result["audit_commit"] = audit_commit_cost(folder)
        cost = result["audit_commit"]["ms_per_commit"]
        print(f"audit commit, one row, alone: {cost['no_fsync']} ms (default), {cost['fsync']} ms (--audit-fsync)\n")
        result["http"] = {}
        for audit in (True, False):
            server = Server(model, folder, args.workers, args.threads, audit, args.queue)
            try:
                rows = []
                for concurrency in args.concurrency if audit else [c for c in args.concurrency if c <= 4]:
                    row = level(server, bare, images, concurrency, args.level_requests, concurrency, args.rounds)
                    rows.append(row)
                    b = row["bare"]
                    print(
                        f"audit {'on ' if audit else 'off'} c={concurrency:<3} HTTP {row['images_per_s']:>7} img/s "
                        f"p50 {row['p50_ms']:>6} ms p99 {row['p99_ms']:>6} ms (p99/p50 {row['p99_over_p50']:>5}) "
                        f"errors {row['errors']} | bare {b['images_per_s']:>6} img/s p50 {b['p50_ms']:>6} ms "
                        f"p99 {b['p99_ms']:>6} ms | HTTP/bare {row['vs_bare']} | CPU ms/image: server "
                        f"{row['server_cpu_ms_per_image']}, bare {b['cpu_ms_per_image']}",
                        flush=True,
                    )
                result["http"]["audit_on" if audit else "audit_off"] = rows
                result["server_log_start"] = server.log_path.read_text().splitlines()[-1:]
            finally:
                server.kill(signal.SIGTERM)

        for name, fraction in (("soak", 0.0), ("soak_with_bad_images", args.bad_fraction)):
            print(f"\n{name}: {args.requests} requests at concurrency 4, {fraction:.0%} bad images")
            server = Server(model, folder, args.workers, args.threads, True, args.queue)
            try:
                result[name] = soak(server, images, expected, args.requests, fraction, seed=7)
            finally:
                if server.process.poll() is None:
                    server.kill(signal.SIGKILL)
            s = result[name]
            print(
                f"  {s['images_per_s']} req/s, p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms; good {s['good']} "
                f"(wrong or failed {s['good_wrong_or_failed']}), bad {s['bad']} "
                f"(not refused {s['bad_not_refused_4xx']}); "
                f"answered {s['answered']}, missing from the audit log after SIGKILL "
                f"{s['answered_missing_from_audit_after_sigkill']}; RSS growth after warm-up "
                f"{s['rss_growth_after_warmup_percent']}%"
            )

    args.out.parent.mkdir(parents=True, exist_ok=True)

    benchio.save("serve_throughput", result, out=args.out)
    print(f"\nsaved: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
