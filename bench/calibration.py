"""Temperature scaling of a run's fold models: fitted on out-of-fold validation predictions, judged on test.

Figures: docs/results.md, "Calibration".

Usage (from the repository root)::

    python bench/calibration.py RUN [--out FILE.json] [--plot FILE.png]

The grid's fold heads of the best rate score their own validation folds (out-of-fold: every training
image once, never a test image); one temperature is fitted on those. Each fold model's test-split
probabilities are then reported before and after: ECE (15 bins), NLL and accuracy (unchanged by
construction), and a reliability diagram of the pooled test predictions is written.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import benchio
from steeldefect.core.cpuinfo import cpu_description
from steeldefect.core.files import read_json
from steeldefect.core.runfolder import backbone_dir
from steeldefect.models.backbones import build_backbone, weights_id
from steeldefect.models.features import cached_features
from steeldefect.models.training import GridCell, load_head, out_of_fold_probabilities, predict_proba
from steeldefect.runtime import calibration
from steeldefect.study.rundata import load_run_data

BACKBONE = "efficientnet_lite0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/calibration.json"))
    parser.add_argument("--plot", type=Path, default=Path("runs/bench/reliability.png"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    prepared, options = load_run_data(args.run, progress=False)
    splits, labels = prepared.splits, prepared.dataset.labels
    summary = read_json(args.run / "summary.json")["backbones"][BACKBONE]
    rate, kind = float(summary["best_learning_rate"]), summary["head"]
    features, _, _ = cached_features(
        lambda: build_backbone(BACKBONE),
        prepared.images,
        dataset_fingerprint=prepared.fingerprint,
        backbone=BACKBONE,
        weights_id=weights_id(BACKBONE, "imagenet"),
        preprocessing=options.preprocessing,
        cache_dir=Path(options.cache_dir),
    )
    n_classes = len(prepared.dataset.class_names)
    heads = [
        load_head(
            backbone_dir(args.run, BACKBONE) / "grid" / GridCell(rate, k).folder, features.shape[1:], n_classes, kind
        )
        for k in range(len(splits.folds))
    ]
    indices, oof = out_of_fold_probabilities(heads, features, splits.folds)
    fitted = calibration.fit_calibration(oof, labels[indices], val_indices=indices, test_indices=splits.test_indices)
    test, y = splits.test_indices, labels[splits.test_indices]
    per_model = []
    before_all, after_all = [], []
    for k, head in enumerate(heads):
        p = predict_proba(head, features[test])
        q = calibration.apply_temperature(p, fitted["temperature"])
        before_all.append(p)
        after_all.append(q)
        per_model.append(
            {
                "fold": k,
                "accuracy": float((p.argmax(1) == y).mean()),
                "ece_before": calibration.expected_calibration_error(p, y),
                "ece_after": calibration.expected_calibration_error(q, y),
                "nll_before": calibration.negative_log_likelihood(p, y),
                "nll_after": calibration.negative_log_likelihood(q, y),
            }
        )
    mean = {key: float(np.mean([m[key] for m in per_model])) for key in per_model[0] if key != "fold"}
    calibration.reliability_diagram(
        {
            "uncalibrated": (np.concatenate(before_all), np.tile(y, len(heads))),
            f"temperature {fitted['temperature']:.2f}": (np.concatenate(after_all), np.tile(y, len(heads))),
        },
        args.plot,
        title=f"Test split, {len(heads)} fold models, {len(test)} images each",
    )
    print(
        f"temperature {fitted['temperature']:.3f} fitted on {fitted['n']} out-of-fold validation predictions "
        f"(validation NLL {fitted['nll_before']:.4f} -> {fitted['nll_after']:.4f})"
    )
    print(f"{'fold':>4s} {'accuracy':>8s} {'ECE before':>10s} {'ECE after':>9s} {'NLL before':>10s} {'NLL after':>9s}")
    for m in [*per_model, {"fold": "mean", **mean}]:
        print(
            f"{m['fold']!s:>4s} {100 * m['accuracy']:7.2f}% {100 * m['ece_before']:9.2f}% {100 * m['ece_after']:8.2f}% "
            f"{m['nll_before']:10.4f} {m['nll_after']:9.4f}"
        )
    print(f"reliability diagram: {args.plot}\n{cpu_description()}; {time.perf_counter() - started:.0f} s")
    benchio.save(
        "calibration",
        {
            "fit": fitted,
            "test_per_model": per_model,
            "test_mean": mean,
            "plot": str(args.plot),
        },
        out=args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
