"""Pointing game of every model of a run: the five fold models and the deploy model on the test images,
and each fold model on its own validation fold (images it never trained on).

Usage (from the repository root)::

    python bench/pointing_game_models.py RUN [--boxes DIR] [--out FILE.json]

Same protocol as bench/pointing_game.py (images whose boxes cover under half the image, the map's
maximum resized to 200x200 inside a box grown by 15 px), each model's default heatmap
(`steeldefect.explain.heatmaps`: Grad-CAM, or an attention head's own weights), a shared maximum
scored both at its first pixel and at its centre. The out-of-fold line pools the five fold models'
validation folds: five times the test split's images, so its per-class figures move less by one image.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import keras
import numpy as np

import benchio
from pointing_game import boxes_folder, filtered_rows, hits
from steeldefect import explain
from steeldefect.cpuinfo import cpu_description
from steeldefect.pipeline import load_run_data
from steeldefect.runfolder import FINAL, fold_model_path


def scores(hit: np.ndarray, labels: np.ndarray, names) -> dict:
    per_class = {name: round(float(hit[labels == c].mean()), 3) for c, name in enumerate(names) if (labels == c).any()}
    return {"overall": round(float(hit.mean()), 3), "per_class": per_class, "lowest": min(per_class.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--boxes", type=Path, default=None, help="Pascal VOC box folder (default: as pointing_game.py)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/pointing_game_models.json"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    prepared, _ = load_run_data(args.run, progress=False)
    dataset, names = prepared.dataset, prepared.dataset.class_names
    labels = np.asarray(dataset.labels)
    annotations = boxes_folder(args.run, args.boxes)
    test_rows, test_masks = filtered_rows(prepared.splits.test_indices, dataset, annotations)
    models = [(f"fold{k}", k) for k in range(len(prepared.splits.folds))] + [("deploy", FINAL)]
    results, pooled = {}, {"first": [], "centre": [], "labels": []}
    print(f"{len(test_rows)} test images with boxes under half the image; boxes from {annotations}")
    for name, fold in models:
        path = fold_model_path(args.run, args.backbone, fold, "keras")
        if not path.is_file():  # a run from before the deploy model existed
            print(f"{name:>7}: {path} not found, skipped")
            continue
        model = keras.models.load_model(path)
        maps = explain.heatmaps(model, prepared.images[test_rows])
        entry = {t: scores(hits(maps, test_masks, tie=t), labels[test_rows], names) for t in ("first", "centre")}
        if fold != FINAL:
            val_rows, val_masks = filtered_rows(prepared.splits.folds[fold][1], dataset, annotations)
            val_maps = explain.heatmaps(model, prepared.images[val_rows])
            for tie in ("first", "centre"):
                pooled[tie].append(hits(val_maps, val_masks, tie=tie))
            pooled["labels"].append(labels[val_rows])
        results[name] = {"method": explain.default_method(model), "test": entry}
        centre = entry["centre"]
        print(
            f"{name:>7} test: overall {centre['overall']:.3f} (first pixel {entry['first']['overall']:.3f}), "
            f"lowest class {centre['lowest']:.2f}; "
            + ", ".join(f"{n} {v:.2f}" for n, v in centre["per_class"].items()),
            flush=True,
        )
    val_labels = np.concatenate(pooled["labels"])
    out_of_fold = {t: scores(np.concatenate(pooled[t]), val_labels, names) for t in ("first", "centre")}
    out_of_fold["images"] = int(len(val_labels))
    out_of_fold["per_class_images"] = {n: int((val_labels == c).sum()) for c, n in enumerate(names)}
    centre = out_of_fold["centre"]
    print(
        f"out-of-fold validation, {len(val_labels)} images: overall {centre['overall']:.3f}, lowest class "
        f"{centre['lowest']:.2f}; " + ", ".join(f"{n} {v:.2f}" for n, v in centre["per_class"].items())
    )
    print(f"{cpu_description()}; {time.perf_counter() - started:.0f} s")
    benchio.save(
        "pointing_game_models",
        {"run": str(args.run), "test_images": len(test_rows), "models": results, "out_of_fold": out_of_fold},
        out=args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
