"""Command line: parse arguments, call the public function, print where the outputs went.

Each subcommand is one call of a function that the Python API exposes; nothing is computed here.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter off the terminal


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="dataset folder (class sub-folders or flat NEU names)")
    parser.add_argument("--seed", type=int, default=42, help="fixes splits, initialisation and shuffling")
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--folds", type=int, default=5, dest="n_folds")
    parser.add_argument("--image-size", type=int, default=224, help="square input size in pixels")
    parser.add_argument("--cache-dir", type=Path, default=None, help="decoded-image and feature cache")
    parser.add_argument("--skip-bad", action="store_true", help="exclude unreadable images with a warning")


def _add_train_options(parser: argparse.ArgumentParser, default_backbones: Sequence[str]) -> None:
    from steeldefect.backbones import PREPROCESSING_CHOICES, REGISTRY, WEIGHTS_CHOICES
    from steeldefect.training import DEFAULT_LEARNING_RATES, HEAD_CHOICES

    parser.add_argument(
        "--backbone",
        nargs="+",
        default=list(default_backbones),
        choices=[*REGISTRY, "all"],
        dest="backbones",
        help="backbones to train; 'all' skips those whose weights are missing (default: %(default)s)",
    )
    parser.add_argument("--weights", choices=WEIGHTS_CHOICES, default="imagenet", help="'none' = random init, explicitly")
    parser.add_argument("--preprocessing", choices=PREPROCESSING_CHOICES, default="model",
                        help="'reference' feeds raw 0..255 pixels with no scaling, as the reference study did")
    parser.add_argument("--head", choices=HEAD_CHOICES, default="flatten")
    parser.add_argument("--learning-rates", type=float, nargs="+", default=list(DEFAULT_LEARNING_RATES))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)


def _add_eval_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="interpreter threads (default: all cores)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=50, help="timed invokes per model")


def build_parser() -> argparse.ArgumentParser:
    from steeldefect.conversion import DEFAULT_VARIANTS, VARIANTS

    parser = argparse.ArgumentParser(prog="steeldefect", description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="inspect a dataset folder")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    inspect = data_commands.add_parser("inspect", help="layout, class counts, sizes, modes, duplicates")
    inspect.add_argument("root", type=Path)
    inspect.add_argument("--seed", type=int, default=42)
    inspect.add_argument("--test-fraction", type=float, default=0.15)
    inspect.add_argument("--folds", type=int, default=5, dest="n_folds")

    weights = commands.add_parser("weights", help="pretrained weights in Keras' cache")
    weights_commands = weights.add_subparsers(dest="weights_command", required=True)
    weights_commands.add_parser("status", help="which backbone weights are present, missing or corrupt")
    install = weights_commands.add_parser("install", help="copy official Keras weight files from a folder")
    install.add_argument("folder", type=Path)

    train = commands.add_parser("train", help="features -> LR grid x CV folds -> test metrics -> .keras models")
    _add_data_options(train)
    _add_train_options(train, ["efficientnet_lite0"])
    train.add_argument("--out", type=Path, default=None, help="run folder (default runs/train-<timestamp>)")

    export = commands.add_parser("export", help="LiteRT fp32 / fp16 / full-integer int8 / int8-mixed models of a run")
    export.add_argument("run", type=Path)
    export.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS),
                        help="int8-mixed: int8 except the high-resolution start, kept float (for CPUs without "
                             "int8 dot-product instructions; see the README)")
    export.add_argument("--calibration-samples", type=int, default=200)
    export.add_argument("--no-quant-report", action="store_true", help="skip the per-layer int8 error report")

    evaluate = commands.add_parser("evaluate", help="test metrics, size and latency of a run's .tflite models")
    evaluate.add_argument("run", type=Path)
    _add_eval_options(evaluate)

    report = commands.add_parser("report", help="write RUN/report.md, its CSVs and plots (reads, never recomputes)")
    report.add_argument("run", type=Path)

    reproduce = commands.add_parser("reproduce", help="the whole study: train -> export -> evaluate -> report")
    _add_data_options(reproduce)
    _add_train_options(reproduce, ["all"])
    _add_eval_options(reproduce)
    reproduce.add_argument("--calibration-samples", type=int, default=200)
    reproduce.add_argument("--out", type=Path, default=None, help="run folder (default runs/reproduce-<timestamp>)")

    predict = commands.add_parser("predict", help="classify images with a .tflite or .keras model")
    predict.add_argument("model", type=Path)
    predict.add_argument("paths", type=Path, nargs="+",
                         help="image files, folders, or manifests (.txt one path per line, .csv with a path column)")
    predict.add_argument("--top-k", type=int, default=1)
    predict.add_argument("--format", choices=("table", "csv", "json"), default="table")
    predict.add_argument("--threads", type=int, default=None)
    _add_archive_options(predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # TensorFlow's converter logs every temporary SavedModel it writes; only our messages matter here.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    progress = not args.quiet
    default_format = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"
    try:
        return _dispatch(args, progress)
    except KeyboardInterrupt:
        print("interrupted: finished steps are kept; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as error:  # one clear line for anticipated failures; full trace for bugs
        from steeldefect.backbones import WeightsMissingError
        from steeldefect.data import DatasetError

        if isinstance(error, (WeightsMissingError, DatasetError, FileNotFoundError, ValueError)):
            print(f"error: {error}", file=sys.stderr)
            return 2
        raise
    finally:
        warnings.formatwarning = default_format


def _dispatch(args: argparse.Namespace, progress: bool) -> int:
    from steeldefect import pipeline
    from steeldefect.runfolder import default_run_dir

    if args.command == "data":
        from steeldefect.data import format_inspection, inspect_dataset

        report = inspect_dataset(args.root, test_fraction=args.test_fraction, n_folds=args.n_folds, seed=args.seed)
        print(format_inspection(report))
        return 0
    if args.command == "weights":
        return _weights(args)
    if args.command in ("train", "reproduce"):
        out = args.out or default_run_dir(args.command)
        common = dict(
            backbones=args.backbones,
            weights=args.weights,
            preprocessing=args.preprocessing,
            head=args.head,
            learning_rates=args.learning_rates,
            epochs=args.epochs,
            batch_size=args.batch_size,
            test_fraction=args.test_fraction,
            n_folds=args.n_folds,
            seed=args.seed,
            image_size=(args.image_size, args.image_size),
            cache_dir=args.cache_dir,
            skip_bad=args.skip_bad,
            progress=progress,
        )
        if args.command == "train":
            pipeline.train(args.data, out, **common)
        else:
            pipeline.reproduce(
                args.data, out, threads=args.threads, warmup=args.warmup, runs=args.runs,
                calibration_samples=args.calibration_samples, **common,
            )
        print(f"run folder: {out}")
        return 0
    if args.command == "export":
        pipeline.export(
            args.run, variants=args.variants, calibration_samples=args.calibration_samples,
            quant_report=not args.no_quant_report, progress=progress,
        )
        print(f"models: {args.run}/*/models")
        return 0
    if args.command == "evaluate":
        pipeline.evaluate(args.run, threads=args.threads, warmup=args.warmup, runs=args.runs, progress=progress)
        print(f"metrics: {args.run}/tflite_metrics.csv, {args.run}/summary.json")
        return 0
    if args.command == "report":
        from steeldefect.report import write_report

        path = write_report(args.run)
        print(f"report: {path}")
        return 0
    if args.command == "predict":
        from steeldefect.batch import collect_inputs
        from steeldefect.predict import format_predictions, predict_paths

        if args.out is not None or args.model.suffix == ".tflite":
            return _predict_archive(args, progress)
        results = predict_paths(args.model, collect_inputs(args.paths), top_k=args.top_k, threads=args.threads,
                                progress=progress)
        print(format_predictions(results, args.format))
        failed = sum(1 for result in results if result.error)
        return 1 if failed else 0
    raise AssertionError(args.command)


def _add_archive_options(predict: argparse.ArgumentParser) -> None:
    """Scoring an image archive (steeldefect.batch): resumable output file, local or Ray engine."""
    group = predict.add_argument_group("archive scoring (README: Scoring an image archive)")
    group.add_argument("--out", type=Path, default=None,
                       help="write results to FILE (.parquet, .csv or .jsonl) as they come; re-run to resume")
    group.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="ray: Ray Data on this machine or on a cluster (needs steeldefect[ray] and --out)")
    group.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local)")
    group.add_argument("--workers", type=int, default=None,
                       help="local: N > 1 = N worker processes, 1 thread each (default with --out: one per core); "
                            "1 = one interpreter on --threads cores in this process (default without --out); "
                            "ray: actors (default one per CPU)")
    group.add_argument("--batch-size", type=int, default=None,
                       help="images per committed part (default 64 local, 256 ray); an interruption loses "
                            "at most the batches in flight")


def _predict_archive(args: argparse.Namespace, progress: bool) -> int:
    from steeldefect import batch

    if args.engine == "ray" and args.out is None:
        raise ValueError("--engine ray writes its results to a file: give --out FILE.parquet")
    if args.address and args.engine != "ray":
        raise ValueError("--address is for --engine ray")
    options = dict(top_k=args.top_k, threads=args.threads)
    if args.batch_size is not None:
        options["batch_size"] = args.batch_size
    if args.out is None:  # today's output, from the fast path
        from tqdm.auto import tqdm

        from steeldefect.predict import Prediction, format_predictions

        paths = batch.collect_inputs(args.paths)
        results = []
        with tqdm(total=len(paths), desc="predict", unit="img", disable=not progress) as bar:
            for rows in batch.iter_predictions(args.model, paths, workers=args.workers, **options):
                results.extend(Prediction(Path(row.path), row.top, row.error) for row in rows)
                bar.update(len(rows))
        print(format_predictions(results, args.format))
        return 1 if any(result.error for result in results) else 0
    try:
        if args.engine == "ray":
            result = batch.score_archive_ray(args.model, args.paths, args.out, address=args.address,
                                             actors=args.workers, progress=progress, **options)
        else:
            result = batch.score_archive(args.model, args.paths, args.out, workers=args.workers,
                                         progress=progress, **options)
    except batch.RayMissingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{result.out}: {result.listed} images listed, {result.skipped} already done, {result.scored} scored "
          f"in {result.seconds:.1f} s ({result.images_per_second:.1f} images/s), {result.failed} failed in the output")
    return 1 if result.failed else 0


def _weights(args: argparse.Namespace) -> int:
    from steeldefect import backbones

    if args.weights_command == "status":
        rows = backbones.weights_status()
        width = max(len(row.backbone) for row in rows)
        for row in rows:
            print(f"{row.backbone:<{width}}  {row.state:<8}  {row.path}  [{row.source}]")
        return 0 if all(row.state == "present" for row in rows) else 1
    outcomes = backbones.install_weights(args.folder)
    for filename, outcome in outcomes:
        print(f"{filename}: {outcome}")
    return 1 if any(outcome.startswith("refused") for _, outcome in outcomes) else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
