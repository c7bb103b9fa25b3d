"""Can the imbalance heads' int8 - fp32 gap be closed? Heads trained to be robust to the int8 backbone.

Figures: docs/design-notes.md, "Quantization" (an experiment whose methods were not adopted: moved from bench/).

Usage (from the repository root)::

    python experiments/int8_robust_head.py --data ../shared/data/NEU-DET/IMAGES [--draws 5] [--orders 1 2 3]
        [--threads 2] [--out FILE.json]

For each of the README's three class orders of the imbalance profile 255/128/64/32/16/8 (balanced class
weights) and each draw, the learning curve's ``multilayer`` head is trained exactly as
bench/small_sample_int8.py trains it ("baseline"), and the int8 side is measured with the multi-layer
Lite0 feature extractor (the joined model up to its 4,736-value vector) converted to full-integer
int8 with the calibration `export` would use (up to 200 training images, evenly across classes),
its features dequantized and fed to the float head ("int8 features"). Methods:

* ``baseline``: the learning curve's head.
* ``int8_rows``: the same head trained on the float rows (training images + their 7 flips/rotations)
  PLUS the same rows' features from the int8 feature extractor (same number of training steps).
* ``dropout_0.5``: the baseline head with dropout 0.5 instead of 0.2 (the head has no L2 term; dropout
  is its regulariser).
* ``dihedral_calibration``: the baseline head, with the int8 feature extractor calibrated on the 8
  flips/rotations of the calibration images.

fp32 = the head on the float features of the 270 test images (the joined fp32 LiteRT file gives the
same answers: ``head_on_features`` = ``fp32`` in bench/results/small_sample_int8*.json). For
``int8_rows`` the whole joined model (backbone + that head) is also converted to full-integer int8
and scored from pixels ("int8_full"), the file `export` would write. Test images are used for
scoring only. Printed and saved per row, and per order the mean ± std over draws ("summary"), also of
|int8 - fp32| (draws whose gaps have opposite signs cancel in the mean of int8 - fp32).
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
from small_sample_int8 import ORDERS, PROFILE, by_case, load_inputs, scores
from steeldefect.core.cpuinfo import cpu_description
from steeldefect.data import augment
from steeldefect.deploy.export import calibration_indices
from steeldefect.models import training
from steeldefect.models.augfeatures import training_rows
from steeldefect.models.conversion import convert
from steeldefect.runtime.litert import make_interpreter, predict_tflite
from steeldefect.study import learningcurve_points

METHODS = ("baseline", "int8_rows", "dropout_0.5", "dihedral_calibration")


def all_views(images: np.ndarray) -> np.ndarray:
    """The 8 flips/rotations of every image, view-major (view 0 = the images themselves)."""
    return np.concatenate([augment.dihedral_view(images, view) for view in range(8)])


def int8_features(extractor, calibration: np.ndarray, images: np.ndarray, threads: int) -> np.ndarray:
    flatbuffer = convert(extractor, "int8", calibration.astype(np.float32))
    interpreter = make_interpreter(flatbuffer, threads=threads)
    return np.asarray(predict_tflite(interpreter, images, progress=False), dtype=np.float32)


def train(trainers: dict, x: np.ndarray, y: np.ndarray, weights, *, options, n_classes, seed, dropout=0.2):
    batch, epochs = learningcurve_points.steps_to_epochs(len(x), options.batch_size, options.steps)
    key = (batch, int(x.shape[1]), dropout)
    if key not in trainers:
        trainers[key] = training.HeadTrainer(x.shape[1:], n_classes, kind="flatten", batch_size=batch, dropout=dropout)
    head, _ = trainers[key].fit(
        x, y, learning_rate=options.learning_rate, epochs=epochs, seed=seed, class_weight=weights
    )
    return head


def summarise(rows: list[dict]) -> list[dict]:
    """Per order and method: mean and population std over draws of fp32, int8 and int8 - fp32."""
    summary = []
    for case, chosen in by_case(rows).items():
        for method in METHODS:
            entry: dict = {"case": case, "method": method, "draws": len(chosen)}
            for form in ("fp32", "int8", "int8_minus_fp32", "abs_int8_minus_fp32", "int8_full"):
                if form not in chosen[0][method]:
                    continue
                entry[form] = benchio.mean_std_per_metric([row[method][form] for row in chosen])
            summary.append(entry)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--draws", type=int, default=5, help="draws per order (0..draws-1)")
    parser.add_argument("--orders", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    options, prepared, labels, names, pool, test_idx, features, augmented, get_backbone = load_inputs(args.data)
    n_classes = len(names)
    images = prepared.images
    extractor = get_backbone()
    y_test = labels[test_idx]
    trainers: dict = {}
    rows: list[dict] = []
    print(cpu_description(), f"threads {args.threads}")
    total = len(args.orders) * args.draws
    started_all = time.perf_counter()
    for number in args.orders:
        order = ORDERS[number - 1]
        counts = [PROFILE[order.index(name)] for name in names]
        rarest = names.index(order[-1])
        label = f"255..8 order {number}"
        for draw in range(args.draws):
            started = time.perf_counter()
            sample = learningcurve_points.draw_sample(labels, pool, counts, seed=options.seed, draw=draw)
            weights = training.class_weights(labels[sample], n_classes, "balanced")
            seed = training.derived_seed(options.seed, "learning-curve-head", draw, len(sample))
            x_float, y_float = training_rows(features, labels, sample, augmented)
            chosen = calibration_indices(labels, sample, 200, seed=options.seed)
            calibration = images[chosen]

            # One int8 feature extractor (export's calibration) for the test images and the training
            # rows: the sample's 8 views, view-major like training_rows' float rows.
            wanted = np.concatenate([images[test_idx], all_views(images[sample])])
            quantized = int8_features(extractor, calibration, wanted, args.threads)
            test_int8, x_int8 = quantized[: len(test_idx)], quantized[len(test_idx) :]
            y_int8 = np.tile(labels[sample], 8)
            # The extractor calibrated on the 8 views of the same calibration images.
            test_int8_dihedral = int8_features(extractor, all_views(calibration), images[test_idx], args.threads)

            heads = {
                "baseline": train(trainers, x_float, y_float, weights, options=options, n_classes=n_classes, seed=seed),
                "int8_rows": train(
                    trainers,
                    np.concatenate([x_float, x_int8]),
                    np.concatenate([y_float, y_int8]),
                    weights,
                    options=options,
                    n_classes=n_classes,
                    seed=seed,
                ),
                "dropout_0.5": train(
                    trainers, x_float, y_float, weights, options=options, n_classes=n_classes, seed=seed, dropout=0.5
                ),
            }
            heads["dihedral_calibration"] = heads["baseline"]
            row: dict = {
                "case": label,
                "draw": draw,
                "n_train_images": int(len(sample)),
                "n_float_rows": int(len(x_float)),
                "n_calibration": int(len(calibration)),
                "rarest_class": names[rarest],
            }
            for method, head in heads.items():
                fp32 = scores(y_test, training.predict_proba(head, features[test_idx]), rarest, n_classes)
                on = test_int8_dihedral if method == "dihedral_calibration" else test_int8
                int8 = scores(y_test, training.predict_proba(head, on), rarest, n_classes)
                row[method] = {
                    "fp32": fp32,
                    "int8": int8,
                    "int8_minus_fp32": {k: round(int8[k] - fp32[k], 2) for k in fp32},
                    # The size of the gap whichever way it goes: draws of opposite sign cancel in the mean.
                    "abs_int8_minus_fp32": {k: round(abs(int8[k] - fp32[k]), 2) for k in fp32},
                }
            # The file `export` would write for the int8-robust head: backbone + head, full integer.
            joined = training.join_model(get_backbone(), heads["int8_rows"], name="int8_rows")
            interpreter = make_interpreter(
                convert(joined, "int8", calibration.astype(np.float32)), threads=args.threads
            )
            full = predict_tflite(interpreter, images[test_idx], progress=False)
            row["int8_rows"]["int8_full"] = scores(y_test, full, rarest, n_classes)
            row["seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            for method in METHODS:
                result = row[method]
                extra = (
                    f" | full-int8 file macro {result['int8_full']['recall_macro']:.2f}"
                    if "int8_full" in result
                    else ""
                )
                print(
                    f"{label} draw {draw} {method:>20}: fp32 macro {result['fp32']['recall_macro']:.2f} "
                    f"rarest {result['fp32']['rarest_recall']:.2f} | int8 macro {result['int8']['recall_macro']:.2f} "
                    f"rarest {result['int8']['rarest_recall']:.2f} | "
                    f"diff {result['int8_minus_fp32']['recall_macro']:+.2f}" + extra,
                    flush=True,
                )
            done = len(rows)
            elapsed = time.perf_counter() - started_all
            print(
                f"  {row['seconds']:.0f} s; {done}/{total} rows, ETA {elapsed / done * (total - done) / 60:.1f} min",
                flush=True,
            )
            # Saved after every row so an interrupted run keeps what it measured.
            benchio.save(
                "int8_robust_head",
                {"rows": rows, "summary": summarise(rows), "options": options.record()},
                threads=args.threads,
                out=args.out,
            )
    for entry in summarise(rows):
        text = f"{entry['case']} {entry['method']:>20} ({entry['draws']} draws):"
        for form in ("fp32", "int8", "int8_minus_fp32", "abs_int8_minus_fp32", "int8_full"):
            if form in entry:
                macro, rarest = benchio.pm(entry[form]["recall_macro"]), benchio.pm(entry[form]["rarest_recall"])
                text += f" {form} macro {macro} rarest {rarest};"
        print(text)


if __name__ == "__main__":
    main()
