"""Classify new images with a deployed model (.tflite or .keras) and the class names beside it.

A model's sidecar ``<model>.json`` carries its class names and input size, so a model file and its
sidecar are all a deployment needs. A bad image is reported on its own line; the rest still run.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from steeldefect.files import read_json
from steeldefect.runfolder import sidecar_path


@dataclass
class Prediction:
    path: Path
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None


def load_metadata(model_path: Path) -> dict:
    meta_path = sidecar_path(Path(model_path))
    if not Path(model_path).is_file():
        raise FileNotFoundError(f"{model_path}: model file not found")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: metadata missing; it must travel with the model (class names, input size)")
    meta = read_json(meta_path)
    if not meta.get("class_names"):
        raise ValueError(f"{meta_path}: no class_names in the model metadata")
    return meta


def collect_images(paths: Sequence[Path]) -> list[Path]:
    """Files as given, and under given folders every file the dataset scan would consider an image
    candidate (hidden files and text side files are skipped), sorted."""
    from steeldefect.data import candidate_files

    found: list[Path] = []
    for path in map(Path, paths):
        found.extend(sorted(candidate_files(path)) if path.is_dir() else [path])
    return found


class _Runner:
    """One loaded model answering batch-1 probability queries."""

    def __init__(self, model_path: Path, threads: int | None) -> None:
        self.keras_model = None
        if Path(model_path).suffix == ".keras":
            import keras

            self.keras_model = keras.models.load_model(model_path)
        else:
            from steeldefect.evaluate import make_interpreter

            self.interpreter = make_interpreter(model_path, threads)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self.keras_model is not None:
            return np.asarray(self.keras_model.predict_on_batch(image[None].astype(np.float32)))[0]
        from steeldefect.evaluate import predict_tflite

        return predict_tflite(self.interpreter, image[None])[0]


def predict_paths(
    model_path: Path, paths: Sequence[Path], *, top_k: int = 1, threads: int | None = None, progress: bool = False
) -> list[Prediction]:
    from steeldefect.data import read_image

    meta = load_metadata(model_path)
    class_names = meta["class_names"]
    size = (int(meta["input"]["height"]), int(meta["input"]["width"]))
    runner = _Runner(Path(model_path), threads)
    top_k = max(1, min(top_k, len(class_names)))
    results = []
    for path in tqdm(collect_images(paths), desc="predict", unit="img", disable=not progress):
        try:
            image = read_image(path, size)
        except Exception as error:  # any unreadable file is that file's problem, not the batch's
            results.append(Prediction(path, error=str(error)))
            continue
        probabilities = runner(image)
        order = np.argsort(probabilities)[::-1][:top_k]
        results.append(Prediction(path, [(class_names[i], float(probabilities[i])) for i in order]))
    return results


def format_predictions(results: Sequence[Prediction], fmt: str = "table") -> str:
    """Lines for each image (or the error), then a per-class count summary for table output."""
    if fmt == "json":
        return json.dumps(
            [
                {"file": str(r.path), "error": r.error,
                 "predictions": [{"class": c, "probability": round(p, 6)} for c, p in r.top]}
                for r in results
            ],
            indent=2,
        )
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["file", "rank", "class", "probability", "error"])
        for r in results:
            if r.error:
                writer.writerow([r.path, "", "", "", r.error])
            for rank, (name, probability) in enumerate(r.top, 1):
                writer.writerow([r.path, rank, name, f"{probability:.6f}", ""])
        return buffer.getvalue().rstrip("\n")
    lines = []
    for r in results:
        if r.error:
            lines.append(f"{r.path}: ERROR {r.error}")
        else:
            lines.append(f"{r.path}: " + ", ".join(f"{name} {probability:.3f}" for name, probability in r.top))
    counts: dict[str, int] = {}
    for r in results:
        if r.top:
            counts[r.top[0][0]] = counts.get(r.top[0][0], 0) + 1
    failed = sum(1 for r in results if r.error)
    lines.append(
        f"summary: {len(results) - failed} classified, {failed} failed; "
        + ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))
    )
    return "\n".join(lines)
