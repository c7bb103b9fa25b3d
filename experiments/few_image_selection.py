"""Few-image features, compared on images that are not the test split: is `multilayer + dihedral` chosen fairly?

Figures: docs/design-notes.md, "Few-image features" (an experiment: moved from bench/).

Usage (from the repository root)::

    python experiments/few_image_selection.py --data ../shared/data/NEU-DET/IMAGES [--per-class 5 10 20] [--draws 5]

The learning curve's figures are on the fixed 270-image test split, and the multi-layer features were
picked after trying variants on it. This bench repeats the comparison without the test split: each
draw samples n images per class from the training pool (another seed than the learning curve's) and
scores the head on every other pool image. Compared, with the learning curve's head and steps:
the last map's channel means (1,280 values) and the five-layer vector (4,736), each without and with
the 7 exact flips/rotations of the sampled images as extra rows. Prints and saves mean ± std accuracy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

# benchio (and the benches this one shares code with) stay in bench/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import benchio
from steeldefect.core.files import default_cache_dir
from steeldefect.core.options import DIHEDRAL_VIEWS, LearningCurveOptions
from steeldefect.models import backbones, training
from steeldefect.models.augfeatures import augmented_features
from steeldefect.models.features import cached_features
from steeldefect.study import learningcurve, learningcurve_points, rundata

SELECTION_SEED = 7  # not the learning curve's 42: other samples than its draws


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--per-class", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    options = LearningCurveOptions()
    cache_dir = default_cache_dir()
    prepared = rundata.load_data(args.data, options, progress=False)
    labels = np.asarray(prepared.dataset.labels)
    pool = prepared.splits.train_indices
    name = options.backbone
    weights_key = backbones.cache_weights_id(name, options.weights, options.seed)
    get_maps = backbones.backbone_factory(
        name, weights=options.weights, preprocessing=options.preprocessing, seed=options.seed, image_size=(224, 224)
    )
    settings = dict(
        dataset_fingerprint=prepared.fingerprint,
        weights_id=weights_key,
        preprocessing=options.preprocessing,
        cache_dir=cache_dir,
        progress=True,
    )
    maps, _, _ = cached_features(get_maps, prepared.images, backbone=name, **settings)
    pooled = maps.mean(axis=(1, 2))
    del maps
    pooled_views = augmented_features(
        get_maps,
        prepared.images,
        pool,
        k=DIHEDRAL_VIEWS,
        seed=options.seed,
        pooled=True,
        views="dihedral",
        backbone=name,
        **settings,
    )
    multilayer, multilayer_views, _ = learningcurve.multilayer_inputs(prepared, pool, options, cache_dir)
    candidates = {
        "last map (1,280)": (pooled, None),
        "last map + dihedral": (pooled, pooled_views),
        "multilayer (4,736)": (multilayer, None),
        "multilayer + dihedral": (multilayer, multilayer_views),
    }
    trainers: dict = {}
    results: dict = {}
    started = time.perf_counter()
    for label, (features, views) in candidates.items():
        results[label] = {}
        for n in args.per_class:
            accuracies = []
            for draw in range(args.draws):
                sample = learningcurve_points.draw_sample(labels, pool, [n] * 6, seed=SELECTION_SEED, draw=draw)
                rest = np.setdiff1d(pool, sample)
                head, _ = learningcurve.fit_head(
                    sample,
                    labels,
                    features,
                    views,
                    trainers,
                    options=options,
                    weight_mode="none",
                    n_classes=6,
                    draw=draw,
                )
                predicted = training.predict_proba(head, features[rest]).argmax(1)
                accuracies.append(100 * float(np.mean(predicted == labels[rest])))
            results[label][str(n)] = {
                "mean": round(float(np.mean(accuracies)), 2),
                "std": round(float(np.std(accuracies)), 2),
            }
        print(
            f"{label:>24}: "
            + "  ".join(f"{n}/class {v['mean']:.2f} ± {v['std']:.2f}" for n, v in results[label].items()),
            flush=True,
        )
    benchio.save(
        "few_image_selection",
        {
            "accuracy_on_the_rest_of_the_pool": results,
            "seed": SELECTION_SEED,
            "draws": args.draws,
            "pool_images": int(len(pool)),
            "seconds": round(time.perf_counter() - started, 1),
        },
        out=args.out,
    )


if __name__ == "__main__":
    main()
