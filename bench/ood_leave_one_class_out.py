"""Leave-one-class-out: how well each out-of-distribution score flags a defect class never trained on.

Figures: docs/results.md, "Out-of-distribution detection".

Usage (from the repository root)::

    python bench/ood_leave_one_class_out.py RUN [--out FILE.json]

RUN is a trained run folder (its splits.csv, data path and feature cache are reused). For each of the
six NEU classes: the other five are "known"; on their training images (never test) a pooled head is
trained exactly as `train` does (HeadTrainer, the run's best rate, 15 epochs) and every score is fitted;
each score's threshold is the 99th percentile of its out-of-fold scores on the known training images
(a fold's score fitted on the other folds), so ~99% of in-distribution images are accepted. Then the
known classes' TEST images (in-distribution) and the held-out class's TEST images (unknown) are scored.
Reported per class and mean: AUROC (unknown vs known), % of unknown images flagged, % of known images
flagged, and the head's accuracy on all and on the accepted known test images.

Scores: max softmax probability of the head (baseline), energy (-logsumexp of its logits), cosine 5-NN
distance on the pooled final features, Mahalanobis on the pooled final features (PCA 64), the first
shipped score, tied Mahalanobis on the texture statistics of four intermediate layers, and (added later,
same heads) the per-class-covariance texture score that ships now (steeldefect.runtime.uncertainty), cosine 1-NN
on the texture statistics, and max-rank combinations ("or") of these with each other and max softmax.
Also: the far-OOD set (photographs, grey, white, noise, a blurred NEU image) against the six-class
scorer as shipped. The held-out heads' outputs are cached (beside the feature cache) so that a re-run
and experiments/ood_texture_variants.py compare scores on the same heads.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score

import benchio
from steeldefect.core.cpuinfo import cpu_description
from steeldefect.core.files import atomic_write_bytes, read_json, save_npy
from steeldefect.models.backbones import build_backbone, weights_id
from steeldefect.models.conversion import convert
from steeldefect.models.features import cached_features
from steeldefect.models.training import HeadTrainer, fit_head
from steeldefect.runtime import uncertainty
from steeldefect.runtime.litert import make_interpreter, predict_tflite
from steeldefect.study.rundata import load_run_data

BACKBONE = "efficientnet_lite0"
SCORES = (
    "msp",
    "energy",
    "knn5_pooled",
    "maha_pooled",
    "maha_texture",
    "texture_or_msp",
    # Added for the 75%-flagged target (same protocol, same heads):
    "qda_texture",
    "qda_texture_or_msp",
    "knn1_texture",
    "qda_or_knn1_texture",
    "qda_or_knn1_or_msp",
)


def texture_statistics(images: np.ndarray, cache: Path, fingerprint: str) -> np.ndarray:
    """Raw texture statistics of every image (LiteRT fp32), cached per dataset fingerprint."""
    path = cache / "ood" / f"{BACKBONE}-texture-{fingerprint[:16]}.npy"
    if path.is_file():
        return np.load(path)
    model = uncertainty.texture_statistics_model(build_backbone(BACKBONE))
    started = time.perf_counter()
    stats = predict_tflite(make_interpreter(convert(model, "fp32")), images, progress=True, desc="texture stats")
    print(f"texture statistics of {len(images)} images in {time.perf_counter() - started:.1f} s")
    save_npy(path, stats)
    return stats


def load_head_outputs(path: Path) -> dict[str, dict[str, np.ndarray]]:
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as archive:
        outputs: dict[str, dict[str, np.ndarray]] = {}
        for key in archive.files:
            unknown, name = key.split("/")
            outputs.setdefault(unknown, {})[name] = archive[key]
    return outputs


def save_head_outputs(path: Path, outputs: dict[str, dict[str, np.ndarray]]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **{f"{u}/{name}": a for u, arrays in outputs.items() for name, a in arrays.items()})
    atomic_write_bytes(path, buffer.getvalue())


class PooledKnn:
    """Cosine distance to the k-th nearest training image (negative k-th largest cosine similarity)."""

    def __init__(self, k: int = 5):
        self.k = k

    def fit(self, x: np.ndarray, y: np.ndarray) -> PooledKnn:
        self.bank = x / np.linalg.norm(x, axis=1, keepdims=True)
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        similarity = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ self.bank.T
        return -np.sort(similarity, axis=1)[:, -self.k]


def head_scores(head, pooled: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted class, -max softmax probability, energy) of a pooled head on pooled features."""
    import keras

    penultimate = keras.Model(head.input, head.layers[-2].output)
    kernel, bias = head.layers[-1].get_weights()
    logits = np.asarray(penultimate(pooled[:, None, None, :], training=False)) @ kernel + bias
    log_p = logits - logsumexp(logits, axis=1, keepdims=True)
    return logits.argmax(1), -np.exp(log_p).max(1), -logsumexp(logits, axis=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/ood_leave_one_class_out.json"))
    args = parser.parse_args(argv)

    started = time.perf_counter()
    prepared, options = load_run_data(args.run, progress=False)
    dataset, splits = prepared.dataset, prepared.splits
    summary = read_json(args.run / "summary.json")["backbones"][BACKBONE]
    rate, epochs = float(summary["best_learning_rate"]), int(options.epochs)
    cache = Path(options.cache_dir)
    maps, _, _ = cached_features(
        lambda: build_backbone(BACKBONE),
        prepared.images,
        dataset_fingerprint=prepared.fingerprint,
        backbone=BACKBONE,
        weights_id=weights_id(BACKBONE, "imagenet"),
        preprocessing=options.preprocessing,
        cache_dir=cache,
    )
    pooled = maps.mean(axis=(1, 2))
    del maps
    raw = texture_statistics(prepared.images, cache, prepared.fingerprint)
    channels = [int(build_backbone(BACKBONE).get_layer(n).output.shape[-1]) for n in uncertainty.TEXTURE_LAYERS]
    texture = uncertainty.texture_features(raw, channels)
    labels, test, names = dataset.labels, splits.test_indices, dataset.class_names
    fold_of = np.full(len(labels), -1)
    for k, (_, val) in enumerate(splits.folds):
        fold_of[val] = k

    # Head outputs per held-out class, cached per run, rate and epochs (heads are not bit-reproducible
    # across machines, so caching also keeps every score variant compared on the same heads).
    head_path = cache / "ood" / f"{BACKBONE}-loco-heads-{prepared.fingerprint[:16]}-lr{rate:g}-e{epochs}.npz"
    head_outputs = load_head_outputs(head_path)
    trainer = HeadTrainer((1, 1, pooled.shape[1]), len(names) - 1, kind="pooled")

    def train_head(rows: np.ndarray, y: np.ndarray, seed: int):
        head, _ = fit_head(
            pooled[rows][:, None, None, :],
            y,
            n_classes=len(names) - 1,
            kind="pooled",
            learning_rate=rate,
            epochs=epochs,
            seed=seed,
            trainer=trainer,
        )
        return head

    per_class = []
    for unknown, unknown_name in enumerate(names):
        known_classes = [c for c in range(len(names)) if c != unknown]
        remap = np.full(len(names), -1)
        remap[known_classes] = np.arange(len(known_classes))
        train = np.where((labels != unknown) & (fold_of >= 0))[0]
        known_test, unknown_test = test[labels[test] != unknown], test[labels[test] == unknown]
        folds = [(train[fold_of[train] != k], train[fold_of[train] == k]) for k in range(len(splits.folds))]
        in_scores = {s: [] for s in SCORES}  # out-of-fold, for the thresholds
        heads = head_outputs.get(unknown_name)
        if heads is None:  # the six heads per held-out class are the slow part: trained once per run
            parts = [
                head_scores(train_head(fit_rows, remap[labels[fit_rows]], 100 + k), pooled[val_rows])
                for k, (fit_rows, val_rows) in enumerate(folds)
            ]
            head = train_head(train, remap[labels[train]], 7)
            heads = {
                "msp_oof": np.concatenate([p[1] for p in parts]),
                "energy_oof": np.concatenate([p[2] for p in parts]),
            }
            heads["predicted"], heads["msp_k"], heads["energy_k"] = head_scores(head, pooled[known_test])
            _, heads["msp_u"], heads["energy_u"] = head_scores(head, pooled[unknown_test])
            head_outputs[unknown_name] = heads
            save_head_outputs(head_path, head_outputs)
        in_scores["msp"].append(heads["msp_oof"])
        in_scores["energy"].append(heads["energy_oof"])
        for fit_rows, val_rows in folds:
            in_scores["knn5_pooled"].append(PooledKnn().fit(pooled[fit_rows], None).score(pooled[val_rows]))
            in_scores["maha_pooled"].append(
                uncertainty.OODScorer().fit(pooled[fit_rows], labels[fit_rows]).score(pooled[val_rows])
            )
        predicted, msp_k, energy_k, msp_u, energy_u = (
            heads[key] for key in ("predicted", "msp_k", "energy_k", "msp_u", "energy_u")
        )
        shipped, texture_oof = uncertainty.fit_ood(texture, labels, folds, class_covariance=0.0)  # tied
        qda, qda_oof = uncertainty.fit_ood(texture, labels, folds, class_covariance=0.5)
        knn1_oof = np.concatenate([PooledKnn(1).fit(texture[f], None).score(texture[v]) for f, v in folds])
        knn1 = PooledKnn(1).fit(texture[train], None)
        scored = {
            "msp": (msp_k, msp_u),
            "energy": (energy_k, energy_u),
            "knn5_pooled": tuple(
                PooledKnn().fit(pooled[train], None).score(pooled[r]) for r in (known_test, unknown_test)
            ),
            "maha_pooled": tuple(
                uncertainty.OODScorer().fit(pooled[train], labels[train]).score(pooled[r])
                for r in (known_test, unknown_test)
            ),
            "maha_texture": (shipped.score(texture[known_test]), shipped.score(texture[unknown_test])),
        }
        # Either the texture score or the head's max-softmax is unusually high (both out-of-fold ranked).
        reference = [texture_oof, np.concatenate(in_scores["msp"])]
        in_scores["texture_or_msp"] = [uncertainty.percentile_combine(reference, reference)]
        scored["texture_or_msp"] = tuple(
            uncertainty.percentile_combine(reference, [scored["maha_texture"][i], scored["msp"][i]]) for i in (0, 1)
        )
        scored["qda_texture"] = (qda.score(texture[known_test]), qda.score(texture[unknown_test]))
        scored["knn1_texture"] = (knn1.score(texture[known_test]), knn1.score(texture[unknown_test]))
        in_scores["qda_texture"] = [qda_oof]
        in_scores["knn1_texture"] = [knn1_oof]
        # Max-rank combinations, each part ranked against its own out-of-fold reference.
        msp_oof = np.concatenate(in_scores["msp"])
        for name, parts, refs in (
            ("qda_texture_or_msp", ("qda_texture", "msp"), [qda_oof, msp_oof]),
            ("qda_or_knn1_texture", ("qda_texture", "knn1_texture"), [qda_oof, knn1_oof]),
            ("qda_or_knn1_or_msp", ("qda_texture", "knn1_texture", "msp"), [qda_oof, knn1_oof, msp_oof]),
        ):
            in_scores[name] = [uncertainty.percentile_combine(refs, refs)]
            scored[name] = tuple(uncertainty.percentile_combine(refs, [scored[p][i] for p in parts]) for i in (0, 1))
        correct = predicted == remap[labels[known_test]]
        row = {"unknown": unknown_name, "accuracy_known_test": float(correct.mean()), "scores": {}}
        for name, (s_known, s_unknown) in scored.items():
            threshold = (
                shipped.threshold
                if name == "maha_texture"
                else uncertainty.choose_threshold(np.concatenate(in_scores[name]))
            )
            accepted = s_known <= threshold
            row["scores"][name] = {
                "auroc": float(
                    roc_auc_score(np.r_[np.zeros(len(s_known)), np.ones(len(s_unknown))], np.r_[s_known, s_unknown])
                ),
                "unknown_flagged": float((s_unknown > threshold).mean()),
                "known_flagged": float(1 - accepted.mean()),
                "accuracy_accepted_known": float(correct[accepted].mean()) if accepted.any() else None,
            }
        per_class.append(row)
        print(
            f"{unknown_name:16s} "
            + "  ".join(f"{n} {v['auroc']:.3f}/{100 * v['unknown_flagged']:.0f}%" for n, v in row["scores"].items()),
            flush=True,
        )

    mean = {
        name: {
            key: float(np.mean([r["scores"][name][key] for r in per_class]))
            for key in ("auroc", "unknown_flagged", "known_flagged", "accuracy_accepted_known")
        }
        | {"min_auroc": float(min(r["scores"][name]["auroc"] for r in per_class))}
        for name in SCORES
    }
    mean_accuracy = float(np.mean([r["accuracy_known_test"] for r in per_class]))

    # Six known classes: the shipped scorer (per-class covariance) as `predict` would use it, on the far-OOD set.
    six_scorer, _ = uncertainty.fit_ood(texture, labels, splits.folds)
    in_test_flagged = float(six_scorer.is_uncertain(texture[test]).mean())
    examples = uncertainty.far_ood_examples(prepared.images[test[0]])
    far_model = uncertainty.texture_statistics_model(build_backbone(BACKBONE))
    far_raw = predict_tflite(make_interpreter(convert(far_model, "fp32")), np.stack(list(examples.values())))
    far_scores = six_scorer.score(uncertainty.texture_features(far_raw, channels))
    far = {
        name: {"score": float(s), "flagged": bool(s > six_scorer.threshold)} for name, s in zip(examples, far_scores)
    }

    print(
        f"\n{'score':20s} {'mean AUROC':>10s} {'min':>6s} {'unknown flagged':>16s} {'known flagged':>14s} "
        f"{'acc. accepted':>13s}  (head accuracy on all known test images: {100 * mean_accuracy:.2f}%)"
    )
    for name, m in mean.items():
        print(
            f"{name:20s} {m['auroc']:10.3f} {m['min_auroc']:6.3f} {100 * m['unknown_flagged']:15.1f}% "
            f"{100 * m['known_flagged']:13.1f}% {100 * m['accuracy_accepted_known']:12.2f}%"
        )
    print("\nper class (AUROC / % unknown flagged):")
    print(f"{'unknown class':16s} " + " ".join(f"{n:>16s}" for n in SCORES))
    for r in per_class:
        print(
            f"{r['unknown']:16s} "
            + " ".join(
                f"{r['scores'][n]['auroc']:9.3f} / {100 * r['scores'][n]['unknown_flagged']:3.0f}%" for n in SCORES
            )
        )
    print(
        f"\nsix-class texture scorer: threshold {six_scorer.threshold:.1f}; {100 * in_test_flagged:.1f}% of the 270 "
        f"test images flagged; far-OOD flagged {sum(v['flagged'] for v in far.values())}/{len(far)}"
    )
    for name, v in far.items():
        print(f"  {name:30s} score {v['score']:10.1f}  {'flagged' if v['flagged'] else 'NOT flagged'}")
    print(f"\n{cpu_description()}; {time.perf_counter() - started:.0f} s")

    benchio.save(
        "ood_leave_one_class_out",
        {
            "run": str(args.run),
            "learning_rate": rate,
            "epochs": epochs,
            "accept": uncertainty.DEFAULT_ACCEPT,
            "texture_layers": list(uncertainty.TEXTURE_LAYERS),
            "n_components": uncertainty.DEFAULT_COMPONENTS,
            "per_class": per_class,
            "mean": mean,
            "head_accuracy_known_test": mean_accuracy,
            "six_class": {"threshold": six_scorer.threshold, "test_flagged": in_test_flagged, "far_ood": far},
            "seconds": time.perf_counter() - started,
        },
        out=args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
