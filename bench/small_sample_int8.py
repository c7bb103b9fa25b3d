"""Int8 of heads trained on few or imbalanced images: does full-integer quantization keep their accuracy?

Figures: docs/results.md, "Int8 of few-image and imbalanced heads".

Usage (from the repository root)::

    python bench/small_sample_int8.py --data ../shared/data/NEU-DET/IMAGES [--draws 1] [--cases all|few|imbalance]
        [--out FILE.json]

For each case (balanced 5 / 10 / 20 images per class, and the imbalance profile 255/128/64/32/16/8
in the README's three class orders with balanced class weights), the learning curve's ``multilayer``
head of draw d is trained exactly as `learning-curve` trains it (same sample, same seed), joined to
the multi-layer Lite0 backbone, converted to fp32 and full-integer int8 LiteRT files, as is and
averaged over the 8 flips/rotations (`export --tta`), and all four score the fixed 270-image test
split from pixels. The int8 calibration set is what `export` would take from that training set:
up to 200 of the sampled images, evenly across classes (never test images).
Printed and saved: accuracy, macro recall and rarest-class recall of each file, and the differences;
and per case, the mean and standard deviation over the draws of each figure and of the differences
(the "summary" list).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

import benchio
from steeldefect.core.cpuinfo import cpu_description
from steeldefect.core.files import default_cache_dir
from steeldefect.core.metrics import classification_metrics
from steeldefect.core.options import LearningCurveOptions
from steeldefect.data import augment
from steeldefect.deploy.export import calibration_indices
from steeldefect.models import backbones, training
from steeldefect.models.conversion import convert
from steeldefect.runtime.litert import make_interpreter, predict_tflite
from steeldefect.study import learningcurve, learningcurve_points, rundata

PROFILE = (255, 128, 64, 32, 16, 8)
ORDERS = (
    ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"),
    ("scratches", "rolled-in_scale", "pitted_surface", "patches", "inclusion", "crazing"),
    ("patches", "scratches", "crazing", "inclusion", "pitted_surface", "rolled-in_scale"),
)


def scores(y_true: np.ndarray, probabilities: np.ndarray, rarest: int, n_classes: int) -> dict:
    metrics = classification_metrics(y_true, probabilities.argmax(1), n_classes)
    return {
        "accuracy": round(float(metrics["accuracy"]), 2),
        "recall_macro": round(float(metrics["recall_macro"]), 2),
        "rarest_recall": round(float(metrics["recall_per_class"][rarest]), 2),
    }


def by_case(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows of each case, cases in the order they first appear."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["case"], []).append(row)
    return groups


class Inputs(NamedTuple):
    """What both int8 benches start from: NEU's pool and test split under the learning curve's options,
    the multi-layer features (cached) and a factory of the multi-layer backbone. (A NamedTuple, not a
    dataclass: the tests load the benches as modules that sys.modules does not know.)"""

    options: LearningCurveOptions
    prepared: Any
    labels: np.ndarray
    names: list[str]
    pool: np.ndarray
    test_idx: np.ndarray
    features: np.ndarray
    augmented: Any
    get_backbone: Callable[[], Any]


def load_inputs(data: Path) -> Inputs:
    options = LearningCurveOptions()
    prepared = rundata.load_data(data, options, progress=False)
    pool, test_idx = prepared.splits.train_indices, prepared.splits.test_indices
    features, augmented, _ = learningcurve.multilayer_inputs(
        prepared, pool, options, default_cache_dir(), progress=False
    )
    get_backbone = backbones.backbone_factory(
        options.backbone,
        weights=options.weights,
        preprocessing=options.preprocessing,
        seed=options.seed,
        image_size=prepared.images.shape[1:3],
        features="multilayer",
    )
    labels, names = np.asarray(prepared.dataset.labels), list(prepared.dataset.class_names)
    return Inputs(options, prepared, labels, names, pool, test_idx, features, augmented, get_backbone)


FORMS = ("head_on_features", "fp32", "int8", "int8_minus_fp32", "tta_fp32", "tta_int8", "tta_int8_minus_fp32")


def summarise(rows: list[dict]) -> list[dict]:
    """Per case: mean and standard deviation over its draws (population std, ddof=0) of every score."""
    summary = []
    for case, chosen in by_case(rows).items():
        entry: dict = {
            "case": case,
            "draws": len(chosen),
            "rarest_class": sorted({row["rarest_class"] for row in chosen}),
        }
        for form in FORMS:
            entry[form] = benchio.mean_std_per_metric([row[form] for row in chosen])
        summary.append(entry)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--draws", type=int, default=1, help="draws per case (0..draws-1)")
    parser.add_argument(
        "--cases",
        choices=("all", "few", "imbalance"),
        default="all",
        help="few = 5/10/20 images per class, imbalance = 255..8 in three class orders, all = both",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    options, prepared, labels, names, pool, test_idx, features, augmented, get_backbone = load_inputs(args.data)
    cases = []
    if args.cases in ("all", "few"):
        cases += [(f"{n} per class", [n] * len(names), "none", None) for n in (5, 10, 20)]
    if args.cases in ("all", "imbalance"):
        for number, order in enumerate(ORDERS, 1):
            counts = [PROFILE[order.index(name)] for name in names]
            cases.append((f"255..8 order {number}", counts, "balanced", names.index(order[-1])))
    trainers: dict = {}
    rows = []
    print(cpu_description(), f"threads {args.threads}")
    for label, counts, weight_mode, rarest in cases:
        for draw in range(args.draws):
            started = time.perf_counter()
            sample = learningcurve_points.draw_sample(labels, pool, counts, seed=options.seed, draw=draw)
            head, _ = learningcurve.fit_head(
                sample,
                labels,
                features,
                augmented,
                trainers,
                options=options,
                weight_mode=weight_mode,
                n_classes=len(names),
                draw=draw,
            )
            joined = training.join_model(get_backbone(), head, name="small_sample")
            # As `export` calibrates: up to 200 of the training images, evenly across classes.
            chosen = calibration_indices(labels, sample, 200, seed=options.seed)
            calibration = prepared.images[chosen].astype(np.float32)
            row = {"case": label, "draw": draw, "n_train": int(len(sample)), "n_calibration": len(calibration)}
            head_probabilities = training.predict_proba(head, features[test_idx])
            worst = rarest
            if worst is None:  # balanced: the worst class of the float head
                recalls = classification_metrics(labels[test_idx], head_probabilities.argmax(1), len(names))
                worst = int(np.argmin(recalls["recall_per_class"]))
            row["rarest_class"] = names[worst]
            row["head_on_features"] = scores(labels[test_idx], head_probabilities, worst, len(names))
            averaged = augment.dihedral_average_model(joined)
            for tta, model in (("", joined), ("tta_", averaged)):
                for variant in ("fp32", "int8"):
                    flatbuffer = convert(model, variant, calibration if variant == "int8" else None)
                    interpreter = make_interpreter(flatbuffer, threads=args.threads)
                    probabilities = predict_tflite(interpreter, prepared.images[test_idx], progress=False)
                    row[tta + variant] = scores(labels[test_idx], probabilities, worst, len(names))
                    row[f"{tta}{variant}_bytes"] = len(flatbuffer)
                row[f"{tta}int8_minus_fp32"] = {
                    k: round(row[f"{tta}int8"][k] - row[f"{tta}fp32"][k], 2) for k in row["fp32"]
                }
            row["seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            for tta in ("", "tta_"):
                fp32, int8 = row[f"{tta}fp32"], row[f"{tta}int8"]
                print(
                    f"{label:>22} draw {draw} {'8-view average' if tta else 'single view':>14}: "
                    f"fp32 acc {fp32['accuracy']:.2f} macro {fp32['recall_macro']:.2f} "
                    f"rarest {fp32['rarest_recall']:.2f} | int8 acc {int8['accuracy']:.2f} "
                    f"macro {int8['recall_macro']:.2f} rarest {int8['rarest_recall']:.2f}",
                    flush=True,
                )
            print(f"{'':>22} {row['seconds']:.0f} s", flush=True)
    summary = summarise(rows)
    for entry in summary:
        for tta in ("", "tta_"):
            fp32, int8, diff = entry[f"{tta}fp32"], entry[f"{tta}int8"], entry[f"{tta}int8_minus_fp32"]
            print(
                f"{entry['case']:>22} {entry['draws']} draws {'8-view average' if tta else 'single view':>14}: "
                f"fp32 macro {benchio.pm(fp32['recall_macro'])} rarest {benchio.pm(fp32['rarest_recall'])} | "
                f"int8 macro {benchio.pm(int8['recall_macro'])} rarest {benchio.pm(int8['rarest_recall'])} | "
                f"int8-fp32 macro {benchio.pm(diff['recall_macro'])} rarest {benchio.pm(diff['rarest_recall'])}"
            )
    worst_drop = min(min(r[f"{tta}int8_minus_fp32"].values()) for r in rows for tta in ("", "tta_"))
    print(f"largest int8 loss over all cases, metrics and both forms: {-worst_drop:.2f} points")
    benchio.save(
        "small_sample_int8",
        {
            "rows": rows,
            "summary": summary,
            "largest_int8_loss_points": round(-worst_drop, 2),
            "options": options.record(),
        },
        threads=args.threads,
        out=args.out,
    )


if __name__ == "__main__":
    main()
