"""Pointing game: does the heatmap's maximum fall on the annotated defect?

Usage (from the repository root)::

    python bench/pointing_game.py MODEL.keras [--run RUN] [--smoothgrad N] [--occlusion] [--out FILE.json]

MODEL is a run's `fold<k>.keras` (raw pixels in); RUN (default: the run folder holding MODEL) gives
the test split. For every TEST image whose NEU-DET boxes (ANNOTATIONS/<name>.xml, Pascal VOC, 200x200
coordinates) cover under half of the image, the heatmap of the predicted class, resized from the
224x224 model input back to 200x200, counts a hit when its maximum lies inside a box grown by 15 px
on each side. Random-point baseline: the expected hit rate of a uniformly random point (the area of
the grown boxes' union). Compared side by side: every (layer, method) of steeldefect.explain and
fusions of layers; with ``--smoothgrad N`` each map (and gradient x input, pooled to 28x28) averaged
over N noisy copies, alone and with flip-averaging; with ``--occlusion`` occlusion sensitivity on the
LiteRT fp32 model beside MODEL; then the head-randomisation sanity check of the default: Spearman rank correlation
between the trained model's maps and those of the same model with a random head.
"""

from __future__ import annotations

import argparse
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import keras
import numpy as np
from scipy.stats import spearmanr

import benchio
from steeldefect import explain
from steeldefect.cpuinfo import cpu_description
from steeldefect.pipeline import load_run_data, run_train_options

TOLERANCE = 15
SIZE = 200
LAYERS = ("head_relu", "block14_add", "block10_add", "block11_expand_relu", "block7_add", "block4_add")
FUSIONS = (
    ("block10_add", "block14_add"),
    ("block10_add", "head_relu"),
    ("block7_add", "block10_add", "block14_add"),
    ("block10_add", "block11_expand_relu"),
    ("block4_add", "block10_add", "block14_add"),
)


def read_boxes(path: Path) -> list[tuple[int, int, int, int]]:
    """(xmin, ymin, xmax, ymax) of every object in a Pascal VOC file."""
    root = ET.parse(path).getroot()
    boxes = []
    for box in root.iter("bndbox"):
        boxes.append(tuple(int(float(box.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax")))
    return boxes


def box_mask(boxes, grow: int = 0) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(0, y0 - 1 - grow) : min(SIZE, y1 + grow), max(0, x0 - 1 - grow) : min(SIZE, x1 + grow)] = True
    return mask


def hits(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Whether each map's maximum, mapped from the model input to 200x200, lies in its grown-box mask."""
    import tensorflow as tf

    small = np.asarray(tf.image.resize(maps[..., None], (SIZE, SIZE), method="bilinear")[..., 0])
    peaks = small.reshape(len(small), -1).argmax(axis=1)
    return masks.reshape(len(masks), -1)[np.arange(len(masks)), peaks]


def smoothgrad_maps(
    model, images: np.ndarray, layers, *, samples: int, sigma: float, seed: int = 0
) -> dict[tuple[str, str], np.ndarray]:
    """SmoothGrad (Smilkov et al. 2017) of every (layer, method) map and of gradient x input: each map
    averaged over ``samples`` copies of the image with Gaussian pixel noise (``sigma`` in 0..255
    units), alone and together with the same over the mirror images (flipped back: test-time
    augmentation), all for the class predicted on the clean image. Gradient x input (sum over RGB of
    |dS/dx * x|) is average-pooled to 28x28 before the peak is taken, so one noisy pixel cannot win.
    One forward and backward pass per batch gives every map."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    classes = model.predict(images.astype(np.float32), verbose=0, batch_size=16).argmax(axis=1)
    probe = keras.Model(model.inputs, [model.get_layer(name).output for name in layers] + [model.outputs[0]])
    final = explain._final_dense(model)
    size = images.shape[1]
    totals: dict = {}
    saved = final.activation
    final.activation = keras.activations.linear  # class logits, as explain.layer_maps does
    try:
        started = time.perf_counter()
        for mirrored in (False, True):
            base = images[:, :, ::-1] if mirrored else images
            for sample in range(samples):
                done = int(mirrored) * samples + sample
                if done:
                    left = (time.perf_counter() - started) / done * (2 * samples - done)
                    print(f"SmoothGrad: {done}/{2 * samples} noisy passes done, ETA {left:.0f} s", flush=True)
                noisy = np.clip(base + rng.normal(0, sigma, base.shape), 0, 255).astype(np.float32)
                for start in range(0, len(noisy), 16):
                    part = tf.constant(noisy[start : start + 16])
                    picked = tf.constant(classes[start : start + 16], dtype=tf.int64)
                    with tf.GradientTape() as tape:
                        tape.watch(part)
                        *activations, logits = probe(part, training=False)
                        score = tf.gather(logits, picked, axis=1, batch_dims=1)
                    *grads, grad_x = tape.gradient(score, [*activations, part])
                    parts = {}
                    for name, a, g in zip(layers, activations, grads):
                        for method in explain.METHODS:
                            cam = explain._combine(np.asarray(a), np.asarray(g), method)
                            parts[name, method] = np.asarray(
                                tf.image.resize(cam[..., None], (size, size), method="bilinear")[..., 0]
                            )
                    gxi = np.abs(np.asarray(grad_x) * noisy[start : start + 16]).sum(axis=3)
                    pooled = gxi.reshape(len(gxi), 28, size // 28, 28, size // 28).mean(axis=(2, 4))
                    parts["input", "gradient x input"] = np.asarray(
                        tf.image.resize(pooled[..., None], (size, size), method="bilinear")[..., 0]
                    )
                    for key, m in parts.items():
                        m = explain._normalise(m)
                        totals.setdefault((key, mirrored), np.zeros((len(images), size, size), np.float32))
                        totals[key, mirrored][start : start + 16] += m[:, :, ::-1] if mirrored else m
    finally:
        final.activation = saved
    out = {}
    for (key, mirrored), m in totals.items():
        if not mirrored:
            out[key[0], f"{key[1]}, SmoothGrad x{samples}"] = explain._normalise(m)
            out[key[0], f"{key[1]}, SmoothGrad x{samples} + flip"] = explain._normalise(m + totals[key, True])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--run", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/pointing_game.json"))
    parser.add_argument(
        "--occlusion",
        action="store_true",
        help="also occlusion sensitivity on MODEL's .fp32.tflite beside it (patch 48, stride 24; blur and mean fill)",
    )
    parser.add_argument(
        "--smoothgrad", type=int, default=0, metavar="N", help="also SmoothGrad of every map with N noisy copies"
    )
    parser.add_argument("--sigma", type=float, default=12.0, help="SmoothGrad pixel noise (0..255 units)")
    parser.add_argument("--threads", type=int, default=2, help="LiteRT threads for --occlusion")
    args = parser.parse_args(argv)
    run = args.run or args.model.resolve().parents[2]
    started = time.perf_counter()
    prepared, _ = load_run_data(run, progress=False)
    data_folder, _ = run_train_options(run)
    dataset, test = prepared.dataset, prepared.splits.test_indices
    annotations = Path(data_folder) / "ANNOTATIONS"
    rows, masks = [], []
    for i in test:
        xml = annotations / (dataset.paths[i].stem + ".xml")
        if not xml.is_file():
            continue
        boxes = read_boxes(xml)
        if boxes and box_mask(boxes).mean() < 0.5:
            rows.append(i)
            masks.append(box_mask(boxes, TOLERANCE))
    rows, masks = np.array(rows), np.stack(masks)
    labels = dataset.labels[rows]
    names = dataset.class_names
    print(f"{len(rows)} of {len(test)} test images have boxes covering under half the image")

    model = keras.models.load_model(args.model)
    images = prepared.images[rows]
    maps = explain.layer_maps(model, images, LAYERS, explain.METHODS)
    for fusion in FUSIONS:
        for method in explain.METHODS:
            maps[" + ".join(fusion), method] = explain._normalise(np.mean([maps[f, method] for f in fusion], axis=0))

    timings = {}
    if args.smoothgrad:
        tick = time.perf_counter()
        maps.update(
            smoothgrad_maps(
                model,
                images,
                ("head_relu", "block10_add", "block7_add"),
                samples=args.smoothgrad,
                sigma=args.sigma,
            )
        )
        timings["smoothgrad_s"] = time.perf_counter() - tick
    if args.occlusion:
        from steeldefect.modelfile import Classifier

        fp32 = args.model.with_name(args.model.name.split(".")[0] + ".fp32.tflite")
        classifier = Classifier(fp32, threads=args.threads)
        for fill in ("blur", "mean"):
            tick = time.perf_counter()
            maps["input", f"occlusion {fill} 48/24"] = explain.occlusion(
                classifier.probabilities, images.astype(np.uint8), patch=48, stride=24, fill=fill, progress=True
            )
            timings[f"occlusion_{fill}_s"] = time.perf_counter() - tick

    def per_class(hit: np.ndarray) -> dict[str, float]:
        return {name: float(hit[labels == c].mean()) for c, name in enumerate(names)}

    results = {}
    random_hit = masks.reshape(len(masks), -1).mean(axis=1)
    results["random point"] = {"overall": float(random_hit.mean()), "per_class": per_class(random_hit)}
    for (layer, method), m in maps.items():
        hit = hits(m, masks)
        results[f"{method} @ {layer}"] = {"overall": float(hit.mean()), "per_class": per_class(hit)}

    default = explain.grad_cam(model, images)
    trained_hit = hits(default, masks)
    randomised = explain.grad_cam(explain.randomize_head(model), images)
    rhos = [spearmanr(a.ravel(), b.ravel()).statistic for a, b in zip(default, randomised)]
    rhos = np.nan_to_num(np.array(rhos))
    sanity = {
        "median_spearman": float(np.median(rhos)),
        "mean_spearman": float(np.mean(rhos)),
        "randomised_head_pointing": float(hits(randomised, masks).mean()),
    }

    short = [n[:8] for n in names]
    print(f"\n{'heatmap':58s} {'overall':>7s} " + " ".join(f"{s:>8s}" for s in short))
    for name, r in sorted(results.items(), key=lambda kv: -kv[1]["overall"]):
        print(f"{name:58s} {r['overall']:7.3f} " + " ".join(f"{r['per_class'][n]:8.3f}" for n in names))
    print(
        f"\ndefault ({explain.DEFAULT_METHOD} @ {' + '.join(explain.DEFAULT_LAYERS)}): "
        f"{trained_hit.mean():.3f} overall; " + ", ".join(f"{n} {v:.2f}" for n, v in per_class(trained_hit).items())
    )
    print(
        f"head randomisation: Spearman rank correlation trained vs random-head maps, median "
        f"{sanity['median_spearman']:.3f} (mean {sanity['mean_spearman']:.3f}); random-head pointing "
        f"{sanity['randomised_head_pointing']:.3f}"
    )
    print(f"{cpu_description()}; {time.perf_counter() - started:.0f} s")
    benchio.save(
        "pointing_game",
        {
            "model": str(args.model),
            "n_images": len(rows),
            "tolerance_px": TOLERANCE,
            "results": results,
            "default": {
                "method": explain.DEFAULT_METHOD,
                "layers": list(explain.DEFAULT_LAYERS),
                "overall": float(trained_hit.mean()),
                "per_class": per_class(trained_hit),
            },
            "sanity": sanity,
            "timings_s": timings,
        },
        out=args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
