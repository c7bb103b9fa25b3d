"""Champion/challenger: `steeldefect compare OLD NEW --data GATE` scores two model files on the same
gate images and says whether NEW should replace OLD.

The gate is one or more dataset folders (class folders or a NEU layout, as `train --data`). Classes
are matched by name: a gate image of a class a model does not know is wrong for that model (it
cannot answer it), so a challenger that learnt a new kind gains there and a champion that never saw
it loses. Both models answer every image; an answer flagged uncertain still counts by its top
class for accuracy and recall, and the share flagged is reported beside them.

The verdict rule (``docs/retrain.md``), with its two thresholds as options:

- **keep** when NEW is worse beyond noise: McNemar's exact test on the paired answers (the images
  exactly one of the two models gets right; ``scipy.stats.binomtest`` of NEW's wins among them
  against 1/2, two-sided) gives p < ``alpha`` (0.05) and NEW's accuracy is lower;
- **keep** when any class that OLD knows and the gate holds loses more than ``max_recall_drop``
  (2) percentage points of recall under NEW;
- **promote** otherwise.

Models are loaded through :class:`steeldefect.runtime.modelfile.Classifier`, so any model file the
runtime serves (and only those: a file from elsewhere is checked like any other) can be compared.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from steeldefect.core.files import default_cache_dir, write_csv, write_json
from steeldefect.data.dataset import scan_datasets
from steeldefect.data.loading import load_images
from steeldefect.runtime.modelfile import Classifier, read_model_info

log = logging.getLogger(__name__)

ALPHA = 0.05
MAX_RECALL_DROP = 2.0  # percentage points
BATCH = 64  # images per interpreter call: bounds memory, not the result


@dataclass(frozen=True)
class Scored:
    """One model's answers on the gate."""

    model: Path
    sha256: str
    class_names: tuple[str, ...]
    predicted: list[str]  # class name per gate image
    uncertain: np.ndarray | None  # bool per gate image, None when the model carries no rule


def score_model(
    model: Path, gate_images: dict[tuple[int, int], np.ndarray], *, threads: int | None = None, accept: float | None
) -> Scored:
    classifier = Classifier(Path(model), threads, accept=accept)
    images = gate_images[classifier.info.input_size]
    predicted, flags = [], []
    for start in range(0, len(images), BATCH):
        judgement = classifier.judge(np.ascontiguousarray(images[start : start + BATCH]))
        predicted += [classifier.info.class_names[i] for i in judgement.probabilities.argmax(axis=1)]
        if judgement.uncertain is not None:
            flags.append(judgement.uncertain)
    uncertain = np.concatenate(flags) if flags else None
    return Scored(Path(model), classifier.info.sha256, classifier.info.class_names, predicted, uncertain)


def mcnemar_exact(old_correct: np.ndarray, new_correct: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test: among the images exactly one model gets right, is NEW's share of them
    different from 1/2? (two-sided binomial test; p = 1 when no image is discordant)."""
    from scipy.stats import binomtest

    old_only = int((old_correct & ~new_correct).sum())
    new_only = int((new_correct & ~old_correct).sum())
    discordant = old_only + new_only
    p_value = float(binomtest(new_only, discordant, 0.5).pvalue) if discordant else 1.0
    return {"old_only_correct": old_only, "new_only_correct": new_only, "p_value": p_value}


def compare_models(
    old: Path,
    new: Path,
    gate: Path | Sequence[Path],
    *,
    out: Path | None = None,
    alpha: float = ALPHA,
    max_recall_drop: float = MAX_RECALL_DROP,
    threads: int | None = None,
    accept: float | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score OLD and NEW on the gate; the result holds both models' figures, the test, the verdict
    (``"promote"`` or ``"keep"``) and its reasons. With ``out``, also ``compare.json`` and
    ``compare.csv`` (one row per gate class) there."""
    sizes = {read_model_info(Path(model)).input_size for model in (old, new)}  # a bad model: refused first
    roots = [Path(gate)] if isinstance(gate, (str, Path)) else [Path(root) for root in gate]
    dataset, _ = scan_datasets(roots, min_per_class=1)
    names = [dataset.class_names[label] for label in dataset.labels]
    images: dict[tuple[int, int], np.ndarray] = {}
    for size in sizes:
        _, images[size] = load_images(
            dataset, image_size=size, cache_dir=cache_dir or default_cache_dir(), progress=progress
        )
    scored = {
        role: score_model(model, images, threads=threads, accept=accept) for role, model in (("old", old), ("new", new))
    }
    result = {
        "gate": {"data": [str(root) for root in roots], "n_images": len(dataset), "counts": dataset.counts()},
        **judge_pair(names, scored["old"], scored["new"], dataset.class_names, alpha, max_recall_drop),
    }
    if out is not None:
        out = Path(out)
        write_json(out / "compare.json", result)
        write_csv(out / "compare.csv", result["per_class"])
    return result


def judge_pair(
    truth_names: Sequence[str],
    old: Scored,
    new: Scored,
    gate_classes: Sequence[str],
    alpha: float = ALPHA,
    max_recall_drop: float = MAX_RECALL_DROP,
) -> dict[str, Any]:
    """Both models' figures on the gate, McNemar's test, the per-class rows and the verdict with its
    reasons, from each model's answer per image (``truth_names``: the gate's class per image)."""
    truth = np.array(list(truth_names), dtype=object)
    scored = {"old": old, "new": new}
    correct = {role: np.array(s.predicted, dtype=object) == truth for role, s in scored.items()}
    figures = {role: _figures(scored[role], correct[role], truth, gate_classes) for role in scored}
    test = mcnemar_exact(correct["old"], correct["new"])

    reasons = []
    worse = figures["new"]["accuracy"] < figures["old"]["accuracy"]
    if worse and test["p_value"] < alpha:
        reasons.append(
            f"accuracy lower beyond noise: {100 * figures['new']['accuracy']:.2f}% vs "
            f"{100 * figures['old']['accuracy']:.2f}% (McNemar p = {test['p_value']:.3g} < {alpha:g})"
        )
    rows = []
    for name in gate_classes:
        old_recall, new_recall = figures["old"]["recall"][name], figures["new"]["recall"][name]
        change = 100 * (new_recall - old_recall)
        old_knows = name in old.class_names
        if old_knows and change < -max_recall_drop - 1e-9:  # the tolerance only absorbs float rounding
            reasons.append(
                f"recall of {name} drops {-change:.1f} points ({100 * old_recall:.1f}% -> {100 * new_recall:.1f}%), "
                f"more than {max_recall_drop:g}"
            )
        rows.append(
            {
                "class": name,
                "images": int((truth == name).sum()),
                "old_knows": old_knows,
                "new_knows": name in new.class_names,
                "old_recall": round(old_recall, 6),
                "new_recall": round(new_recall, 6),
                "change_points": round(change, 3),
            }
        )
    verdict = "keep" if reasons else "promote"
    if not reasons:
        reasons.append(
            f"accuracy {100 * figures['new']['accuracy']:.2f}% vs {100 * figures['old']['accuracy']:.2f}% "
            f"(McNemar p = {test['p_value']:.3g}); no class OLD knows loses more than {max_recall_drop:g} points"
        )
    return {
        "old": figures["old"],
        "new": figures["new"],
        "mcnemar": test,
        "rule": {"alpha": alpha, "max_recall_drop_points": max_recall_drop},
        "per_class": rows,
        "verdict": verdict,
        "reasons": reasons,
    }


def _figures(scored: Scored, correct: np.ndarray, truth: np.ndarray, gate_classes: Sequence[str]) -> dict[str, Any]:
    recall = {name: float(correct[truth == name].mean()) if (truth == name).any() else 0.0 for name in gate_classes}
    return {
        "model": str(scored.model),
        "sha256": scored.sha256,
        "class_names": list(scored.class_names),
        "unknown_gate_classes": [name for name in gate_classes if name not in scored.class_names],
        "accuracy": float(correct.mean()) if len(correct) else 0.0,
        "correct": int(correct.sum()),
        "recall": recall,
        "uncertain_share": None if scored.uncertain is None else float(scored.uncertain.mean()),
    }


def format_comparison(result: dict[str, Any]) -> str:
    """What `compare` prints: both models' figures, the per-class recall, the test, then the verdict line."""
    old, new = result["old"], result["new"]

    def share(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    lines = [
        f"gate: {result['gate']['n_images']} images ({', '.join(result['gate']['data'])})",
        f"{'':<22}{'OLD':>10}{'NEW':>10}",
        f"{'accuracy':<22}{share(old['accuracy']):>10}{share(new['accuracy']):>10}",
        f"{'uncertain share':<22}{share(old['uncertain_share']):>10}{share(new['uncertain_share']):>10}",
    ]
    for row in result["per_class"]:
        label = f"recall {row['class']}"[:21]
        old_text = share(row["old_recall"]) if row["old_knows"] else "unknown"
        new_text = share(row["new_recall"]) if row["new_knows"] else "unknown"
        lines.append(f"{label:<22}{old_text:>10}{new_text:>10}")
    test = result["mcnemar"]
    lines.append(
        f"McNemar exact: {test['old_only_correct']} only OLD right, {test['new_only_correct']} only NEW right, "
        f"p = {test['p_value']:.3g}"
    )
    lines.append(f"verdict: {result['verdict']} ({'; '.join(result['reasons'])})")
    return "\n".join(lines)
