"""Cached features vs the reference's training loop, timed side by side in one run.

Figures: docs/results.md, "Grid search".

Usage (from the repository root)::

    python bench/grid_search_speed.py [NEU-DET folder] [--backbone mobilenet] [--reference-epochs 3] [--out FILE.json]

The reference trains backbone + head on images, so every epoch of every (rate, fold) cell runs the
frozen backbone again. We run the backbone once per image, then train each head on the cached
features. This bench times, side by side in one run:
  reference: the full model fitted on one fold's training images (the backbone's forward pass is
             the cost); a cell is its first epoch (with tracing) + 14 x the median of the later
             ones, x 3 rates x 5 folds, since every cell costs the same;
  ours:      the real thing, not an extrapolation: one feature extraction over all images, then
             ``training.run_grid`` over every rate and fold (into a temporary folder).
The backbone's weights are random (``weights="none"``): they change no timing, and the official
files are not on every machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

import benchio
from steeldefect.core.cpuinfo import cpu_description
from steeldefect.core.options import HEAD_CHOICES
from steeldefect.data.dataset import scan_dataset
from steeldefect.data.loading import load_images
from steeldefect.data.splits import make_splits
from steeldefect.models import backbones, training
from steeldefect.models.features import extract_features

DEFAULT_NEU_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "NEU-DET"


class EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self.started)

    def on_train_begin(self, logs=None):
        self.times = []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, nargs="?", default=DEFAULT_NEU_DIR)
    parser.add_argument("--backbone", default="mobilenet")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument(
        "--reference-epochs", type=int, default=3, help="epochs actually timed for the reference way (>= 2)"
    )
    parser.add_argument("--rates", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--head", choices=HEAD_CHOICES, default="flatten")
    parser.add_argument(
        "--out", type=Path, default=benchio.RESULTS_DIR / "grid_search_speed.json", help="results JSON file"
    )
    args = parser.parse_args(argv)

    print(f"cpu: {cpu_description()}; threads: TensorFlow default ({os.cpu_count()} cores)")
    dataset = scan_dataset(args.data)
    dataset, images = load_images(dataset, progress=False)
    splits = make_splits(dataset.labels, seed=42, n_folds=args.folds)
    train_idx, val_idx = splits.folds[0]
    n_classes = len(dataset.class_names)
    print(
        f"data: {len(images)} images; one fold trains on {len(train_idx)}; "
        f"backbone {args.backbone} (random weights), {args.head} head"
    )

    # Ours: the backbone once over every image, then every head of the grid on cached features.
    model = backbones.build_backbone(args.backbone, weights="none")
    started = time.perf_counter()
    features = extract_features(model, images, progress=False)
    extraction = time.perf_counter() - started
    rates = list(training.DEFAULT_LEARNING_RATES)[: args.rates]
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        rows = training.run_grid(
            features,
            dataset.labels,
            splits.folds[: args.folds],
            run=Path(scratch),
            backbone=args.backbone,
            n_classes=n_classes,
            learning_rates=rates,
            kind=args.head,
            epochs=args.epochs,
            progress=False,
        )
        heads = time.perf_counter() - started
    cell_times = [row["train_seconds"] for row in rows]

    # Reference: backbone + head trained on images (frozen backbone, so identical maths).
    keras.utils.set_random_seed(42)
    head = training.build_head(model.output_shape[1:], n_classes, kind=args.head)
    full = training.join_model(model, head, "reference_way")
    full.compile(optimizer=keras.optimizers.Adam(1e-4), loss="categorical_crossentropy", metrics=["accuracy"])
    timer = EpochTimer()
    x_train = images[train_idx].astype(np.float32)
    y_train = keras.utils.to_categorical(dataset.labels[train_idx], n_classes)
    x_val = images[val_idx].astype(np.float32)
    y_val = keras.utils.to_categorical(dataset.labels[val_idx], n_classes)
    full.fit(
        x_train,
        y_train,
        batch_size=64,
        epochs=args.reference_epochs,
        validation_data=(x_val, y_val),
        callbacks=[timer],
        verbose=0,
    )
    # Each reference cell is a new model and a new fit, so it pays the first (tracing) epoch once
    # and the steady epoch for the rest.
    first_epoch = timer.times[0]
    per_epoch = float(np.median(timer.times[1:])) if len(timer.times) > 1 else first_epoch
    reference_cell = first_epoch + per_epoch * (args.epochs - 1)

    cells = len(rows)
    ours_grid = extraction + heads
    reference_grid = cells * reference_cell
    head_median = float(np.median(cell_times))
    results = {
        "setup": {
            "backbone": args.backbone,
            "weights": "random",
            "head": args.head,
            "images": len(images),
            "fold_train_images": len(train_idx),
            "epochs": args.epochs,
            "learning_rates": rates,
            "folds": args.folds,
            "reference_epochs_timed": len(timer.times),
        },
        "reference": {
            "first_epoch_s": first_epoch,
            "epoch_s_median": per_epoch,
            "epoch_s": timer.times,
            "cell_s": reference_cell,
            "grid_s": reference_grid,
        },
        "ours": {
            "extraction_s": extraction,
            "heads_s": heads,
            "head_s_median": head_median,
            "first_head_s": cell_times[0],
            "head_s": cell_times,
            "cells": cells,
            "grid_s": ours_grid,
        },
        "speedup": reference_grid / ours_grid,
    }
    print()
    print(
        f"reference epoch (images through backbone + head): {per_epoch:8.1f} s  "
        f"(median of {len(timer.times) - 1} timed; the first, with tracing: {first_epoch:.1f} s)"
    )
    print(
        f"one cell, {args.epochs} epochs   reference: {reference_cell:8.1f} s   ours: head {head_median:5.1f} s"
        f" (median of {cells}; first, with compilation: {cell_times[0]:.1f} s)"
    )
    print(f"ours: one-off extraction {extraction:.1f} s + {cells} heads {heads:.1f} s = {ours_grid:.1f} s")
    print(
        f"full grid {len(rates)} rates x {args.folds} folds   reference: {reference_grid / 60:8.1f} min   "
        f"ours: {ours_grid / 60:6.1f} min   speed-up {reference_grid / ours_grid:5.1f}x"
    )
    benchio.save("grid_search_speed", results, threads=f"TensorFlow default ({os.cpu_count()} cores)", out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
