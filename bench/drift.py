"""Drift alarm: how fast it fires when the line's images change, and how often it fires when they do not.

Figures: docs/line-loop.md, "Drift alarms".

Runs the service's drift monitor class (:class:`steeldefect.serve.drift.DriftMonitor`, built from the
deploy model as the service builds it, default window and thresholds) directly on the deploy model's
answers, without HTTP: each image is classified once with the model's own uncertainty rule, then
streams are replayed from those answers.

- In distribution: with ``--run RUN``, the run's own test split: images drawn at random with the
  training images (stratified, ``--seed`` of `train`), which no model of the run saw. Without it,
  NEU images by index (``--unseen-from``/``--unseen-to`` of each class, e.g. 151-300 for a model
  trained on 1-150; NEU's later images differ from its first ones, so that is a shift, not
  in-distribution). Resampled with replacement, ``--quiet`` images per stream (default 5,000),
  ``--repeats`` streams: false alarms counted.
- Drift: ``--warm`` in-distribution images (default 500, a full window), then the same unseen images
  altered (Gaussian blur, a brightness shift, a 90-degree rotation): images from the switch to the
  alarm, per repeat (a miss if it has not fired after 500).

    python bench/drift.py --run RUN                      # RUN/deploy/model.int8.tflite on RUN's test split
    python bench/drift.py --model MODEL.tflite --unseen-from 151 --unseen-to 300
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchio  # noqa: E402
from steeldefect.core.runfolder import deployable_model  # noqa: E402
from steeldefect.data.dataset import CLASS_NAMES_NEU  # noqa: E402
from steeldefect.data.decode import decode_image  # noqa: E402
from steeldefect.runtime.modelfile import Classifier, read_model_info  # noqa: E402
from steeldefect.serve.drift import monitor_for  # noqa: E402
from steeldefect.study.rundata import load_run_data  # noqa: E402

ALTERATIONS = {
    "blur": lambda im: im.filter(ImageFilter.GaussianBlur(3)),
    "brighter": lambda im: ImageEnhance.Brightness(im).enhance(1.5),
    "darker": lambda im: ImageEnhance.Brightness(im).enhance(0.6),
    "rotate90": lambda im: im.rotate(90),
}
LIMIT = 500  # the target: the alarm within 500 images of the switch


def answers(classifier: Classifier, images: list[bytes], size: tuple[int, int]) -> list[tuple[str, bool | None]]:
    out = []
    for start in range(0, len(images), 32):
        batch = np.stack([decode_image(data, size, "image") for data in images[start : start + 32]])
        judged = classifier.judge(batch)
        for i, p in enumerate(judged.probabilities):
            flag = None if judged.uncertain is None else bool(judged.uncertain[i])
            out.append((classifier.info.class_names[int(np.argmax(p))], flag))
    return out


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="a run folder: its deploy int8 model on its test split")
    parser.add_argument("--model", type=Path, default=None, help="the deploy .tflite (with its drift reference)")
    parser.add_argument("--images", type=Path, default=Path("/work/shared/data/NEU-DET/IMAGES"))
    parser.add_argument("--unseen-from", type=int, default=151, help="first NEU index per class the run never saw")
    parser.add_argument("--unseen-to", type=int, default=300)
    parser.add_argument("--quiet", type=int, default=5000, help="in-distribution images per false-alarm stream")
    parser.add_argument("--warm", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    if args.run is None and args.model is None:
        parser.error("give --run RUN or --model MODEL")
    if args.run is not None:
        prepared, _ = load_run_data(args.run, progress=False)
        args.model = args.model or deployable_model(args.run, "int8")
        paths = [prepared.dataset.paths[i] for i in prepared.splits.test_indices]
        labels = [prepared.dataset.class_names[prepared.dataset.labels[i]] for i in prepared.splits.test_indices]
        unseen = f"the test split of {args.run} ({len(paths)} images, stratified at random)"
    else:
        paths = [
            args.images / f"{name}_{i}.jpg"
            for name in CLASS_NAMES_NEU
            for i in range(args.unseen_from, args.unseen_to + 1)
            if (args.images / f"{name}_{i}.jpg").is_file()
        ]
        labels = [p.name.rsplit("_", 1)[0] for p in paths]
        unseen = f"{args.unseen_from}-{args.unseen_to} of each class"
    info = read_model_info(args.model)
    classifier = Classifier(args.model, threads=None, info=info)
    raw = [path.read_bytes() for path in paths]
    started = time.perf_counter()
    clean = answers(classifier, raw, info.input_size)
    altered = {
        name: answers(
            classifier, [jpeg(change(Image.open(io.BytesIO(d)).convert("RGB"))) for d in raw], info.input_size
        )
        for name, change in ALTERATIONS.items()
    }
    classify_seconds = time.perf_counter() - started
    rng = np.random.default_rng(args.seed)
    reference = monitor_for(info)

    def uncertain_share(stream):
        flags = [u for _, u in stream if u is not None]
        return round(float(np.mean(flags)), 4) if flags else None

    quiet = []
    for _ in range(args.repeats):
        monitor = monitor_for(info)
        changes = [monitor.observe(*clean[i]) for i in rng.integers(0, len(clean), args.quiet)]
        quiet.append({"images": args.quiet, "false_alarms": changes.count("start"), "alarm_at_end": monitor.alarm})
    drift = {}
    for name, stream in altered.items():
        delays = []
        for _ in range(args.repeats):
            monitor = monitor_for(info)
            for i in rng.integers(0, len(clean), args.warm):
                monitor.observe(*clean[i])
            warm_alarm = monitor.alarm
            delay = None
            for n, i in enumerate(rng.integers(0, len(stream), LIMIT), start=1):
                if monitor.observe(*stream[i]) == "start" or (monitor.alarm and not warm_alarm):
                    delay = n
                    break
            delays.append({"images_to_alarm": delay, "alarm_before_switch": warm_alarm})
        fired = [d["images_to_alarm"] for d in delays if d["images_to_alarm"] is not None]
        drift[name] = {
            "uncertain_share": uncertain_share(stream),
            "top1_share": {c: round(sum(a == c for a, _ in stream) / len(stream), 3) for c in info.class_names},
            "fired": f"{len(fired)}/{len(delays)}",
            "images_to_alarm": [d["images_to_alarm"] for d in delays],
            "median_images_to_alarm": None if not fired else float(np.median(fired)),
        }
    summary = {
        "model": str(args.model),
        "model_sha256": info.sha256,
        "how": "DriftMonitor called directly on the deploy model's answers (no HTTP); streams resampled with "
        "replacement from NEU images the run never saw",
        "unseen_images": len(raw),
        "unseen_indices": unseen,
        "window": reference.window,
        "min_images": reference.min_images,
        "alarm_p": reference.alarm_p,
        "clear_p": reference.clear_p,
        "training_class_mix": reference.reference.class_mix,
        "expected_uncertain_rate": reference.reference.expected_uncertain_rate,
        "in_distribution_uncertain_share": uncertain_share(clean),
        "in_distribution_accuracy": round(
            float(np.mean([a == label for (a, _), label in zip(clean, labels, strict=True)])), 4
        ),
        "false_alarms": {
            "streams": len(quiet),
            "images_per_stream": args.quiet,
            "total": sum(q["false_alarms"] for q in quiet),
            "per_stream": [q["false_alarms"] for q in quiet],
        },
        "drift": drift,
        "classify_seconds": round(classify_seconds, 1),
        "note": "shared 2-core machine; the alarm figures do not depend on speed",
    }
    for name, result in drift.items():
        print(
            f"{name:9s} uncertain {result['uncertain_share']}: fired {result['fired']}, "
            f"images {result['images_to_alarm']}"
        )
    print(f"false alarms over {len(quiet)} x {args.quiet} in-distribution images: {summary['false_alarms']['total']}")
    benchio.save("drift", summary, threads="all", out=args.out)


if __name__ == "__main__":
    main()
