"""Hot swap under load: requests at a fixed concurrency against a live `steeldefect serve` on

Figures: docs/line-loop.md, "Hot swap".
127.0.0.1, with ``POST /v1/model`` swapping the model halfway through.

Counts failed requests (any non-200 answer or connection error), the audit rows per model_sha256,
and whether every answer's model is the one its audit row names; latency before, during and after the
swap. The two models are two exports of one run (e.g. int8 and fp32: same input size, different files).

    python bench/swap_under_load.py --model-a RUN/.../model.int8.tflite --model-b RUN/.../model.fp32.tflite \
        --images /work/shared/data/NEU-DET/IMAGES
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchio  # noqa: E402

TOKEN = "bench-swap"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def call(url: str, data: bytes | None, content_type: str, timeout: float = 120) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type}
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-a", type=Path, required=True, help="the model served first")
    parser.add_argument("--model-b", type=Path, required=True, help="the model uploaded halfway")
    parser.add_argument("--images", type=Path, default=Path("/work/shared/data/NEU-DET/IMAGES"))
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="serve --workers")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    files = sorted(args.images.glob("*.jpg"))[:: max(1, len(sorted(args.images.glob("*.jpg"))) // 300)]
    images = [path.read_bytes() for path in files]
    folder = Path(tempfile.mkdtemp(prefix="swap-bench-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = folder / "serve.log"
    command = [
        sys.executable, "-m", "steeldefect", "serve", str(args.model_a), "--port", str(port), "--token", TOKEN,
        "--audit", str(folder / "audit.sqlite"), "--models-dir", str(folder / "models"),
        "--workers", str(args.workers), "--threads", "1",
    ]  # fmt: skip
    with log_path.open("w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if urllib.request.urlopen(f"{url}/readyz", timeout=5).status == 200:
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"server did not start: {log_path.read_text()}") from None
                time.sleep(0.3)
        results: list[dict] = [{} for _ in range(args.requests)]
        done = {"n": 0}
        lock = threading.Lock()
        swap: dict = {}
        swap_at = args.requests // 2

        def do_swap() -> None:
            swap["start"] = time.perf_counter()
            status, body = call(f"{url}/v1/model", args.model_b.read_bytes(), "application/octet-stream")
            swap.update(end=time.perf_counter(), status=status, body=body, done_at=done["n"])

        swapper = threading.Thread(target=do_swap)

        def one(i: int) -> None:
            start = time.perf_counter()
            try:
                status, body = call(f"{url}/v1/predict", images[i % len(images)], "image/jpeg")
            except OSError as error:
                status, body = -1, {"error": str(error)}
            end = time.perf_counter()
            results[i] = {
                "status": status,
                "model": body.get("model", {}).get("sha256"),
                "audit_id": body.get("audit_id"),
                "start": start,
                "end": end,
            }
            with lock:
                done["n"] += 1
                if done["n"] == swap_at:
                    swapper.start()

        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - started
        swapper.join()
    finally:
        server.terminate()
        server.wait(timeout=60)

    failed = [r for r in results if r["status"] != 200]
    with sqlite3.connect(folder / "audit.sqlite") as db:
        rows = dict(db.execute("SELECT id, model_sha256 FROM predictions"))
        per_model = dict(db.execute("SELECT model_sha256, COUNT(*) FROM predictions GROUP BY model_sha256"))
    mismatched = [r for r in results if r["status"] == 200 and rows.get(r["audit_id"]) != r["model"]]

    def latency(selected: list[dict]) -> dict:
        ms = np.array([1000 * (r["end"] - r["start"]) for r in selected])
        if not len(ms):
            return {"requests": 0}
        return {
            "requests": len(ms),
            "p50_ms": round(float(np.median(ms)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1),
        }

    ok = [r for r in results if r["status"] == 200]
    before = [r for r in ok if r["end"] < swap["start"]]
    during = [r for r in ok if r["end"] >= swap["start"] and r["start"] <= swap["end"]]
    after = [r for r in ok if r["start"] > swap["end"]]
    sha_a = swap["body"].get("previous", {}).get("sha256")
    sha_b = swap["body"].get("serving", {}).get("sha256")
    summary = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "serve_workers": args.workers,
        "model_a": str(args.model_a),
        "model_b": str(args.model_b),
        "swap_status": swap["status"],
        "swap_seconds": round(swap["end"] - swap["start"], 2),
        "swap_started_after_requests": swap_at,
        "failed_requests": len(failed),
        "failed_statuses": sorted({r["status"] for r in failed}),
        "audit_rows_per_model": {
            ("a:" if k == sha_a else "b:" if k == sha_b else "?:") + k[:12]: v for k, v in per_model.items()
        },
        "audit_rows": len(rows),
        "answers_whose_audit_row_names_another_model": len(mismatched),
        "answers_by_model": {"a": sum(r["model"] == sha_a for r in ok), "b": sum(r["model"] == sha_b for r in ok)},
        "latency_before_swap": latency(before),
        "latency_during_swap": latency(during),
        "latency_after_swap": latency(after),
        "wall_seconds": round(wall, 1),
        "requests_per_second": round(args.requests / wall, 1),
        "note": "shared 2-core machine (other engineers' jobs running): latencies are indicative only",
    }
    print(json.dumps(summary, indent=2))
    benchio.save("swap_under_load", summary, threads={"serve_workers": args.workers, "threads": 1}, out=args.out)
    if failed or mismatched or swap["status"] != 200:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
