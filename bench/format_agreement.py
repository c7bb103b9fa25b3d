"""Top-1 agreement of the ONNX Runtime and OpenVINO models with the LiteRT ones, and each model's test
accuracy, per fold model, on the test split of a run exported in every format.

Usage (from the repository root)::

    python bench/format_agreement.py --run RUN

The run must have been exported with ``--variants fp32 int8 --formats tflite onnx openvino`` (and
``--int8-weights``, recorded in the results).
For every fold model and the final model, each format's fp32 is compared with LiteRT fp32 and each
int8 with LiteRT int8, image by image. The accuracy of each (format, variant) is the mean over the
fold models, as `evaluate` reports it. The same checks, with their thresholds, are
tests/integration/test_formats_neu.py. Prints a table and saves JSON (bench/results/format_agreement.json).
Figures: docs/formats.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import benchio
from steeldefect.core import runfolder
from steeldefect.runtime.backends import read_embedded
from steeldefect.runtime.modelfile import Classifier
from steeldefect.study import pipeline

FORMATS = ("tflite", "onnx", "openvino")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    prepared, _ = pipeline.load_run_data(args.run, progress=False)
    test = prepared.splits.test_indices
    images, labels = prepared.images[test], prepared.dataset.labels[test]
    # Every model exported in all six forms so far (an export still running may not have them all).
    models = [
        fold
        for fold in [*range(len(prepared.splits.folds)), runfolder.FINAL]
        if all(
            runfolder.fold_model_path(args.run, args.backbone, fold, variant, fmt).is_file()
            for fmt in FORMATS
            for variant in ("fp32", "int8")
        )
    ]
    top1 = {}
    for fold in models:
        for fmt in FORMATS:
            for variant in ("fp32", "int8"):
                path = runfolder.fold_model_path(args.run, args.backbone, fold, variant, fmt)
                top1[fold, fmt, variant] = Classifier(path, threads=2).probabilities(images).argmax(axis=1)
    rows = {}
    print(f"{len(images)} test images; models: {', '.join(map(str, models))}\n")
    print(f"{'format':<10} {'variant':<7} {'agree w/ LiteRT':>16} {'disagreeing':>12} {'accuracy (folds)':>17}")
    for fmt in FORMATS:
        for variant in ("fp32", "int8"):
            same = np.concatenate([top1[f, fmt, variant] == top1[f, "tflite", variant] for f in models])
            accuracy = [100 * float(np.mean(top1[f, fmt, variant] == labels)) for f in models if f != runfolder.FINAL]
            rows[f"{fmt}-{variant}"] = {
                "agreement_with_litert": round(float(same.mean()), 5),
                "disagreeing_images": int((~same).sum()),
                "compared_images": int(same.size),
                "accuracy_per_fold": [round(a, 2) for a in accuracy],
                "accuracy_mean": round(float(np.mean(accuracy)), 2),
                "models": [str(f) for f in models],
            }
            row = rows[f"{fmt}-{variant}"]
            print(
                f"{fmt:<10} {variant:<7} {100 * row['agreement_with_litert']:15.2f}% "
                f"{row['disagreeing_images']:>5}/{row['compared_images']:<6} {row['accuracy_mean']:16.2f}%"
            )
    for fmt in FORMATS:
        gap = rows[f"{fmt}-fp32"]["accuracy_mean"] - rows[f"{fmt}-int8"]["accuracy_mean"]
        rows[f"{fmt}-int8"]["points_below_own_fp32"] = round(gap, 2)
        print(f"{fmt}: int8 {gap:+.2f} points below its own fp32 (mean over the fold models)")
    # Which int8 weights the ONNX/OpenVINO files carry (`export --int8-weights`): the agreement depends on them.
    description, _ = read_embedded(runfolder.fold_model_path(args.run, args.backbone, models[-1], "int8", "onnx"))
    int8_weights = (description or {}).get("int8_weights", "portable")
    print(f"ONNX/OpenVINO int8 weights: {int8_weights}")
    result = {"run": str(args.run), "test_images": len(images), "int8_weights": int8_weights, "rows": rows}
    benchio.save("format_agreement", result, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
