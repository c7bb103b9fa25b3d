"""Pointing game of every model of a run: the five fold models and the deploy model on the test images,
and each fold model on its own validation fold (images it never trained on).

Figures: docs/results.md, "The density's width, and every model of the run".

Usage (from the repository root)::

    python bench/pointing_game_models.py RUN [--boxes DIR] [--smoothing 0,0.25,0.5,0.75,1] [--out FILE.json]

Same protocol as bench/pointing_game.py (images whose boxes cover under half the image, the map's
maximum resized to 200x200 inside a box grown by 15 px), each model's default heatmap
(`steeldefect.deploy.explain.heatmaps`: Grad-CAM, or an attention head's own weights), a shared maximum
scored both at its first pixel and at its centre. The out-of-fold line pools the five fold models'
validation folds: five times the test split's images, so its per-class figures move less by one image.

For an attention head, every ``--smoothing`` value (Gaussian sigma in feature-map cells of the
attention density, `steeldefect.deploy.explain.attention_maps`) is scored, with the head-randomisation
sanity check (median Spearman rank correlation between the trained and the random-head maps) on
each fold's validation images. The value chosen is the one with the best out-of-fold pointing among
those whose sanity correlation stays under 0.5 on every fold (ties: the better weakest class); that
choice uses validation images only, and the test figures of every value are printed beside it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import keras
import numpy as np
from scipy.stats import spearmanr

import benchio
from pointing_game import boxes_folder, filtered_rows, hits
from steeldefect.core.cpuinfo import cpu_description
from steeldefect.core.runfolder import FINAL, fold_model_path
from steeldefect.deploy import explain
from steeldefect.study.rundata import load_run_data

SANITY_LIMIT = 0.5  # issue #14: randomising the head must change the maps (rank correlation < 0.5)
TIES = ("first", "centre")


def scores(hit: np.ndarray, labels: np.ndarray, names) -> dict:
    per_class = {name: round(float(hit[labels == c].mean()), 3) for c, name in enumerate(names) if (labels == c).any()}
    return {"overall": round(float(hit.mean()), 3), "per_class": per_class, "lowest": min(per_class.values())}


def median_spearman(maps: np.ndarray, other: np.ndarray) -> float:
    rhos = [spearmanr(a.ravel(), b.ravel()).statistic for a, b in zip(maps, other)]
    return float(np.median(np.nan_to_num(np.array(rhos, dtype=float))))


def choose(entries: dict[float, dict]) -> float | None:
    """The smoothing with the best out-of-fold overall pointing (then the better weakest class) among
    those whose sanity correlation is under SANITY_LIMIT on every fold; None when none is."""
    passing = [s for s, e in entries.items() if max(e["sanity_median_spearman"].values()) < SANITY_LIMIT]
    if not passing:
        return None
    oof = {s: entries[s]["out_of_fold"]["centre"] for s in passing}
    return max(passing, key=lambda s: (oof[s]["overall"], oof[s]["lowest"]))


def smoothings(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers >= 0, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--boxes", type=Path, default=None, help="Pascal VOC box folder (default: as pointing_game.py)")
    parser.add_argument(
        "--smoothing",
        type=smoothings,
        default=None,
        metavar="S[,S]",
        help="attention density sigmas in cells to compare (default: the package's, "
        f"{explain.ATTENTION_SMOOTHING}); ignored for Grad-CAM models",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench/pointing_game_models.json"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    prepared, _ = load_run_data(args.run, progress=False)
    dataset, names = prepared.dataset, prepared.dataset.class_names
    labels = np.asarray(dataset.labels)
    annotations = boxes_folder(args.run, args.boxes)
    test_rows, test_masks = filtered_rows(prepared.splits.test_indices, dataset, annotations)
    models = [(f"fold{k}", k) for k in range(len(prepared.splits.folds))] + [("deploy", FINAL)]
    print(f"{len(test_rows)} test images with boxes under half the image; boxes from {annotations}")
    values = args.smoothing or [explain.ATTENTION_SMOOTHING]
    entries: dict[float, dict] = {}
    methods = {}

    def entry(sigma: float) -> dict:
        return entries.setdefault(
            sigma, {"test": {}, "sanity_median_spearman": {}, "pooled": {t: [] for t in TIES}, "labels": []}
        )

    for name, fold in models:
        path = fold_model_path(args.run, args.backbone, fold, "keras")
        if not path.is_file():  # a run from before the deploy model existed
            print(f"{name:>7}: {path} not found, skipped")
            continue
        model = keras.models.load_model(path)
        method = methods[name] = explain.default_method(model)
        attention = method == explain.ATTENTION
        # One pass through the model per split: every width is a density of the same upsampled weights
        # (Grad-CAM maps are scored once, as they are: only width 0).
        grid = explain.attention_grid(model) if attention else None
        test_maps = explain.heatmaps(model, prepared.images[test_rows], smoothing=0)
        if fold != FINAL:
            val_rows, val_masks = filtered_rows(prepared.splits.folds[fold][1], dataset, annotations)
            val_images = prepared.images[val_rows]
            val_raw = explain.heatmaps(model, val_images, smoothing=0)
            random_raw = explain.heatmaps(explain.randomize_head(model), val_images, method=method, smoothing=0)
        for sigma in values if attention else [0.0]:
            e = entry(sigma)
            maps = explain.density(test_maps, sigma, grid)
            e["test"][name] = {t: scores(hits(maps, test_masks, tie=t), labels[test_rows], names) for t in TIES}
            if fold != FINAL:
                val_maps = explain.density(val_raw, sigma, grid)
                random_maps = explain.density(random_raw, sigma, grid)
                e["sanity_median_spearman"][name] = round(median_spearman(val_maps, random_maps), 3)
                for tie in TIES:
                    e["pooled"][tie].append(hits(val_maps, val_masks, tie=tie))
                e["labels"].append(labels[val_rows])
            centre = e["test"][name]["centre"]
            print(
                f"{name:>7} smoothing {sigma:g} test: overall {centre['overall']:.3f} (first pixel "
                f"{e['test'][name]['first']['overall']:.3f}), lowest class {centre['lowest']:.2f}; "
                + ", ".join(f"{n} {v:.2f}" for n, v in centre["per_class"].items()),
                flush=True,
            )
    for e in entries.values():
        val_labels = np.concatenate(e.pop("labels"))
        pooled = e.pop("pooled")
        e["out_of_fold"] = {t: scores(np.concatenate(pooled[t]), val_labels, names) for t in TIES}
        e["out_of_fold"]["images"] = int(len(val_labels))
        e["out_of_fold"]["per_class_images"] = {n: int((val_labels == c).sum()) for c, n in enumerate(names)}
    chosen = choose(entries)
    print(
        f"\n{'smoothing':>9}  out-of-fold (overall / lowest class)  sanity rho (max over folds)  "
        "test overall / lowest class"
    )
    for sigma, e in entries.items():
        oof = e["out_of_fold"]["centre"]
        tests = "  ".join(f"{n} {r['centre']['overall']:.3f}/{r['centre']['lowest']:.2f}" for n, r in e["test"].items())
        mark = " <- chosen" if sigma == chosen else ""
        print(
            f"{sigma:>9g}  {oof['overall']:.3f} / {oof['lowest']:.2f} "
            f"({min(oof['per_class'], key=oof['per_class'].get)})   "
            f"{max(e['sanity_median_spearman'].values()):.3f}   {tests}{mark}"
        )
    print(
        f"chosen on out-of-fold validation only: {chosen if chosen is not None else 'none passes the sanity check'}"
        f" (package default {explain.ATTENTION_SMOOTHING}); out-of-fold images: "
        f"{next(iter(entries.values()))['out_of_fold']['images']}"
    )
    print(f"{cpu_description()}; {time.perf_counter() - started:.0f} s")
    benchio.save(
        "pointing_game_models",
        {
            "run": str(args.run),
            "test_images": len(test_rows),
            "methods": methods,
            "sanity_limit": SANITY_LIMIT,
            "package_smoothing": explain.ATTENTION_SMOOTHING,
            "chosen_smoothing": chosen,
            "smoothing": {str(sigma): e for sigma, e in entries.items()},
        },
        out=args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
