"""Leave-one-class-out, texture-score variants: the search behind the per-class texture score.

Figures: docs/design-notes.md, "The uncertainty rule" (an experiment: moved from bench/).

Usage (from the repository root; run bench/ood_leave_one_class_out.py RUN first, it caches what this
reads)::

    python experiments/ood_texture_variants.py RUN [--out FILE.json]

Same protocol as ``bench/ood_leave_one_class_out.py`` (each NEU class held out in turn; every score fitted
on the five known classes' training images; threshold = 99th percentile of out-of-fold scores; known and
unknown TEST images scored), restricted to scores a deployed model can compute from what it already
outputs: the 848 texture statistics and the head's probabilities. It reads the texture statistics and the
held-out heads' outputs that the main bench cached (so the heads are the same ones), and iterates in
NumPy: tied Mahalanobis at several PCA sizes, per-layer Mahalanobis combined by max or mean rank,
per-class (QDA-like) covariances, a per-class rank of the tied score, k-NN distances, and max-rank
combinations with each other and with the max-softmax score.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

# benchio (and the benches this one shares code with) stay in bench/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import benchio
from steeldefect.core.cpuinfo import cpu_description
from steeldefect.core.files import read_json
from steeldefect.core.runfolder import dataset_path, splits_path
from steeldefect.data.dataset import scan_dataset
from steeldefect.data.splits import read_splits_csv
from steeldefect.runtime import uncertainty
from steeldefect.study.rundata import run_train_options

BACKBONE = "efficientnet_lite0"
CHANNELS = (40, 80, 112, 192)  # of uncertainty.TEXTURE_LAYERS in Lite0

Fit = Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], np.ndarray]]


def mahalanobis(n: int, class_covariance: float = 0.0) -> Fit:
    def fit(x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        return uncertainty.OODScorer(n, class_covariance=class_covariance).fit(x, y).score

    return fit


def knn(k: int, metric: str = "cosine", whiten: int | None = None) -> Fit:
    """Distance to the k-th nearest training image; optionally after PCA to ``whiten`` unit-variance components."""

    def fit(x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        def transform(a: np.ndarray) -> np.ndarray:
            return a

        if whiten:
            center = x.mean(0)
            projection = np.linalg.svd(x - center, full_matrices=False)[2][:whiten].T
            scale = ((x - center) @ projection).std(0)

            def transform(a: np.ndarray) -> np.ndarray:
                return (a - center) @ projection / scale

        bank = transform(x)
        if metric == "cosine":
            bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)

        def score(q: np.ndarray) -> np.ndarray:
            q = transform(q)
            if metric == "cosine":
                distance = 1 - (q / np.linalg.norm(q, axis=1, keepdims=True)) @ bank.T
            else:
                distance = (q**2).sum(1)[:, None] + (bank**2).sum(1)[None] - 2 * q @ bank.T
            return np.sort(distance, axis=1)[:, k - 1]

        return score

    return fit


def rank(reference: np.ndarray, scores: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.sort(reference), scores, side="left") / len(reference)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/ood_texture_variants.json"))
    args = parser.parse_args(argv)
    started = time.perf_counter()

    data, options = run_train_options(args.run)
    dataset = scan_dataset(data)
    splits = read_splits_csv(splits_path(args.run), dataset)
    fingerprint = read_json(dataset_path(args.run))["fingerprint"]
    cache = Path(options.cache_dir) / "ood"
    texture_path = cache / f"{BACKBONE}-texture-{fingerprint[:16]}.npy"
    heads_path = next(cache.glob(f"{BACKBONE}-loco-heads-{fingerprint[:16]}-*.npz"), None)
    if not texture_path.is_file() or heads_path is None:
        raise SystemExit(f"{cache}: no cached texture statistics / head outputs; run bench/ood_leave_one_class_out.py")
    raw = np.load(texture_path).astype(np.float64)
    with np.load(heads_path) as archive:
        heads = {key: archive[key] for key in archive.files}
    labels, test, names = dataset.labels, splits.test_indices, dataset.class_names
    fold_of = np.full(len(labels), -1)
    for k, (_, val) in enumerate(splits.folds):
        fold_of[val] = k
    texture = uncertainty.texture_features(raw, CHANNELS)
    offsets = np.cumsum([0, *(2 * c for c in CHANNELS)])
    layers = [uncertainty.texture_features(raw[:, a:b], [c]) for a, b, c in zip(offsets, offsets[1:], CHANNELS)]

    cases = []  # per held-out class: rows and the head's outputs
    for unknown, name in enumerate(names):
        train = np.where((labels != unknown) & (fold_of >= 0))[0]
        known_test = test[labels[test] != unknown]
        remap = np.full(len(names), -1)
        remap[[c for c in range(len(names)) if c != unknown]] = np.arange(len(names) - 1)
        cases.append(
            {
                "train": train,
                "folds": [(train[fold_of[train] != k], train[fold_of[train] == k]) for k in range(len(splits.folds))],
                "known_test": known_test,
                "unknown_test": test[labels[test] == unknown],
                "correct": heads[f"{name}/predicted"] == remap[labels[known_test]],
                "msp": (heads[f"{name}/msp_oof"], heads[f"{name}/msp_k"], heads[f"{name}/msp_u"]),
            }
        )

    def component(features: np.ndarray, fit: Fit) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(out-of-fold reference, known test, unknown test) scores per held-out class."""
        out = []
        for case in cases:
            reference = np.concatenate([fit(features[f], labels[f])(features[v]) for f, v in case["folds"]])
            score = fit(features[case["train"]], labels[case["train"]])
            out.append((reference, score(features[case["known_test"]]), score(features[case["unknown_test"]])))
        return out

    def combine(parts: list, how: str = "max") -> list:
        out = []
        for u in range(len(cases)):
            ranked = [[rank(p[u][0], p[u][i]) for p in parts] for i in range(3)]
            out.append(tuple((np.max if how == "max" else np.mean)(r, axis=0) for r in ranked))
        return out

    results = {}

    def evaluate(name: str, scored: list) -> None:
        aurocs, flagged, known_flagged, accuracy = [], [], [], []
        for case, (reference, known, unknown) in zip(cases, scored):
            threshold = uncertainty.choose_threshold(reference)
            truth = np.r_[np.zeros(len(known)), np.ones(len(unknown))]
            aurocs.append(float(roc_auc_score(truth, np.r_[known, unknown])))
            flagged.append(float((unknown > threshold).mean()))
            known_flagged.append(float((known > threshold).mean()))
            accuracy.append(float(case["correct"][known <= threshold].mean()))
        results[name] = {
            "auroc": float(np.mean(aurocs)),
            "min_auroc": float(np.min(aurocs)),
            "unknown_flagged": float(np.mean(flagged)),
            "known_flagged": float(np.mean(known_flagged)),
            "accuracy_accepted_known": float(np.mean(accuracy)),
            "per_class": {n: {"auroc": a, "unknown_flagged": f} for n, a, f in zip(names, aurocs, flagged)},
        }
        r = results[name]
        print(
            f"{name:44s} {r['auroc']:.3f} {r['min_auroc']:.3f} {100 * r['unknown_flagged']:5.1f}% "
            f"{100 * r['known_flagged']:4.1f}% {100 * r['accuracy_accepted_known']:6.2f}%  "
            + " ".join(f"{a:.3f}/{100 * f:3.0f}" for a, f in zip(aurocs, flagged)),
            flush=True,
        )

    print(f"{'variant':44s} AUROC   min  flagged known acc.accepted  per class AUROC/% flagged ({', '.join(names)})")
    msp = [case["msp"] for case in cases]
    evaluate("max softmax", msp)
    c = {}
    for n in (32, 64, 128):
        c[f"tied{n}"] = component(texture, mahalanobis(n))
        evaluate(f"tied Mahalanobis, PCA {n}" + (" (shipped before)" if n == 64 else ""), c[f"tied{n}"])
    for n in (32,):  # PCA 8 and 16 per layer were weaker still (explored by hand, not kept)
        per_layer = [component(layer, mahalanobis(min(n, layer.shape[1]))) for layer in layers]
        evaluate(f"per-layer tied Mahalanobis PCA {n}, max rank", combine(per_layer))
        evaluate(f"per-layer tied Mahalanobis PCA {n}, mean rank", combine(per_layer, "mean"))
        evaluate(f"per-layer tied Mahalanobis PCA {n}, max rank + softmax", combine([*per_layer, msp]))
    for n, w in ((64, 0.25), (64, 0.5), (64, 0.75), (32, 0.5)):
        c[f"qda{n}-{w}"] = component(texture, mahalanobis(n, w))
        evaluate(f"per-class covariance {w}, PCA {n}", c[f"qda{n}-{w}"])
    for k, metric, whiten in ((1, "cosine", None), (5, "cosine", None), (1, "euclidean", 64)):
        c[f"knn{k}{metric}"] = component(texture, knn(k, metric, whiten))
        evaluate(f"{k}-NN {metric}" + (f" (whitened PCA {whiten})" if whiten else ""), c[f"knn{k}{metric}"])
    evaluate("tied64 + softmax, max rank (shipped before)", combine([c["tied64"], msp]))
    evaluate("tied64 + 1-NN cosine, max rank", combine([c["tied64"], c["knn1cosine"]]))
    evaluate("per-class 0.5 + softmax, max rank (ships)", combine([c["qda64-0.5"], msp]))
    evaluate("per-class 0.5 + 1-NN cosine, max rank", combine([c["qda64-0.5"], c["knn1cosine"]]))
    evaluate("per-class 0.5 + 1-NN cosine + softmax, max rank", combine([c["qda64-0.5"], c["knn1cosine"], msp]))
    evaluate("tied32 + tied128, max rank", combine([c["tied32"], c["tied128"]]))
    print(f"\n{len(results)} variants; {cpu_description()}; {time.perf_counter() - started:.0f} s")
    benchio.save(
        "ood_texture_variants",
        {"run": str(args.run), "texture": str(texture_path), "heads": str(heads_path), "variants": results},
        out=args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
