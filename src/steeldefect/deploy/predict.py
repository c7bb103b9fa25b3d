"""Classify new images with a deployed model (.tflite or .keras).

An exported .tflite carries its class names and input size inside, so the model file is all a
deployment needs; a .keras model (or an older export) reads them from its sidecar ``<model>.json``.
A bad image is reported on its own line; the rest still run.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from steeldefect.runtime.modelfile import Classifier, read_model_info
from steeldefect.runtime.modelfile import top_k as top_k_classes


@dataclass
class Prediction:
    path: Path
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    # None when the model carries no uncertainty rule (a .keras model, an older export)
    uncertain: bool | None = None


def collect_images(paths: Sequence[Path]) -> list[Path]:
    """Files as given, and under given folders every file the dataset scan would consider an image
    candidate (hidden files and text side files are skipped), sorted."""
    from steeldefect.data.dataset import candidate_files

    found: list[Path] = []
    for path in map(Path, paths):
        found.extend(sorted(candidate_files(path)) if path.is_dir() else [path])
    return found


class _KerasRunner:
    """A .keras model answering probability queries (for models not yet exported)."""

    def __init__(self, model_path: Path) -> None:
        import keras

        self.model = keras.models.load_model(model_path)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(images.astype(np.float32)))


def predict_paths(
    model_path: Path,
    paths: Sequence[Path],
    *,
    top_k: int = 1,
    threads: int | None = None,
    progress: bool = False,
    accept: float | None = None,
) -> list[Prediction]:
    from steeldefect.data.decode import read_image

    model_path = Path(model_path)
    if model_path.is_dir():  # a run folder: its model to deploy
        from steeldefect.core.runfolder import deployable_model

        model_path = deployable_model(model_path)
    info = read_model_info(model_path)
    keras_model = model_path.suffix == ".keras"
    runner = _KerasRunner(model_path) if keras_model else Classifier(model_path, threads, info, accept=accept)
    results = []
    for path in tqdm(collect_images(paths), desc="predict", unit="img", disable=not progress):
        try:
            image = read_image(path, info.input_size)
        except Exception as error:  # any unreadable file is that file's problem, not the batch's
            results.append(Prediction(path, error=str(error)))
            continue
        if isinstance(runner, _KerasRunner):  # a .keras model carries no uncertainty rule
            probabilities, uncertain = runner.probabilities(image[None])[0], None
        else:
            judgement = runner.judge(image[None])
            probabilities = judgement.probabilities[0]
            uncertain = None if judgement.uncertain is None else bool(judgement.uncertain[0])
        results.append(Prediction(path, top_k_classes(probabilities, info.class_names, top_k), uncertain=uncertain))
    return results


def format_predictions(results: Sequence[Prediction], fmt: str = "table") -> str:
    """Lines for each image (or the error), then a per-class count summary for table output."""
    if fmt == "json":
        return json.dumps(
            [
                {
                    "file": str(r.path),
                    "error": r.error,
                    "uncertain": r.uncertain,
                    "predictions": [{"class": c, "probability": round(p, 6)} for c, p in r.top],
                }
                for r in results
            ],
            indent=2,
        )
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["file", "rank", "class", "probability", "uncertain", "error"])
        for r in results:
            if r.error:
                writer.writerow([r.path, "", "", "", "", r.error])
            flag = "" if r.uncertain is None else str(r.uncertain).lower()
            for rank, (name, probability) in enumerate(r.top, 1):
                writer.writerow([r.path, rank, name, f"{probability:.6f}", flag, ""])
        return buffer.getvalue().rstrip("\n")
    lines = []
    for r in results:
        if r.error:
            lines.append(f"{r.path}: ERROR {r.error}")
        else:
            answer = ", ".join(f"{name} {probability:.3f}" for name, probability in r.top)
            lines.append(f"{r.path}: " + ("UNCERTAIN (most likely " + answer + ")" if r.uncertain else answer))
    counts: dict[str, int] = {}
    for r in results:
        if r.top:
            counts[r.top[0][0]] = counts.get(r.top[0][0], 0) + 1
    failed = sum(1 for r in results if r.error)
    uncertain = sum(1 for r in results if r.uncertain)
    lines.append(
        f"summary: {len(results) - failed} classified, {failed} failed"
        + (f", {uncertain} uncertain" if any(r.uncertain is not None for r in results) else "")
        + "; "
        + ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))
    )
    return "\n".join(lines)
