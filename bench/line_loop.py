"""The line teaches the model, end to end on real NEU (issue #26): first model -> live service ->
review -> review export -> train on both roots -> compare -> hot swap. Figures: docs/retrain.md,
"The loop, measured".

1. NEU's test split is the one `train` makes on all of NEU (seed 42, 15%); the rest is the pool.
2. The first model: ``--per-class`` pool images (default 20) of every class but ``--left-out``
   (default rolled-in_scale), trained and exported with the steeldefect CLI from a folder of
   symlinks under ``--work`` (outside the repository; no image is copied).
3. The rest of the pool is the stream, in a seeded random order, sent one image at a time to a live
   ``steeldefect serve --review`` started here on 127.0.0.1 (its images are what the line sees).
4. A simulated inspector works through the review queue (oldest first) through the API with the
   true labels, up to ``--budget`` (default 15%) of the stream; the left-out class is named as a new kind.
5. ``review export`` -> ``train --data FIRST --data REVIEWED`` -> ``export`` -> ``compare OLD NEW
   --data TEST`` (the test split: neither model trained on it) -> ``POST /v1/model`` when the verdict
   is promote -> the stream again through the swapped service.

Every step is a CLI call or an HTTP request, as a plant would run them; each step whose output
exists is skipped on a re-run (train and export resume by themselves), so an interrupted bench
resumes. Figures: stream accuracy before and after, the share of the stream reviewed, the new
kind's share flagged uncertain before retraining and its recall after, the new model's accuracy on
the test split. Saved via benchio (CPU, flags, threads).

    python bench/line_loop.py --work /tmp/line_loop
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

import benchio
from steeldefect.core.options import DataOptions
from steeldefect.core.runfolder import deploy_model_path
from steeldefect.data.dataset import scan_dataset
from steeldefect.data.splits import make_splits

NEU = Path(__file__).resolve().parents[2] / "shared" / "data" / "NEU-DET" / "IMAGES"
# The recipe that meets the few-image targets (README: multilayer + dihedral), for both models.
TRAIN_ARGS = ["--features", "multilayer", "--augment", "7", "--augment-views", "dihedral"]
EXPORT_ARGS = ["--variants", "int8", "--no-quant-report"]
TOKEN = "line-loop-bench"
# The first model's rule rests on 85 out-of-fold reference scores (17 per class): its 99% threshold
# is about their largest, so the service runs it at 0.97 (the 3rd largest); docs/retrain.md,
# "The loop, measured", has what each acceptance flags.
DEFAULT_ACCEPT = 0.97
SWEEP = (0.99, 0.98, 0.97, 0.96, 0.95)


def steeldefect(*args: str) -> None:
    command = [sys.executable, "-m", "steeldefect", "--quiet", *args]
    print("$ steeldefect", " ".join(args), flush=True)
    subprocess.run(command, check=True)


def link_folder(folder: Path, files: list[tuple[Path, str]]) -> Path:
    """``folder/<class>/neu-<name>`` symlinks to the NEU files (the images stay where they are). The
    prefix keeps the names from looking like a flat NEU-DET folder, which always has all six classes."""
    for path, name in files:
        target = folder / name / f"neu-{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_symlink():
            target.symlink_to(path)
    return folder


class Service:
    """`steeldefect serve` as a subprocess on 127.0.0.1, talked to over HTTP."""

    def __init__(self, model: Path, work: Path, port: int, accept: float | None) -> None:
        self.url = f"http://127.0.0.1:{port}"
        command = [
            sys.executable,
            "-m",
            "steeldefect",
            "serve",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--token",
            TOKEN,
            "--audit",
            str(work / "audit.sqlite"),
            "--review",
            str(work / "store"),
            "--workers",
            "1",
            *([] if accept is None else ["--accept", str(accept)]),
        ]
        print("$", " ".join(command[2:]), flush=True)
        self.log = open(work / "serve.log", "ab")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode}; see {work / 'serve.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        raise RuntimeError("serve did not become ready in 300 s")

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> Any:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"{method} {path}: HTTP {error.code} {error.read()[:300]!r}") from None

    def predict(self, data: bytes) -> dict[str, Any]:
        return self.request("POST", "/v1/predict?top_k=1", data, "image/jpeg")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def stream(service: Service, items: list[tuple[Path, str]], label: str) -> list[dict[str, Any]]:
    answers = []
    started = time.perf_counter()
    for i, (path, truth) in enumerate(items):
        body = service.predict(path.read_bytes())
        answers.append({"truth": truth, "class": body["class"], "uncertain": bool(body["uncertain"])})
        if (i + 1) % 200 == 0 or i + 1 == len(items):
            print(f"{label}: {i + 1}/{len(items)} images ({time.perf_counter() - started:.0f} s)", flush=True)
    return answers


def accuracy(answers: list[dict[str, Any]]) -> float:
    return float(np.mean([a["class"] == a["truth"] for a in answers])) if answers else float("nan")


def review_queue(service: Service, truth_of: dict[str, str], budget: int, known: set[str]) -> list[str]:
    """The simulated inspector: pending images oldest first, the true class for each, up to ``budget``."""
    reviewed: list[str] = []
    after = ""
    while len(reviewed) < budget:
        page = service.request("GET", f"/v1/review/queue?status=pending&limit=1000&after={after}")
        entries = page["entries"]
        for entry in entries:
            if len(reviewed) >= budget:
                break
            sha = entry["sha256"]
            truth = truth_of[sha]
            decision = {
                "reviewer": "bench-inspector",
                "decided_class": truth,
                "new_kind": truth not in known,
                "note": None,
                "idempotency_key": f"bench-{sha}",
            }
            service.request("POST", f"/v1/review/{sha}", json.dumps(decision).encode(), "application/json")
            reviewed.append(sha)
        if not page.get("next_after") or not entries:
            break
        after = page["next_after"]
    return reviewed


def acceptance_sweep(model: Path, items: list[tuple[Path, str]], known: set[str]) -> list[dict[str, Any]]:
    """The share of the stream the first model flags at each acceptance in :data:`SWEEP`, known
    classes and the new kind apart: what ``serve --accept`` trades (the rule's scores do not depend on
    the acceptance, only its threshold does, so the stream is judged once)."""
    from steeldefect.data.decode import decode_image
    from steeldefect.runtime.modelfile import Classifier

    classifier = Classifier(model, threads=None)
    images = np.stack([decode_image(path.read_bytes(), classifier.info.input_size, path.name) for path, _ in items])
    score = classifier.judge(images).score
    is_known = np.array([truth in known for _, truth in items])
    rows = []
    for accept in SWEEP:
        flagged = score > classifier.rule.with_accept(accept).threshold
        rows.append(
            {
                "accept": accept,
                "new_kind_flagged": round(float(flagged[~is_known].mean()), 4),
                "known_flagged": round(float(flagged[is_known].mean()), 4),
                "stream_flagged": round(float(flagged.mean()), 4),
            }
        )
    return rows


def upload_model(service: Service, model: Path) -> dict[str, Any]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{model.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + model.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return service.request("POST", "/v1/model", body, f"multipart/form-data; boundary={boundary}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neu", type=Path, default=NEU, help=f"NEU-DET images (default {NEU})")
    parser.add_argument("--work", type=Path, required=True, help="work folder outside the repository (resumes)")
    parser.add_argument("--left-out", default="rolled-in_scale", help="the class the first model never sees")
    parser.add_argument("--per-class", type=int, default=20, help="first model's images per known class")
    parser.add_argument("--budget", type=float, default=0.15, help="share of the stream the inspector reviews at most")
    parser.add_argument("--seed", type=int, default=0, help="which first images, and the stream order")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--retrain-args",
        default=None,
        help=f"train options of the second model (default: the first model's, {' '.join(TRAIN_ARGS)})",
    )
    parser.add_argument(
        "--accept",
        type=float,
        default=DEFAULT_ACCEPT,
        help=f"serve --accept for both models (default {DEFAULT_ACCEPT}; 0 = each model's own, 0.99)",
    )
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/line_loop.json)")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    times: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        times[name] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    # 1-2: the test split train makes on all of NEU; the first model's images from the pool.
    dataset = scan_dataset(args.neu)
    defaults = DataOptions()
    splits = make_splits(
        dataset.labels, test_fraction=defaults.test_fraction, n_folds=defaults.n_folds, seed=defaults.seed
    )
    names = dataset.class_names
    if args.left_out not in names:
        raise SystemExit(f"--left-out: {args.left_out!r} is not a NEU class ({', '.join(names)})")
    rng = np.random.default_rng(args.seed)
    pool = np.asarray(splits.train_indices)
    first = [
        int(i)
        for label, name in enumerate(names)
        if name != args.left_out
        for i in rng.choice(pool[dataset.labels[pool] == label], args.per_class, replace=False)
    ]
    stream_idx = [int(i) for i in rng.permutation(np.setdiff1d(pool, first))]
    item = lambda i: (dataset.paths[i], names[dataset.labels[i]])  # noqa: E731
    first_dir = link_folder(work / "first", [item(i) for i in first])
    gate_dir = link_folder(work / "test_split", [item(int(i)) for i in splits.test_indices])
    items = [item(i) for i in stream_idx]
    truth_of = {hashlib.sha256(path.read_bytes()).hexdigest(): truth for path, truth in items}
    known = set(names) - {args.left_out}

    mark = time.perf_counter()
    run1, run2 = work / "run1", work / "run2"
    retrain_args = args.retrain_args.split() if args.retrain_args is not None else TRAIN_ARGS
    old_model = deploy_model_path(run1, "int8")
    if not old_model.is_file():  # done by an earlier, interrupted bench: nothing to resume
        steeldefect("train", "--data", str(first_dir), *TRAIN_ARGS, "--out", str(run1))
        steeldefect("export", str(run1), *EXPORT_ARGS)
    mark = lap("first_model_s", mark)

    # 3-4: the stream through the live service, then the inspector.
    accept = args.accept or None
    service = Service(old_model, work, args.port, accept)
    try:
        before_path = work / "stream_before.json"
        if before_path.is_file():
            before = json.loads(before_path.read_text())
        else:
            before = stream(service, items, "stream, first model")
            before_path.write_text(json.dumps(before))
        mark = lap("stream_before_s", mark)
        budget = int(args.budget * len(items))
        reviewed_path = work / "reviewed.json"
        if reviewed_path.is_file():  # a resumed bench: the inspector's work is in the database already
            reviewed = json.loads(reviewed_path.read_text())
        else:
            reviewed = review_queue(service, truth_of, budget, known)
            reviewed_path.write_text(json.dumps(reviewed))
        mark = lap("review_s", mark)

        # 5: export the reviews, retrain on both roots, compare on the test split, swap.
        reviewed_dir = work / "reviewed"
        steeldefect("review", "export", "--db", str(work / "audit.sqlite"), "--out", str(reviewed_dir))
        new_model = deploy_model_path(run2, "int8")
        if not new_model.is_file():
            steeldefect("train", "--data", str(first_dir), str(reviewed_dir), *retrain_args, "--out", str(run2))
            steeldefect("export", str(run2), *EXPORT_ARGS)
        mark = lap("retrain_s", mark)
        steeldefect("compare", str(old_model), str(new_model), "--data", str(gate_dir), "--out", str(work / "compare"))
        comparison = json.loads((work / "compare" / "compare.json").read_text())
        mark = lap("compare_s", mark)
        swapped = None
        after: list[dict[str, Any]] = []
        if comparison["verdict"] == "promote":
            swapped = upload_model(service, new_model)
            mark = lap("swap_s", mark)
            after = stream(service, items, "stream, new model")
            lap("stream_after_s", mark)
    finally:
        service.stop()

    sweep = acceptance_sweep(old_model, items, known)
    reviewed_set = set(reviewed)
    shas = list(truth_of)
    unreviewed = [i for i, sha in enumerate(shas) if sha not in reviewed_set]
    new_kind_before = [a for a in before if a["truth"] == args.left_out]
    test_recall = comparison["new"]["recall"]
    results = {
        "neu": str(args.neu),
        "left_out": args.left_out,
        "first_model": {"per_class": args.per_class, "classes": sorted(known), "images": len(first)},
        "train_options": TRAIN_ARGS,
        "retrain_options": retrain_args,
        "stream": {"images": len(items), "new_kind_images": len(new_kind_before), "seed": args.seed},
        "served_accept": accept,  # None: each model's own
        "first_model_acceptance_sweep": sweep,
        "reviewed": {
            "images": len(reviewed),
            "share_of_stream": round(len(reviewed) / len(items), 4),
            "budget": args.budget,
            "new_kind": sum(truth_of[sha] == args.left_out for sha in reviewed),
            "queue_uncertain_share_of_stream": round(float(np.mean([a["uncertain"] for a in before])), 4),
        },
        "before": {
            "stream_accuracy": round(accuracy(before), 4),
            "stream_accuracy_known_classes": round(accuracy([a for a in before if a["truth"] in known]), 4),
            "new_kind_flagged_uncertain": round(float(np.mean([a["uncertain"] for a in new_kind_before])), 4),
            "known_flagged_uncertain": round(
                float(np.mean([a["uncertain"] for a in before if a["truth"] in known])), 4
            ),
        },
        "compare": {
            "verdict": comparison["verdict"],
            "reasons": comparison["reasons"],
            "mcnemar": comparison["mcnemar"],
            "old_test_accuracy": round(comparison["old"]["accuracy"], 4),
            "new_test_accuracy": round(comparison["new"]["accuracy"], 4),
            "new_test_recall": {k: round(v, 4) for k, v in test_recall.items()},
            "new_kind_test_recall": round(test_recall[args.left_out], 4),
            "new_test_uncertain_share": comparison["new"]["uncertain_share"],
        },
        "after": {
            "swapped_to": None if swapped is None else swapped.get("serving"),
            "stream_accuracy": round(accuracy(after), 4) if after else None,
            "stream_accuracy_unreviewed": round(accuracy([after[i] for i in unreviewed]), 4) if after else None,
            "new_kind_stream_recall": round(accuracy([a for a in after if a["truth"] == args.left_out]), 4)
            if after
            else None,
        },
        "targets": {
            "reviewed_share_le_15pct": len(reviewed) / len(items) <= 0.15,
            "new_test_accuracy_ge_99pct_all_six": comparison["new"]["accuracy"] >= 0.99,
            "new_kind_flagged_ge_70pct": float(np.mean([a["uncertain"] for a in new_kind_before])) >= 0.70,
        },
        "seconds": times | {"total": round(time.perf_counter() - started, 1)},
        # Other jobs on the machine slow every step: the load average says how busy it was.
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(results, indent=2))
    benchio.save("line_loop", results, threads=os.cpu_count(), out=args.out)


if __name__ == "__main__":
    main()
