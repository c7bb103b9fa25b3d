"""What the OOD score costs at predict time: the classifier with the texture statistics as a second output.

Figures: docs/results.md, "Cost of the second output".

Usage (from the repository root)::

    python bench/ood_output_cost.py RUN [--fold 0] [--rounds 3] [--runs 30] [--out FILE.json]

Converts the run's fold model twice per variant (fp32, full-integer int8 calibrated on 200 training
images): as today (probabilities only) and with `uncertainty.texture_statistics_model`'s output added
as a second output. Times both at batch 1 in interleaved rounds, and checks the second output is
usable: the six-class OOD scorer fitted on fp32 statistics of the training images flags what share
of the test split and of the far-OOD set when fed each variant's statistics.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import keras
import numpy as np

import benchio
from steeldefect.core.cpuinfo import cpu_description
from steeldefect.core.runfolder import fold_model_path
from steeldefect.deploy.export import calibration_indices
from steeldefect.models.conversion import convert
from steeldefect.runtime import uncertainty
from steeldefect.runtime.litert import from_output, make_interpreter, resolve_threads, to_input
from steeldefect.study.evaluate import measure_latency
from steeldefect.study.rundata import load_run_data

BACKBONE = "efficientnet_lite0"


def run_all_outputs(interpreter, images: np.ndarray) -> list[np.ndarray]:
    """Every output for each image, ordered by width (probabilities first, statistics second)."""
    input_detail = interpreter.get_input_details()[0]
    details = sorted(interpreter.get_output_details(), key=lambda d: int(d["shape"][-1]))
    collected = [[] for _ in details]
    for image in images:
        interpreter.set_tensor(input_detail["index"], to_input(image, input_detail))
        interpreter.invoke()
        for slot, detail in zip(collected, details):
            slot.append(from_output(interpreter.get_tensor(detail["index"])[0], detail))
    return [np.stack(slot) for slot in collected]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/ood_output_cost.json"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    prepared, _ = load_run_data(args.run, progress=False)
    splits, labels = prepared.splits, prepared.dataset.labels
    model = keras.models.load_model(fold_model_path(args.run, BACKBONE, args.fold, "keras"))
    stats_model = uncertainty.texture_statistics_model(model)
    both = keras.Model(model.input, [model.output, stats_model.output], name="classifier_with_texture")
    channels = [int(model.get_layer(n).output.shape[-1]) for n in uncertainty.TEXTURE_LAYERS]
    calibration = prepared.images[calibration_indices(labels, splits.train_indices, 200, seed=0)]
    threads = resolve_threads(None)

    flatbuffers = {}
    for variant in ("fp32", "int8"):
        for name, keras_model in (("probabilities only", model), ("+ texture statistics", both)):
            flatbuffers[variant, name] = convert(keras_model, variant, calibration if variant == "int8" else None)
            print(f"converted {variant} {name}: {len(flatbuffers[variant, name]) / 2**20:.2f} MiB", flush=True)
    interpreters = {key: make_interpreter(buffer, threads) for key, buffer in flatbuffers.items()}
    image = prepared.images[splits.test_indices[0]]
    timings: dict[tuple[str, str], list[float]] = {key: [] for key in interpreters}
    for _ in range(args.rounds):
        for key, interpreter in interpreters.items():
            timings[key].append(measure_latency(interpreter, image, warmup=5, runs=args.runs)["latency_ms_median"])

    # Is the second output good enough to score with? Scorer fitted on fp32 statistics of training images.
    train, test = splits.train_indices, splits.test_indices
    examples = uncertainty.far_ood_examples(prepared.images[test[0]])
    far_images = np.stack(list(examples.values()))
    fp32_train = run_all_outputs(interpreters["fp32", "+ texture statistics"], prepared.images[train])[1]
    # fit_ood indexes the whole dataset: give it a full-size array with the training rows filled in.
    full = np.full((len(labels), fp32_train.shape[1]), np.nan)
    full[train] = fp32_train
    scorer, _ = uncertainty.fit_ood(uncertainty.texture_features(full, channels), labels, splits.folds)
    usable = {}
    for variant in ("fp32", "int8"):
        interpreter = interpreters[variant, "+ texture statistics"]
        probabilities, stats = run_all_outputs(interpreter, prepared.images[test])
        _, far_stats = run_all_outputs(interpreter, far_images)
        usable[variant] = {
            "test_accuracy": float((probabilities.argmax(1) == labels[test]).mean()),
            "test_flagged": float(scorer.is_uncertain(uncertainty.texture_features(stats, channels)).mean()),
            "far_ood_flagged": int(scorer.is_uncertain(uncertainty.texture_features(far_stats, channels)).sum()),
            "far_ood_total": len(examples),
        }

    print(f"\n{'variant':6s} {'outputs':22s} {'MiB':>6s} {'median ms (per round)':>28s}")
    result_rows = []
    for (variant, name), times in timings.items():
        size = len(flatbuffers[variant, name]) / 2**20
        print(f"{variant:6s} {name:22s} {size:6.2f} {' '.join(f'{t:7.2f}' for t in times):>28s}")
        result_rows.append({"variant": variant, "outputs": name, "mib": size, "median_ms_per_round": times})
    for variant, u in usable.items():
        print(
            f"{variant}: test accuracy {100 * u['test_accuracy']:.2f}%, test images flagged "
            f"{100 * u['test_flagged']:.1f}%, far-OOD flagged {u['far_ood_flagged']}/{u['far_ood_total']} "
            f"(scorer fitted on fp32 statistics)"
        )
    print(f"{cpu_description()}; {threads} threads; {time.perf_counter() - started:.0f} s")
    benchio.save(
        "ood_output_cost",
        {
            "threads": threads,
            "timings": result_rows,
            "second_output_usable": usable,
        },
        out=args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
