"""How long `export` takes per fold, three ways side by side in one run: before the int8 reuse, with
it, and with it plus two folds converted at once in two processes.

Figures: docs/results.md, "Export speed".

Usage (from the repository root)::

    PYTHONPATH=src python bench/export_speed.py [RUN] [--folds 0 1] [--workers 2] [--out FILE.json]

RUN is a trained run folder (default: runs/neu-pooled of this checkout); it is only read. Each way
converts each fold's joined Keras model (``fold<k>.keras``) to fp32, fp16, int8 and int8-mixed, with
the run's 200 calibration images drawn from its training split exactly as ``steeldefect export``
draws them, and writes into a temporary folder:

  before:            folds one after another; int8-mixed converts the full-integer graph itself
                     (``conversion.convert(model, "int8-mixed", calibration)``), as the code did
                     before the reuse was made real;
  reuse:             folds one after another; int8-mixed is handed the fold's int8 flatbuffer
                     converted just before it (``int8_flatbuffer=...``);
  reuse + parallel:  ``export.export_fold`` (the stage's own code) on a temporary copy of the
                     folds' ``.keras`` files, ``--workers`` folds at a time in "spawn" processes, as
                     ``export.export_backbone`` runs them; its wall time includes starting the
                     processes and importing TensorFlow in each.

"before" and "reuse" run interleaved fold by fold (before fold 0, reuse fold 0, before fold 1, ...)
so that a noisy neighbour slows both alike; the machine's load average is recorded beside each way.
Per-variant seconds include writing the file and reading back its tensor summary (as export_fold
does); in the parallel way the first variant's seconds also include loading the Keras model, which
the sequential ways report apart, and each worker's import of Keras / TensorFlow is reported apart
(it is in the parallel way's wall time, not in its fold totals). Beside wall seconds, each fold's
CPU seconds (``time.process_time`` of the process converting it) show the work done whatever the
machine's load.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

import benchio
from steeldefect.core import runfolder
from steeldefect.deploy import export
from steeldefect.models.conversion import QUANTIZED_VARIANTS, VARIANTS

# The README's pooled-head run, in the checkout this script belongs to.
DEFAULT_RUN = Path(__file__).resolve().parents[1] / "runs" / "neu-pooled"


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def export_sequential(
    run: Path, out: Path, backbone: str, fold: int, variants: list[str], calibration: np.ndarray, *, reuse: bool
) -> dict[str, Any]:
    """One fold's variants in this process, into ``out``: seconds to load, per variant and in all."""
    import keras

    started, cpu_started = time.perf_counter(), time.process_time()
    model = keras.models.load_model(runfolder.fold_model_path(run, backbone, fold, "keras"))
    record: dict[str, Any] = {"load_s": time.perf_counter() - started, "variant_s": {}, "sha256": {}}
    int8_flatbuffer = None
    for variant in variants:
        began = time.perf_counter()
        target = runfolder.fold_model_path(out, backbone, fold, variant)
        export.export_model(
            model,
            variant,
            target,
            calibration if variant in QUANTIZED_VARIANTS else None,
            int8_flatbuffer=int8_flatbuffer if reuse and variant == "int8-mixed" else None,
        )
        export.tensor_summary(target)
        record["variant_s"][variant] = time.perf_counter() - began
        record["sha256"][variant] = _digest(target)
        if variant == "int8":
            int8_flatbuffer = target.read_bytes()
        print(f"  fold {fold} {variant:<10} {record['variant_s'][variant]:6.1f} s", flush=True)
    record["total_s"] = time.perf_counter() - started
    record["cpu_s"] = time.process_time() - cpu_started
    return record


def export_fold_timed(run: Path, backbone: str, fold: int, variants: list[str], calibration: np.ndarray) -> dict:
    """``export.export_fold`` in a worker process, with the time at which each variant was written."""
    began = time.perf_counter()
    import keras  # noqa: F401  (export_fold imports it; timed apart as the worker's start-up cost)

    import_s = time.perf_counter() - began
    started, cpu_started = time.perf_counter(), time.process_time()
    done: dict[str, float] = {}

    def on_done(target: Path) -> None:
        done[runfolder.parse_model_name(target)[1]] = time.perf_counter() - started

    export.export_fold(run, backbone, fold, variants, calibration, on_done=on_done)
    previous = 0.0
    variant_s = {}
    for variant in variants:
        variant_s[variant] = done[variant] - previous
        previous = done[variant]
    sha256 = {variant: _digest(runfolder.fold_model_path(run, backbone, fold, variant)) for variant in variants}
    return {
        "fold": fold,
        "import_keras_s": import_s,
        "variant_s": variant_s,
        "total_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu_started,
        "sha256": sha256,
    }


def copy_fold_models(run: Path, target: Path, backbone: str, folds: list[int]) -> None:
    """The folds' ``.keras`` files and sidecars, which is all export_fold reads from a run folder."""
    for fold in folds:
        source = runfolder.fold_model_path(run, backbone, fold, "keras")
        destination = runfolder.fold_model_path(target, backbone, fold, "keras")
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)
        shutil.copy2(runfolder.sidecar_path(source), runfolder.sidecar_path(destination))


def _load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run", type=Path, nargs="?", default=DEFAULT_RUN, help=f"trained run folder, only read (default {DEFAULT_RUN})"
    )
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--workers", type=int, default=2, help="processes of the parallel way (default 2)")
    parser.add_argument("--calibration-samples", type=int, default=200)
    parser.add_argument("--out", type=Path, default=benchio.RESULTS_DIR / "export_speed.json", help="results JSON file")
    args = parser.parse_args(argv)
    if "int8-mixed" in args.variants and "int8" not in args.variants:
        parser.error("--variants: int8-mixed reuses int8's conversion, so list int8 too")
    # export_fold converts in the order given; int8 must come before int8-mixed for the reuse.
    variants = [variant for variant in VARIANTS if variant in args.variants]
    for fold in args.folds:
        source = runfolder.fold_model_path(args.run, args.backbone, fold, "keras")
        if not source.is_file():
            parser.error(f"{source}: no such fold model (RUN must be a trained run folder)")

    from steeldefect.study.rundata import load_run_data

    prepared, train_options = load_run_data(args.run, progress=False)
    indices = export.calibration_indices(
        prepared.dataset.labels, prepared.splits.train_indices, args.calibration_samples, seed=train_options.seed
    )
    calibration = np.ascontiguousarray(prepared.images[indices])
    print(
        f"run: {args.run} ({args.backbone}, folds {args.folds}); variants {', '.join(variants)}; "
        f"{len(calibration)} calibration images from the training split"
    )
    print(f"cpu: {benchio.machine()['cpu_model']}, {os.cpu_count()} cores; load average at start {_load()}")

    results: dict[str, Any] = {
        "run": str(args.run),
        "backbone": args.backbone,
        "folds": args.folds,
        "variants": variants,
        "calibration_images": len(calibration),
        "workers": args.workers,
        "ways": {},
    }
    with tempfile.TemporaryDirectory(prefix="steeldefect-export-speed-") as scratch:
        scratch = Path(scratch)
        sequential: dict[str, dict[int, dict]] = {"before": {}, "reuse": {}}
        load_before = {way: _load() for way in sequential}
        for fold in args.folds:
            for way in sequential:
                print(f"{way}: fold {fold}", flush=True)
                sequential[way][fold] = export_sequential(
                    args.run, scratch / way, args.backbone, fold, variants, calibration, reuse=way == "reuse"
                )
        for way, folds in sequential.items():
            results["ways"][way] = {
                "folds": {str(fold): record for fold, record in folds.items()},
                "total_s": sum(record["total_s"] for record in folds.values()),
                "loadavg_before": load_before[way],
                "loadavg_after": _load(),
            }

        parallel_run = scratch / "parallel"
        copy_fold_models(args.run, parallel_run, args.backbone, args.folds)
        load_before = _load()
        print(f"reuse + parallel: folds {args.folds} in {args.workers} processes", flush=True)
        started = time.perf_counter()
        records = {}
        # "spawn", as export_backbone: a forked TensorFlow runtime is not safe to use in the child.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=context) as pool:
            futures = [
                pool.submit(export_fold_timed, parallel_run, args.backbone, fold, variants, calibration)
                for fold in args.folds
            ]
            for future in as_completed(futures):
                record = future.result()
                records[record.pop("fold")] = record
                print(f"  fold done after {time.perf_counter() - started:.1f} s", flush=True)
        results["ways"]["reuse + parallel"] = {
            "folds": {str(fold): records[fold] for fold in args.folds},
            "total_s": time.perf_counter() - started,
            "loadavg_before": load_before,
            "loadavg_after": _load(),
        }

    ways = results["ways"]
    before_total = ways["before"]["total_s"]
    results["speedup_over_before"] = {way: before_total / ways[way]["total_s"] for way in ways}
    # The three ways must write the same models: the reuse and the processes only save work.
    results["same_models"] = {
        f"fold{fold} {variant}": len({ways[way]["folds"][str(fold)]["sha256"][variant] for way in ways}) == 1
        for fold in args.folds
        for variant in variants
    }

    print()
    print(f"{'seconds':<20}" + "".join(f"{way:>18}" for way in ways))
    for variant in variants:
        per_fold = {way: [ways[way]["folds"][str(fold)]["variant_s"][variant] for fold in args.folds] for way in ways}
        print(
            f"{variant + ', per fold':<20}"
            + "".join(f"{' / '.join(f'{value:.1f}' for value in per_fold[way]):>18}" for way in ways)
        )
    loads = {way: " / ".join(f"{ways[way]['folds'][str(f)]['load_s']:.1f}" for f in args.folds) for way in sequential}
    print(
        f"{'load .keras':<20}"
        + "".join(f"{loads[way]:>18}" for way in sequential)
        + f"{'(in ' + variants[0] + ')':>18}"
    )
    imports = " / ".join(f"{ways['reuse + parallel']['folds'][str(f)]['import_keras_s']:.1f}" for f in args.folds)
    print(f"{'import keras':<20}" + f"{'-':>18}" * len(sequential) + f"{imports:>18}")
    for fold in args.folds:
        totals = [ways[way]["folds"][str(fold)]["total_s"] for way in ways]
        print(f"{f'fold {fold} total':<20}" + "".join(f"{total:>18.1f}" for total in totals))
    for fold in args.folds:
        cpu = [ways[way]["folds"][str(fold)]["cpu_s"] for way in ways]
        print(f"{f'fold {fold} CPU s':<20}" + "".join(f"{value:>18.1f}" for value in cpu))
    print(f"{'wall, all folds':<20}" + "".join(f"{ways[way]['total_s']:>18.1f}" for way in ways))
    print(f"{'speed-up vs before':<20}" + "".join(f"{results['speedup_over_before'][way]:>17.2f}x" for way in ways))
    print(
        "load average (1/5/15 min) before each way: "
        + "; ".join(f"{way} {ways[way]['loadavg_before']}" for way in ways)
        + f"; at the end {_load()}"
    )
    differing = [key for key, same in results["same_models"].items() if not same]
    print("models identical across the three ways: " + ("yes" if not differing else f"no: {', '.join(differing)}"))
    benchio.save(
        "export_speed", results, threads={"conversion": "TensorFlow default", "workers": args.workers}, out=args.out
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
