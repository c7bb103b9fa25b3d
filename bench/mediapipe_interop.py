"""Do other runtimes read our model files the same way? MediaPipe Tasks' ImageClassifier vs `predict`.

Figures: docs/results.md, "MediaPipe interoperability"; docs/model-outputs.md (heads of every model).

Usage (from the repository root)::

    python bench/mediapipe_interop.py RUN [--models-of 0 1 2 final | all] [--variants fp32 fp16 int8 int8-mixed]
                                          [--models DIR] [--exported] [--out FILE.json]

Exports the chosen models of RUN's first trained backbone again (fold numbers, or ``final``: the
model `export` puts in RUN/deploy/, with its texture-statistics output and uncertainty rule), as the
export stage does (calibration images from the training split, metadata embedded), into ``--models``
(a temporary folder by default: RUN is only read). Then, on every test image of RUN's split, names
the top-1 class twice: with `steeldefect predict`'s code path (the model file alone, no sidecar) and
with MediaPipe's ``ImageClassifier`` the way MediaPipe's own examples read it,
``result.classifications[0].categories[0]``; MediaPipe knows the model only from its TFLite Model
Metadata and decodes and resizes the original image itself. Prints and saves (``--out``, default
``RUN/mediapipe_interop.json``) per model and variant the agreement, each side's accuracy and the
heads MediaPipe reports, with the CPU, library versions and git commit.

``--exported``: read the files `export` wrote into RUN (each copied alone, without its sidecar, into
the temporary folder) instead of exporting again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import numpy as np

from steeldefect.core.cpuinfo import cpu_description, int8_features
from steeldefect.core.files import read_json, write_json

VARIANTS = ("fp32", "fp16", "int8", "int8-mixed")


def export_fold(
    run: Path,
    fold: int | str,
    variants: Sequence[str],
    out_dir: Path,
    backbone: str | None = None,
    *,
    loaded=None,
    calibration_samples: int = 200,
):
    """Fold ``fold`` (or ``"final"``, the deploy model) of RUN exported to ``out_dir`` as the export
    stage does, with embedded metadata; the final model with its texture output and uncertainty rule
    when the run recorded out-of-fold probabilities. ``loaded``: ``load_run_data(RUN)``, if at hand.

    Returns ({variant: path}, prepared run data).
    """
    import keras

    from steeldefect.core.runfolder import FINAL, fold_model_path
    from steeldefect.deploy import export as export_stage
    from steeldefect.models.conversion import QUANTIZED_VARIANTS
    from steeldefect.runtime.modelfile import sidecar_path
    from steeldefect.study.rundata import load_run_data, trained_backbones
    from steeldefect.study.trust import read_oof_probabilities

    backbone = backbone or trained_backbones(run)[0]
    prepared, options = loaded or load_run_data(run, progress=False)
    calibration = export_stage.calibration_indices(
        prepared.dataset.labels, prepared.splits.train_indices, calibration_samples, seed=options.seed
    )
    source = fold_model_path(run, backbone, fold, "keras")
    keras.backend.clear_session()  # as the export stage: tensor names independent of earlier models
    model = keras.models.load_model(source)
    rule_data, channels = None, ()
    oof = read_oof_probabilities(run, backbone, len(prepared.dataset.labels)) if fold == FINAL else None
    if oof is not None:
        extended = export_stage.with_texture_output(model)
        if extended is not None:
            model, channels = extended, export_stage.texture_channels(model)
            rule_data = export_stage.RuleData(prepared.images, prepared.dataset.labels, prepared.splits.folds, oof)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    # int8 first: int8-mixed reuses its full-integer conversion, as in the export stage.
    for variant in sorted(variants, key=lambda v: (v != "int8", VARIANTS.index(v))):
        meta = read_json(sidecar_path(source)) | {"variant": variant, "verified": None}
        if variant in QUANTIZED_VARIANTS:
            meta["calibration"] = {"samples": len(calibration), "split": "train", "file": "calibration.csv"}
        meta["provenance"] = export_stage.provenance(run, backbone, fold)
        int8 = paths["int8"].read_bytes() if variant == "int8-mixed" and "int8" in paths else None
        stem = fold if fold == FINAL else f"fold{fold}"
        paths[variant] = export_stage.export_model(
            model,
            variant,
            out_dir / f"{stem}.{variant}.tflite",
            prepared.images[calibration] if variant in QUANTIZED_VARIANTS else None,
            int8_flatbuffer=int8,
            metadata=meta,
            rule_data=rule_data,
            channels=channels,
        )
    return {variant: paths[variant] for variant in variants}, prepared


def copy_exported(run: Path, fold: int | str, variants: Sequence[str], out_dir: Path) -> dict[str, Path]:
    """RUN's own exported files of ``fold``, each copied alone (no sidecar) into ``out_dir``."""
    import shutil

    from steeldefect.core.runfolder import fold_model_path
    from steeldefect.study.rundata import trained_backbones

    backbone = trained_backbones(run)[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for variant in variants:
        source = fold_model_path(run, backbone, fold, variant)
        if source.is_file():
            paths[variant] = Path(shutil.copyfile(source, out_dir / source.name))
    return paths


def mediapipe_top1(
    model_path: Path, image_paths: Sequence[Path], input_size: tuple[int, int] | None = None
) -> tuple[list[str | None], list[list]]:
    """MediaPipe ImageClassifier's answer for each image (decoded to RGB, original size, which
    MediaPipe resizes itself; or ``input_size``: the pixels `predict` prepares), read as its
    examples read it: the top category of ``classifications[0]``. Also each image's heads, as
    (head_index, head_name, number of categories reported)."""
    import mediapipe as mp
    from mediapipe.tasks.python.core.base_options import BaseOptions
    from mediapipe.tasks.python.vision import ImageClassifier, ImageClassifierOptions
    from PIL import Image

    from steeldefect.data.decode import read_image

    options = ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(model_path)), max_results=1)
    names, heads = [], []
    with ImageClassifier.create_from_options(options) as classifier:
        for path in image_paths:
            if input_size is not None:
                pixels = np.ascontiguousarray(read_image(path, input_size))
            else:
                with Image.open(path) as image:
                    pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
            result = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=pixels))
            first = result.classifications[0]
            names.append(first.categories[0].category_name if first.categories else None)
            heads.append([(c.head_index, c.head_name, len(c.categories)) for c in result.classifications])
    return names, heads


def compare(
    model_path: Path, image_paths: Sequence[Path], true_names: Sequence[str], *, same_pixels: bool = False
) -> dict:
    """Top-1 agreement between `predict` and MediaPipe, and each one's accuracy, on ``image_paths``.
    ``same_pixels``: MediaPipe gets the resized pixels `predict` classifies, not the image to resize
    itself, so only the reading of the model file differs."""
    from steeldefect.deploy.predict import predict_paths
    from steeldefect.runtime.modelfile import read_model_info

    ours = [result.top[0][0] if result.top else None for result in predict_paths(model_path, image_paths, threads=1)]
    size = read_model_info(model_path).input_size if same_pixels else None
    theirs, heads = mediapipe_top1(model_path, image_paths, size)
    n = len(image_paths)
    agree = sum(a == b for a, b in zip(ours, theirs))
    return {
        "model": str(model_path),
        "n_images": n,
        "agreement": agree / n,
        "n_disagree": n - agree,
        "disagreements": [
            {"file": str(p), "steeldefect": a, "mediapipe": b} for p, a, b in zip(image_paths, ours, theirs) if a != b
        ],
        "accuracy_steeldefect": sum(a == t for a, t in zip(ours, true_names)) / n,
        "accuracy_mediapipe": sum(b == t for b, t in zip(theirs, true_names)) / n,
        "mediapipe_labels": sorted({name for name in theirs if name is not None}, key=str),
        # Each distinct head layout seen: [[head_index, head_name, categories reported], ...].
        "mediapipe_heads": sorted({tuple(map(tuple, image_heads)) for image_heads in heads}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument(
        "--models-of", nargs="+", default=["0"], help="fold numbers and/or 'final' (the deploy model), or 'all'"
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--models", type=Path, default=None, help="where to export (default: a temporary folder)")
    parser.add_argument(
        "--exported", action="store_true", help="read the files `export` wrote into RUN instead of exporting again"
    )
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default RUN/mediapipe_interop.json)")
    args = parser.parse_args(argv)
    from steeldefect.core.runfolder import source_revision

    print(f"cpu:      {cpu_description()}, int8 dot: {', '.join(int8_features()) or 'none'}")
    versions = {name: version(name) for name in ("mediapipe", "ai-edge-litert", "tensorflow-cpu", "numpy")}
    print("versions: " + ", ".join(f"{name} {value}" for name, value in versions.items()))
    from steeldefect.core.runfolder import FINAL
    from steeldefect.study.rundata import load_run_data

    loaded = load_run_data(args.run, progress=False)
    prepared = loaded[0]
    wanted = args.models_of
    if wanted == ["all"]:
        wanted = [*map(str, range(len(prepared.splits.folds))), FINAL]
    folds = [FINAL if name == FINAL else int(name) for name in wanted]
    test = prepared.splits.test_indices
    images = [prepared.dataset.paths[i] for i in test]
    truth = [prepared.dataset.class_names[label] for label in prepared.dataset.labels[test]]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="interop-") as temporary:
        models_dir = args.models or Path(temporary)
        header = f"{'model':<6} {'variant':<11} {'images':>6} {'agreement':>9} {'differ':>6} {'acc ours':>8}"
        print(header + f" {'acc mediapipe':>13}  heads (name: categories)")
        for fold in folds:
            started = time.perf_counter()
            if args.exported:
                paths = copy_exported(args.run, fold, args.variants, models_dir)
            else:
                paths, _ = export_fold(args.run, fold, args.variants, models_dir, loaded=loaded)
                print(f"exported {fold} ({', '.join(args.variants)}) in {time.perf_counter() - started:.0f} s")
            for variant, path in paths.items():
                result = compare(path, images, truth)
                results[f"{fold}/{variant}"] = result
                heads = "; ".join(
                    ", ".join(f"{name}: {count}" for _, name, count in layout) for layout in result["mediapipe_heads"]
                )
                print(
                    f"{fold!s:<6} {variant:<11} {result['n_images']:>6} {100 * result['agreement']:>8.2f}% "
                    f"{result['n_disagree']:>6} {100 * result['accuracy_steeldefect']:>7.2f}% "
                    f"{100 * result['accuracy_mediapipe']:>12.2f}%  {heads}"
                )
    record = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "run": str(args.run),
        "models_of": [str(fold) for fold in folds],
        "exported_again": not args.exported,
        "cpu": cpu_description(),
        "int8_features": int8_features(),
        "threads": 1,
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "versions": versions,
        "source": source_revision(),
        "results": results,
    }
    out = args.out or Path(args.run) / "mediapipe_interop.json"
    write_json(out, record)
    print(f"saved {out}")
    print(json.dumps({key: round(r["agreement"], 4) for key, r in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
