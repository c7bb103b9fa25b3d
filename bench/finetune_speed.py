"""Fine-tuning speed, side by side: augmentation in the graph vs cached frozen-bottom activations.

Figures: docs/results.md, "Fine-tuning speed".

Usage (from the repository root)::

    python bench/finetune_speed.py [NEU-DET folder] [--blocks 2] [--images 128] [--steps 4] [--out FILE.json]

Both ways train the same thing: EfficientNet-Lite0's top ``--blocks`` blocks plus a pooled head
(BatchNormalization frozen) with Adam, batch 32, on real NEU images.

* graph: augmentation -> frozen bottom -> top -> head, one training step per batch: the whole
  backbone runs forward for every image in every epoch.
* cached: the augmentation and the frozen bottom run once per image and view (timed: "bottom"),
  then training steps run on the cached activations only (timed: "top").

Prints images/s of each part (tracing untimed) and the projected wall
time of a full-NEU fine-tuning (5 folds of 1,224 training images + the final model on 1,530) for
``--epochs`` epochs, one cached view per epoch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import keras
import numpy as np

import benchio
from steeldefect.core.cpuinfo import cpu_description
from steeldefect.data import augment
from steeldefect.data.dataset import scan_dataset
from steeldefect.data.loading import load_images
from steeldefect.models import finetune, training

DEFAULT_NEU_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "NEU-DET"
FOLD_TRAIN, ALL_TRAIN, N_FOLDS = 1224, 1530, 5


def load_average() -> float:
    return round(float(Path("/proc/loadavg").read_text().split()[0]), 2)


def main(argv: list[str] | None = None) -> int:
    import tensorflow as tf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, nargs="?", default=DEFAULT_NEU_DIR)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per way")
    parser.add_argument("--epochs", type=int, default=10, help="epochs for the projected full-NEU time")
    parser.add_argument("--out", type=Path, default=benchio.RESULTS_DIR / "finetune_speed.json")
    args = parser.parse_args(argv)

    dataset, images = load_images(scan_dataset(args.data), progress=False)
    pick = np.random.default_rng(0).permutation(len(images))[: args.images]
    images, labels = images[pick], dataset.labels[pick]
    n_classes = len(dataset.class_names)
    y = keras.utils.to_categorical(labels, n_classes).astype(np.float32)
    load_before = load_average()

    split = finetune.build_split("efficientnet_lite0", args.blocks, image_size=images.shape[1:3])
    head = training.build_head(split.top.output.shape[1:], n_classes, kind="pooled")
    augmentation = augment.augmentation_model(0, tuple(images.shape[1:3]))
    variables = [v for layer in split.trained_layers for v in layer.trainable_weights] + list(head.trainable_weights)
    loss_function = keras.losses.CategoricalCrossentropy()

    def stepper(model):
        optimizer = keras.optimizers.Adam(1e-4)
        optimizer.build(variables)

        @tf.function(reduce_retracing=True)
        def step(x, target):
            with tf.GradientTape() as tape:
                loss = loss_function(target, model(x, training=True))
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return loss

        return step

    pixels = keras.Input(images.shape[1:], name="pixels")
    graph_model = keras.Model(pixels, head(split.top(split.bottom(augmentation(pixels), training=False))))
    top_model = keras.Model(split.top.input, head(split.top.output))
    batches = [slice(s, s + args.batch_size) for s in range(0, len(images), args.batch_size)]

    def timed_steps(step, inputs) -> float:
        step(inputs(batches[0]), y[batches[0]])  # tracing, untimed
        done, started = 0, time.perf_counter()
        for i in range(args.steps):
            rows = batches[i % len(batches)]
            step(inputs(rows), y[rows])
            done += len(y[rows])
        return done / (time.perf_counter() - started)

    graph_ips = timed_steps(stepper(graph_model), lambda rows: images[rows].astype(np.float32))

    def bottom_seconds(n: int):
        started = time.perf_counter()
        result = finetune.compute_activations(
            split.bottom, images[:n], np.arange(n), np.zeros(0, np.int64), views=1, seed=0, progress=False
        )
        return time.perf_counter() - started, result

    # Each call traces its functions again: the rate is taken from the difference of a one-batch
    # call and a full call, so the one-off tracing cancels out.
    one_batch, _ = bottom_seconds(args.batch_size)
    everything, activations = bottom_seconds(len(images))
    bottom_ips = (len(images) - args.batch_size) / max(everything - one_batch, 1e-9)
    cached = activations.views[0]
    top_ips = timed_steps(stepper(top_model), lambda rows: cached[rows].astype(np.float32))
    load_after = load_average()

    trained_images = args.epochs * (N_FOLDS * FOLD_TRAIN + ALL_TRAIN)
    bottom_images = args.epochs * ALL_TRAIN + 1800  # every view of every training image + each image plain
    graph_minutes = trained_images / graph_ips / 60
    cached_minutes = (bottom_images / bottom_ips + trained_images / top_ips) / 60
    results = {
        "protocol": {
            "backbone": "efficientnet_lite0",
            "blocks": args.blocks,
            "trained_layers": [layer.name for layer in split.trained_layers],
            "images": len(images),
            "batch_size": args.batch_size,
            "timed_steps": args.steps,
            "projection": f"{args.epochs} epochs x (5 folds x {FOLD_TRAIN} + final {ALL_TRAIN}) training images",
        },
        "load_average_1min": {"before": load_before, "after": load_after},
        "images_per_second": {
            "graph_train_step": round(graph_ips, 1),
            "cached_bottom_forward_with_augmentation": round(bottom_ips, 1),
            "cached_top_train_step": round(top_ips, 1),
        },
        "projected_full_neu_minutes": {"graph": round(graph_minutes, 1), "cached": round(cached_minutes, 1)},
    }
    print(f"cpu: {cpu_description()}; load average {load_before} -> {load_after}")
    print(f"top {args.blocks} blocks: {', '.join(results['protocol']['trained_layers'])}")
    for key, value in results["images_per_second"].items():
        print(f"  {key:42s} {value:8.1f} images/s")
    print(
        f"projected full NEU ({args.epochs} epochs, 5 folds + final): graph {graph_minutes:.1f} min, "
        f"cached {cached_minutes:.1f} min"
    )
    benchio.save("finetune_speed", results, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
