"""Do other runtimes read our model files the same way? MediaPipe Tasks' ImageClassifier vs `predict`.

Figures: docs/results.md, "MediaPipe interoperability".

Usage (from the repository root)::

    python bench/mediapipe_interop.py RUN [--fold 0] [--variants fp32 fp16 int8 int8-mixed]
                                          [--models DIR] [--out FILE.json]

Exports fold ``--fold`` of RUN's trained Keras model (the first trained backbone) again, as the
export stage does (calibration images from the training split, metadata embedded), into ``--models``
(a temporary folder by default: RUN is only read). Then, on every test image of RUN's split, names
the top-1 class twice: with `steeldefect predict`'s code path (the model file alone, no sidecar) and
with MediaPipe's ``ImageClassifier``, which knows the model only from its TFLite Model Metadata and
decodes and resizes the original image itself. Prints and saves (``--out``, default
``RUN/mediapipe_interop.json``) the agreement and each side's accuracy per variant, with the CPU,
library versions and git commit.
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


def export_fold(run: Path, fold: int, variants: Sequence[str], out_dir: Path, backbone: str | None = None):
    """Fold ``fold`` of RUN exported to ``out_dir`` as the export stage does, with embedded metadata.

    Returns ({variant: path}, prepared run data).
    """
    import keras

    from steeldefect.core.runfolder import fold_model_path
    from steeldefect.deploy import export as export_stage
    from steeldefect.models.conversion import QUANTIZED_VARIANTS
    from steeldefect.runtime.modelfile import sidecar_path
    from steeldefect.study.rundata import load_run_data, trained_backbones

    backbone = backbone or trained_backbones(run)[0]
    prepared, options = load_run_data(run, progress=False)
    calibration = export_stage.calibration_indices(
        prepared.dataset.labels, prepared.splits.train_indices, 200, seed=options.seed
    )
    source = fold_model_path(run, backbone, fold, "keras")
    model = keras.models.load_model(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    # int8 first: int8-mixed reuses its full-integer conversion, as in the export stage.
    for variant in sorted(variants, key=lambda v: (v != "int8", VARIANTS.index(v))):
        meta = read_json(sidecar_path(source)) | {"variant": variant, "verified": None}
        if variant in QUANTIZED_VARIANTS:
            meta["calibration"] = {"samples": len(calibration), "split": "train", "file": "calibration.csv"}
        meta["provenance"] = export_stage.provenance(run, backbone, fold)
        int8 = paths["int8"].read_bytes() if variant == "int8-mixed" and "int8" in paths else None
        paths[variant] = export_stage.export_model(
            model,
            variant,
            out_dir / f"fold{fold}.{variant}.tflite",
            prepared.images[calibration] if variant in QUANTIZED_VARIANTS else None,
            int8_flatbuffer=int8,
            metadata=meta,
        )
    return {variant: paths[variant] for variant in variants}, prepared


def mediapipe_top1(model_path: Path, image_paths: Sequence[Path]) -> list[str]:
    """MediaPipe ImageClassifier's top-1 class name for each image (decoded to RGB, original size)."""
    import mediapipe as mp
    from mediapipe.tasks.python.core.base_options import BaseOptions
    from mediapipe.tasks.python.vision import ImageClassifier, ImageClassifierOptions
    from PIL import Image

    options = ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(model_path)), max_results=1)
    names = []
    with ImageClassifier.create_from_options(options) as classifier:
        for path in image_paths:
            with Image.open(path) as image:
                pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
            result = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=pixels))
            # A deploy model has a second output (texture statistics, for the uncertainty score):
            # MediaPipe reports it as another head; ours is the one named "probabilities".
            head = next(c for c in result.classifications if c.head_name == "probabilities")
            names.append(head.categories[0].category_name)
    return names


def compare(model_path: Path, image_paths: Sequence[Path], true_names: Sequence[str]) -> dict:
    """Top-1 agreement between `predict` and MediaPipe, and each one's accuracy, on ``image_paths``."""
    from steeldefect.deploy.predict import predict_paths

    ours = [result.top[0][0] if result.top else None for result in predict_paths(model_path, image_paths, threads=1)]
    theirs = mediapipe_top1(model_path, image_paths)
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
        "mediapipe_labels": sorted(set(theirs)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--models", type=Path, default=None, help="where to export (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default RUN/mediapipe_interop.json)")
    args = parser.parse_args(argv)
    from steeldefect.core.runfolder import source_revision

    print(f"cpu:      {cpu_description()}, int8 dot: {', '.join(int8_features()) or 'none'}")
    versions = {name: version(name) for name in ("mediapipe", "ai-edge-litert", "tensorflow-cpu", "numpy")}
    print("versions: " + ", ".join(f"{name} {value}" for name, value in versions.items()))
    with tempfile.TemporaryDirectory(prefix="interop-") as temporary:
        models_dir = args.models or Path(temporary)
        started = time.perf_counter()
        paths, prepared = export_fold(args.run, args.fold, args.variants, models_dir)
        print(f"exported fold {args.fold} ({', '.join(args.variants)}) in {time.perf_counter() - started:.0f} s")
        test = prepared.splits.test_indices
        images = [prepared.dataset.paths[i] for i in test]
        truth = [prepared.dataset.class_names[label] for label in prepared.dataset.labels[test]]
        results = {}
        print(f"{'variant':<11} {'images':>6} {'agreement':>9} {'differ':>6} {'acc ours':>8} {'acc mediapipe':>13}")
        for variant, path in paths.items():
            result = compare(path, images, truth)
            results[variant] = result
            print(
                f"{variant:<11} {result['n_images']:>6} {100 * result['agreement']:>8.2f}% {result['n_disagree']:>6} "
                f"{100 * result['accuracy_steeldefect']:>7.2f}% {100 * result['accuracy_mediapipe']:>12.2f}%"
            )
    record = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "run": str(args.run),
        "fold": args.fold,
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
    print(json.dumps({variant: round(r["agreement"], 4) for variant, r in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
