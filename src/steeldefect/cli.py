"""Command line: parse arguments, call the public function, print where the outputs went.

Each subcommand is one call of a function that the Python API exposes; nothing is computed here.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from steeldefect.core.options import PredictOptions

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter off the terminal


def build_parser() -> argparse.ArgumentParser:
    from steeldefect.core.options import (
        CompareOptions,
        DataOptions,
        EvaluateOptions,
        ExportOptions,
        LearningCurveOptions,
        PredictOptions,
        ServeOptions,
        TrainOptions,
        add_arguments,
    )

    parser = argparse.ArgumentParser(prog="steeldefect", description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="inspect a dataset folder")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    inspect = data_commands.add_parser("inspect", help="layout, class counts, sizes, modes, duplicates")
    inspect.add_argument("root", type=Path)
    add_arguments(inspect, DataOptions, only=("seed", "test_fraction", "n_folds"))

    weights = commands.add_parser("weights", help="pretrained weights in Keras' cache")
    weights_commands = weights.add_subparsers(dest="weights_command", required=True)
    weights_commands.add_parser("status", help="which backbone weights are present, missing or corrupt")
    install = weights_commands.add_parser("install", help="copy official Keras weight files from a folder")
    install.add_argument("folder", type=Path)
    download = weights_commands.add_parser(
        "download", help="fetch the official Keras weight files (hash-checked) into $KERAS_HOME/models"
    )
    download.add_argument(
        "names",
        nargs="*",
        default=["all"],
        metavar="NAME",
        help="backbones, or 'all' (default); Lite0's weights come from its package instead",
    )

    train = commands.add_parser("train", help="features -> LR grid x CV folds -> test metrics -> .keras models")
    train.add_argument(
        "--data",
        type=Path,
        nargs="+",
        action="extend",
        required=True,
        help="dataset folder (class sub-folders or flat NEU names); several (--data A B, or --data A --data B) "
        "are merged, classes matched by name",
    )
    add_arguments(train, TrainOptions)
    train.add_argument(
        "--download-weights",
        action="store_true",
        help="first fetch missing official Keras weight files (nothing is downloaded without this)",
    )
    train.add_argument("--out", type=Path, default=None, help="run folder (default runs/train-<timestamp>)")

    export = commands.add_parser("export", help="LiteRT fp32 / fp16 / full-integer int8 / int8-mixed models of a run")
    export.add_argument("run", type=Path)
    add_arguments(export, ExportOptions)

    evaluate = commands.add_parser("evaluate", help="test metrics, size and latency of a run's .tflite models")
    evaluate.add_argument("run", type=Path)
    add_arguments(evaluate, EvaluateOptions)

    report = commands.add_parser("report", help="write RUN/report.md, its CSVs and plots (reads, never recomputes)")
    report.add_argument("run", type=Path)

    reproduce = commands.add_parser("reproduce", help="the whole study: train -> export -> evaluate -> report")
    reproduce.add_argument(
        "--data", type=Path, required=True, help="dataset folder (class sub-folders or flat NEU names)"
    )
    add_arguments(reproduce, TrainOptions, defaults={"backbones": ("all",)})
    reproduce.add_argument(
        "--download-weights",
        action="store_true",
        help="first fetch missing official Keras weight files (nothing is downloaded without this)",
    )
    add_arguments(reproduce, ExportOptions, only=("calibration_samples", "int8_guard"))
    add_arguments(reproduce, EvaluateOptions)
    reproduce.add_argument("--out", type=Path, default=None, help="run folder (default runs/reproduce-<timestamp>)")

    curve = commands.add_parser(
        "learning-curve", help="accuracy vs images per class (or an imbalance profile) per method, with plots"
    )
    curve.add_argument("--data", type=Path, required=True, help="dataset folder (class sub-folders or flat NEU names)")
    add_arguments(curve, LearningCurveOptions)
    curve.add_argument(
        "--class-order",
        dest="class_orders",
        nargs="+",
        action="append",
        default=[],
        metavar="CLASS",
        help="assign the --per-class counts to the classes in this order (an imbalance profile); "
        "give it several times for several orders",
    )
    curve.add_argument("--out", type=Path, required=True, help="results folder (a re-run resumes)")

    predict = commands.add_parser("predict", help="classify images with a .tflite or .keras model")
    predict.add_argument("model", type=Path)
    predict.add_argument(
        "paths",
        type=Path,
        nargs="+",
        help="image files, folders, or manifests (.txt one path per line, .csv with a path column)",
    )
    add_arguments(predict, PredictOptions)

    compare = commands.add_parser(
        "compare", help="champion/challenger: two models on the same gate images, then 'promote' or 'keep'"
    )
    compare.add_argument("old", type=Path, help="the model serving now (.tflite)")
    compare.add_argument("new", type=Path, help="the candidate (.tflite)")
    compare.add_argument(
        "--data",
        type=Path,
        nargs="+",
        action="extend",
        required=True,
        help="gate images: class folders or a NEU layout; several are merged (classes matched by name)",
    )
    add_arguments(compare, CompareOptions)

    review = commands.add_parser("review", help="inspectors' reviews from the service's audit database")
    review_commands = review.add_subparsers(dest="review_command", required=True)
    review_export = review_commands.add_parser(
        "export", help="reviewed images into class folders (a `train --data` root) with manifest.csv; resumes"
    )
    review_export.add_argument("--db", type=Path, required=True, help="the service's audit SQLite (serve --audit)")
    review_export.add_argument("--out", type=Path, required=True, help="folder of class folders (re-run to resume)")
    review_export.add_argument(
        "--images", type=Path, default=None, help="the review store (default: the folder the database names)"
    )
    review_export.add_argument(
        "--min-images",
        type=int,
        default=None,
        help="images a new kind needs before it becomes a class folder (default: what train needs per class, 7)",
    )

    serve = commands.add_parser("serve", help="answer HTTP on the line: /v1/predict, the inspector page, audit log")
    serve.add_argument("model", type=Path, help="an exported .tflite model, or a run folder (its model to deploy)")
    add_arguments(serve, ServeOptions)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # TensorFlow's converter logs every temporary SavedModel it writes; only our messages matter here.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    # Matplotlib announces building its font cache ("generated new fontManager") at INFO level.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    progress = not args.quiet
    default_format = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"
    try:
        return _dispatch(args, progress)
    except KeyboardInterrupt:
        print("interrupted: finished steps are kept; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as error:  # one clear line for anticipated failures; full trace for bugs
        if isinstance(error, _user_errors()):
            print(f"error: {error}", file=sys.stderr)
            return 2
        if isinstance(error, OSError):
            # Permission denied, disk full, a missing file: name the path, not the stack. Files
            # already written are complete (atomic writes), so a re-run resumes.
            where = f"{error.filename}: " if error.filename else ""
            print(f"error: {where}{error.strerror or error}", file=sys.stderr)
            return 2
        raise
    finally:
        warnings.formatwarning = default_format


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors a user can act on. The weights errors live in the backbone registry, which
    imports Keras: if that module was never loaded, none of its errors can have been raised."""
    from steeldefect.data.dataset import DatasetError

    errors: list[type[BaseException]] = [DatasetError, ValueError]
    backbones = sys.modules.get("steeldefect.models.backbones")
    if backbones is not None:
        errors += [backbones.WeightsMissingError, backbones.WeightsDownloadError]
    return tuple(errors)


def _dispatch(args: argparse.Namespace, progress: bool) -> int:
    if args.command == "serve":
        return _serve(args)
    if args.command == "review":
        return _review(args)
    if args.command == "compare":
        return _compare(args)
    # The pipeline (and with it TensorFlow) is imported by the commands that train, export or
    # evaluate: `data inspect`, `report`, `weights` and `predict` start in a fraction of the time.
    from steeldefect.core.options import (
        EvaluateOptions,
        ExportOptions,
        PredictOptions,
        TrainOptions,
        from_namespace,
    )
    from steeldefect.core.runfolder import default_run_dir

    if args.command == "data":
        from steeldefect.data.inspection import format_inspection, inspect_dataset

        report = inspect_dataset(args.root, test_fraction=args.test_fraction, n_folds=args.n_folds, seed=args.seed)
        print(format_inspection(report))
        return 0
    if args.command == "weights":
        return _weights(args)
    if args.command in ("train", "reproduce") and args.download_weights:
        if _download(args.backbones, progress) != 0:
            return 1
    if args.command in ("train", "reproduce", "export", "evaluate"):
        from steeldefect.study import pipeline
    if args.command == "train":
        out = args.out or default_run_dir(args.command)
        data = args.data[0] if len(args.data) == 1 else args.data  # one root: recorded exactly as before
        pipeline.train(data, out, from_namespace(TrainOptions, args), progress=progress)
        print(f"run folder: {out}")
        _print_deploy(out)
        return 0
    if args.command == "reproduce":
        out = args.out or default_run_dir(args.command)
        export_options = ExportOptions(calibration_samples=args.calibration_samples, int8_guard=args.int8_guard)
        pipeline.reproduce(
            args.data,
            out,
            from_namespace(TrainOptions, args),
            export_options,
            from_namespace(EvaluateOptions, args),
            progress=progress,
        )
        print(f"run folder: {out}")
        _print_deploy(out)
        return 0
    if args.command == "export":
        pipeline.export(args.run, from_namespace(ExportOptions, args), progress=progress)
        print(f"models: {args.run}/*/models")
        _print_deploy(args.run)
        return 0
    if args.command == "evaluate":
        pipeline.evaluate(args.run, from_namespace(EvaluateOptions, args), progress=progress)
        print(f"metrics: {args.run}/tflite_metrics.csv, {args.run}/summary.json")
        return 0
    if args.command == "learning-curve":
        from steeldefect.core.options import LearningCurveOptions
        from steeldefect.study.learningcurve import learning_curve

        namespace = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "class_orders"})
        result = learning_curve(
            args.data,
            args.out,
            from_namespace(LearningCurveOptions, namespace),
            class_orders=[tuple(order) for order in args.class_orders],
            progress=progress,
        )
        print(f"learning curve: {args.out}/learning_curve.csv, {args.out}/learning_curve_summary.csv")
        print(f"report: {result['report']}")
        return 0
    if args.command == "report":
        from steeldefect.study.report import write_report

        path = write_report(args.run)
        print(f"report: {path}")
        return 0
    if args.command == "predict":
        from steeldefect.deploy.batch_io import collect_inputs
        from steeldefect.deploy.predict import format_predictions, predict_paths
        from steeldefect.runtime.backends import is_model_file

        options = from_namespace(PredictOptions, args)
        heatmaps = _explain_target(args.model, options) if options.explain is not None else None
        if isinstance(heatmaps, int):  # refused before any work
            return heatmaps
        if options.out is not None or is_model_file(args.model) or args.model.is_dir():
            status = _predict_archive(args.model, args.paths, options, progress)
        else:
            results = predict_paths(
                args.model, collect_inputs(args.paths), top_k=options.top_k, threads=options.threads, progress=progress
            )
            print(format_predictions(results, options.format))
            status = 1 if any(result.error for result in results) else 0
        if heatmaps is not None:
            status = max(status, _write_heatmaps(*heatmaps, args.model, args.paths, options, progress))
        return status
    raise AssertionError(args.command)


def _explain_target(model: Path, options: PredictOptions) -> tuple[Path, Path] | int:
    """(the .keras model, the heatmap folder) for `predict --explain DIR`, checked before any work:
    a .tflite with no .keras beside it is refused in one line (exit 1), a bad DIR too (exit 2)."""
    from steeldefect.deploy.explain_files import keras_model_for, prepare_out_dir
    from steeldefect.runtime.litert import ModelFileError

    assert options.explain is not None  # called for --explain DIR only
    if options.out is not None:
        raise ValueError("--explain writes heatmaps of the images printed; it does not go with --out")
    try:
        keras_model = keras_model_for(model)
    except ModelFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return keras_model, prepare_out_dir(options.explain)


def _write_heatmaps(
    keras_model: Path,
    out_dir: Path,
    model: Path,
    paths: Sequence[Path],
    options: PredictOptions,
    progress: bool,
) -> int:
    """The heatmap PNGs of `predict --explain`, each of the class printed for its image (MODEL's
    answer, asked again: a LiteRT pass costs little next to the gradients); the summary goes to
    stderr so stdout stays the chosen --format."""
    from steeldefect.deploy.batch_io import collect_inputs
    from steeldefect.deploy.explain import method_for_file
    from steeldefect.deploy.explain_files import explain_paths
    from steeldefect.deploy.predict import predict_paths

    inputs = collect_inputs(paths)
    predictions = predict_paths(model, inputs, top_k=options.top_k, threads=options.threads, accept=options.accept)
    results = explain_paths(
        keras_model,
        inputs,
        out_dir,
        top_k=options.top_k,
        answers=[r.top for r in predictions],
        uncertain=[r.uncertain for r in predictions],
        progress=progress,
    )
    written = sum(1 for result in results if result.png is not None)
    method = method_for_file(keras_model)
    print(f"heatmaps: {written} PNGs in {out_dir} ({method} on {keras_model})", file=sys.stderr)
    return 1 if any(result.error for result in results) else 0


def _print_deploy(run: Path) -> None:
    """The last line of train/export/reproduce: the one model to put on a line."""
    from steeldefect.core.runfolder import deploy_model_path

    for variant in ("int8", "keras"):
        if deploy_model_path(run, variant).is_file():
            print(f"model to deploy: {deploy_model_path(run, variant)}")
            return


def _serve(args: argparse.Namespace) -> int:
    # Dispatched before anything imports TensorFlow: the service needs only LiteRT (memory, start time).
    from steeldefect.core.options import ServeOptions, from_namespace
    from steeldefect.serve.audit import AuditError
    from steeldefect.serve.errors import ServeError
    from steeldefect.serve.runner import mebibytes, serve

    options = from_namespace(ServeOptions, args)
    if options.token:
        logging.getLogger("steeldefect.serve.service").warning(
            "--token on the command line is visible to every user of this machine in the process list: "
            "use --token-file or $STEELDEFECT_TOKEN"
        )
    try:
        serve(
            args.model,
            host=options.host,
            port=options.port,
            workers=options.workers or None,
            threads=options.threads,
            token=options.token,
            token_file=options.token_file,
            tls_cert=options.tls_cert,
            tls_key=options.tls_key,
            insecure=options.insecure,
            audit_path=None if options.no_audit else options.audit,
            audit_keep=options.audit_keep,
            audit_fsync=options.audit_fsync,
            max_upload_bytes=mebibytes(options.max_upload_mb),
            top_k_default=options.top_k,
            queue_size=options.queue,
            accept=options.accept,
            max_pixels=options.max_pixels,
            review_dir=options.review,
            review_sample=options.review_sample,
            review_max_bytes=None if options.review_max_mb is None else mebibytes(options.review_max_mb),
            models_dir=options.models_dir,
            max_model_bytes=mebibytes(options.max_model_mb),
            drift_window=options.drift_window,
        )
    except (ServeError, AuditError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _compare(args: argparse.Namespace) -> int:
    """`compare`: the figures and the verdict line on stdout. Exit 0 either way: the verdict is an
    answer, not a failure (scripts read the last line, or compare.json's "verdict")."""
    from steeldefect.core.options import CompareOptions, from_namespace
    from steeldefect.runtime.litert import ModelFileError
    from steeldefect.study.compare import compare_models, format_comparison

    options = from_namespace(CompareOptions, args)
    try:
        result = compare_models(
            args.old,
            args.new,
            args.data,
            out=options.out,
            alpha=options.alpha,
            max_recall_drop=options.max_recall_drop,
            threads=options.threads or None,
            accept=options.accept,
            progress=not args.quiet,
        )
    except ModelFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_comparison(result))
    if options.out is not None:
        print(f"written: {options.out / 'compare.json'}, {options.out / 'compare.csv'}")
    return 0


def _review(args: argparse.Namespace) -> int:
    """`review export`: the summary and each waiting kind on stdout, each image left out on stderr
    (exit 1 then: the rest is exported, a re-run after fixing it resumes)."""
    from steeldefect.data.reviewexport import export_reviews

    result = export_reviews(args.db, args.out, images=args.images, min_images=args.min_images)
    for line in result.lines():
        print(line)
    print(f"manifest: {args.out / 'manifest.csv'}")
    for problem in result.problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if result.problems else 0


def _predict_archive(model: Path, paths: Sequence[Path], options: PredictOptions, progress: bool) -> int:
    """`predict` on the fast batch path (steeldefect.deploy.batch): to stdout as always, or into --out."""
    from steeldefect.deploy import batch, batch_io, batch_ray

    if options.engine == "ray" and options.out is None:
        raise ValueError("--engine ray writes its results to a file: give --out FILE.parquet")
    if options.address and options.engine != "ray":
        raise ValueError("--address is for --engine ray")
    if model.is_dir():  # a run folder: its model to deploy
        from steeldefect.core.runfolder import deployable_model

        model = deployable_model(model)
    settings: dict[str, Any] = dict(top_k=options.top_k, threads=options.threads, accept=options.accept)
    if options.batch_size is not None:
        settings["batch_size"] = options.batch_size
    if options.out is None:  # today's output, from the fast path
        from tqdm.auto import tqdm

        from steeldefect.deploy.predict import Prediction, format_predictions

        inputs = batch_io.collect_inputs(paths)
        results: list[Prediction] = []
        with tqdm(total=len(inputs), desc="predict", unit="img", disable=not progress) as bar:
            for rows in batch.iter_predictions(model, inputs, workers=options.workers, **settings):
                results.extend(Prediction(Path(row.path), row.top, row.error, row.uncertain) for row in rows)
                bar.update(len(rows))
        print(format_predictions(results, options.format))
        return 1 if any(result.error for result in results) else 0
    try:
        if options.engine == "ray":
            result = batch_ray.score_archive_ray(
                model,
                paths,
                options.out,
                address=options.address,
                actors=options.workers,
                progress=progress,
                **settings,
            )
        else:
            result = batch.score_archive(
                model, paths, options.out, workers=options.workers, progress=progress, **settings
            )
    except batch_ray.RayMissingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"{result.out}: {result.listed} images listed, {result.skipped} already done, {result.scored} scored "
        f"in {result.seconds:.1f} s ({result.images_per_second:.1f} images/s), {result.failed} failed in the output"
    )
    return 1 if result.failed else 0


def _weights(args: argparse.Namespace) -> int:
    from steeldefect.models import backbones

    if args.weights_command == "status":
        rows = backbones.weights_status()
        width = max(len(row.backbone) for row in rows)
        for row in rows:
            print(f"{row.backbone:<{width}}  {row.state:<8}  {row.path}  [{row.source}]")
        return 0 if all(row.state == "present" for row in rows) else 1
    if args.weights_command == "download":
        return _download(args.names, progress=not args.quiet)
    outcomes = backbones.install_weights(args.folder)
    for filename, outcome in outcomes:
        print(f"{filename}: {outcome}")
    return 1 if any(outcome.startswith("refused") for _, outcome in outcomes) else 0


def _download(names: Sequence[str], progress: bool) -> int:
    """Download, print one line per file; non-zero when any file was refused or failed."""
    from steeldefect.models import backbones

    outcomes = backbones.download_weights(names, progress=progress)
    for filename, outcome in outcomes:
        print(f"{filename}: {outcome}")
    failed = [f"{filename}: {outcome}" for filename, outcome in outcomes if outcome.startswith(("refused", "failed"))]
    for line in failed:
        print(f"error: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
