"""Heatmaps for image files (`predict --explain`, the study's gallery): the run's Keras model for a
model file, the output folder and PNG names, the overlays saved atomically, and the gallery of test
images that the report shows. The maps themselves come from :mod:`steeldefect.deploy.explain`."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from steeldefect.deploy.explain import ATTENTION, ATTENTION_SMOOTHING, DEFAULT_LAYERS, heatmaps, method_for_file, peak


def save_overlay(image: np.ndarray, heatmap: np.ndarray, title: str, path: str | Path, *, alpha: float = 0.45) -> Path:
    """PNG: the image with the heatmap (jet colours, ``alpha`` opacity) over it, its maximum marked
    with a white cross, and ``title`` above (also stored as the PNG's ``Title`` text field)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from steeldefect.core.files import atomic_write_bytes

    image = np.asarray(image)
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.shape != image.shape[:2]:
        import tensorflow as tf

        heatmap = np.asarray(tf.image.resize(heatmap[..., None], image.shape[:2], method="bilinear")[..., 0])
    fig = Figure(figsize=(3.4, 3.7))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.86))
    ax.imshow(image)
    ax.imshow(heatmap, cmap="jet", alpha=alpha, vmin=0, vmax=1)
    row, col = peak(heatmap)
    ax.plot(col, row, marker="+", color="white", markersize=14, markeredgewidth=2)
    ax.set_axis_off()
    fig.suptitle(title, fontsize=9, y=0.97)
    buffer = io.BytesIO()
    # The title also goes into the PNG's text metadata, so a script (or a test) can read it back.
    fig.savefig(buffer, format="png", dpi=110, metadata={"Title": title})
    return atomic_write_bytes(path, buffer.getvalue())


NO_GRADIENTS = "an exported model (.tflite, .onnx, .xml) has no gradients; give the run folder or the .keras model"


@dataclass
class Explanation:
    """One image explained: its most likely classes, the heatmap of the first and the PNG written
    (overlay with "<class> <probability>" above it), or the reason the image could not be read."""

    path: Path
    top: list[tuple[str, float]] = field(default_factory=list)
    heatmap: np.ndarray | None = field(default=None, repr=False)
    png: Path | None = None
    error: str | None = None

    @property
    def class_name(self) -> str | None:
        return self.top[0][0] if self.top else None

    @property
    def probability(self) -> float | None:
        return self.top[0][1] if self.top else None


def keras_model_for(model: str | Path) -> Path:
    """The .keras model that heatmaps need for MODEL: a run folder's ``deploy/model.keras``, a
    ``.keras`` file itself, or for an exported model (.tflite, .onnx, .xml) the .keras beside it with the same stem
    (``fold<k>.int8.tflite`` -> ``fold<k>.keras``, ``deploy/model.int8.tflite`` -> ``deploy/model.keras``).
    :class:`ModelFileError` (one line naming the file) when there is none."""
    from steeldefect.core.runfolder import config_path, deploy_model_path
    from steeldefect.runtime.backends import is_model_file
    from steeldefect.runtime.litert import ModelFileError

    model = Path(model)
    if model.is_dir():
        if not config_path(model).is_file():
            raise ModelFileError(f"{model}: not a run folder (no config.json)")
        keras_path = deploy_model_path(model, "keras")
        if not keras_path.is_file():
            raise ModelFileError(f"{keras_path}: this run has no model to deploy yet (run `steeldefect train {model}`)")
        return keras_path
    if not model.is_file():
        raise ModelFileError(f"{model}: model file not found")
    if model.suffix == ".keras":
        return model
    if is_model_file(model):  # .tflite, .onnx, OpenVINO .xml: no gradients, the .keras beside it has them
        beside = model.with_name(model.name.split(".")[0] + ".keras")
        if beside.is_file():
            return beside
        raise ModelFileError(f"{model}: {NO_GRADIENTS} (no {beside.name} beside it)")
    raise ModelFileError(f"{model}: not a model file (.keras, .tflite, .onnx, .xml) or run folder")


def prepare_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` created if needed and checked writable, before any work: ValueError (one line) if not."""
    import os

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: --explain needs a folder for the heatmaps, and this is a file")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{out_dir}: cannot create the heatmap folder ({error.strerror or error})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ValueError(f"{out_dir}: heatmap folder is not writable")
    return out_dir


def png_names(paths: Sequence[str | Path]) -> list[str]:
    """One PNG name per image, from its file name (``crazing_5.jpg`` -> ``crazing_5.png``); images
    sharing a stem (``a.jpg`` and ``a.png``, or the same name in two folders) get ``_2``, ``_3``...
    in input order, so no heatmap overwrites another."""
    taken: set[str] = set()
    names = []
    for path in paths:
        stem = Path(path).stem or "image"
        name, n = f"{stem}.png", 1
        while name.lower() in taken:
            n += 1
            name = f"{stem}_{n}.png"
        taken.add(name.lower())
        names.append(name)
    return names


def title(class_name: str, probability: float) -> str:
    return f"{class_name} {probability:.3f}"


def explain_paths(
    model: str | Path | Any,
    paths: Sequence[str | Path],
    out_dir: str | Path | None,
    *,
    method: str | None = None,
    layer: str | Sequence[str] | None = None,
    top_k: int = 1,
    batch_size: int = 16,
    class_names: Sequence[str] | None = None,
    answers: Sequence[Sequence[tuple[str, float]] | None] | None = None,
    uncertain: Sequence[bool | None] | None = None,
    progress: bool = True,
) -> list[Explanation]:
    """Classify each image with the Keras model of MODEL (a run folder, a ``.keras``, a ``.tflite``
    with its ``.keras`` beside it: :func:`keras_model_for`; or a loaded Keras model, whose classes are
    ``class_names``, else numbered), compute the
    heatmap of its most likely class and, when ``out_dir`` is given, write the overlay PNG there
    (names from :func:`png_names`, atomic writes). A file that cannot be read gets its own error;
    the rest still run.

    ``answers``: per image, the (class, probability) list another model of the same run gave (the
    deployed .tflite that `predict` printed); the heatmap then explains that answer's first class and
    the title shows it, so the PNG never contradicts the printed line (an int8 model may rank the
    classes of a borderline image differently from its .keras). None: the Keras model's own answer.
    ``method`` None: the model's :func:`default_method`.
    ``uncertain``: per image, whether that model flagged it; the title then says "(uncertain)"."""
    import keras
    from tqdm.auto import tqdm

    from steeldefect.data.decode import read_image
    from steeldefect.runtime.modelfile import read_model_info
    from steeldefect.runtime.modelfile import top_k as top_k_classes

    if isinstance(model, (str, Path)):
        keras_path = keras_model_for(model)
        info = read_model_info(keras_path)
        class_names, size = info.class_names, info.input_size
        model = keras.models.load_model(keras_path)
        keras_label = str(keras_path)
    else:
        keras_label = model.name
        size = (int(model.inputs[0].shape[1]), int(model.inputs[0].shape[2]))
        class_names = tuple(class_names or (str(i) for i in range(int(model.outputs[0].shape[-1]))))
    class_names = list(class_names)
    directory = None if out_dir is None else prepare_out_dir(out_dir)
    files = [Path(p) for p in paths]
    names = png_names(files)
    results = [Explanation(path) for path in files]
    with tqdm(total=len(files), desc="explain", unit="img", disable=not progress) as bar:
        for start in range(0, len(files), batch_size):
            batch, rows = [], []
            for i in range(start, min(start + batch_size, len(files))):
                try:
                    batch.append(read_image(files[i], size))
                    rows.append(i)
                except Exception as error:  # an unreadable file is that file's problem, not the batch's
                    results[i].error = str(error)
            if batch:
                images = np.stack(batch)
                probabilities = np.asarray(model.predict_on_batch(images.astype(np.float32)))
                tops = [
                    list(answer)
                    if answers is not None and (answer := answers[i])
                    else top_k_classes(p, class_names, top_k)
                    for i, p in zip(rows, probabilities)
                ]
                unknown = {top[0][0] for top in tops} - set(class_names)
                if unknown:
                    raise ValueError(
                        f"{keras_label}: has no class {', '.join(sorted(unknown))} (classes of another model?)"
                    )
                explained = [class_names.index(top[0][0]) for top in tops]
                maps = heatmaps(model, images, explained, layer, method=method)
                for i, image, top, heatmap in zip(rows, images, tops, maps):
                    results[i].top = top
                    results[i].heatmap = heatmap
                    if directory is not None:
                        text = title(*results[i].top[0]) + (" (uncertain)" if uncertain and uncertain[i] else "")
                        results[i].png = save_overlay(image, heatmap, text, directory / names[i])
            bar.update(min(batch_size, len(files) - start))
    return results


def write_gallery(
    run: str | Path,
    backbone: str,
    images: np.ndarray,
    labels: np.ndarray,
    files: Sequence[str],
    class_names: Sequence[str],
    *,
    model_path: str | Path | None = None,
    per_class: int = 2,
    method: str | None = None,
    layer: str | Sequence[str] | None = None,
    progress: bool = True,
) -> Path:
    """The report's heatmap gallery of a run's TEST images (``images``, ``labels``, ``files`` as in
    splits.csv): for each class the first ``per_class`` correctly classified images (file order) and
    EVERY misclassified or uncertain one, each as an overlay PNG, listed in ``gallery.csv`` (file,
    label, predicted, probability, uncertain, png) under :func:`runfolder.gallery_dir`.

    The model is the run's final (deploy) ``.keras`` of ``backbone`` unless ``model_path`` names
    another. "Uncertain" comes from the trust step's ``test_predictions.csv`` when it exists (its
    ``uncertain`` column); without it no image is uncertain. A gallery already written for the same
    model, method and uncertain flags is kept (re-runs resume)."""
    import keras

    from steeldefect.core import runfolder
    from steeldefect.core.files import file_digest, read_json, write_csv, write_json

    run = Path(run)
    model_path = Path(model_path or runfolder.fold_model_path(run, backbone, runfolder.FINAL, "keras"))
    directory = runfolder.gallery_dir(run, backbone)
    csv_path, record_path = runfolder.gallery_csv_path(run, backbone), runfolder.gallery_record_path(run, backbone)
    uncertain_path = runfolder.test_predictions_path(run, backbone)
    flags = _uncertain_flags(uncertain_path, files)
    method = method or method_for_file(model_path)
    layers = [layer] if isinstance(layer, str) else list(layer or DEFAULT_LAYERS)
    record = {
        "model": str(model_path),
        "model_sha256": file_digest(model_path),
        "method": method,
        "layers": [ATTENTION] if method == ATTENTION else layers,
        "smoothing": ATTENTION_SMOOTHING if method == ATTENTION else 0,
        "per_class": per_class,
        "files": list(files),
        "uncertain": sorted(f for f, u in zip(files, flags) if u),
    }
    if record_path.is_file() and csv_path.is_file() and read_json(record_path) == record:
        return csv_path
    model = keras.models.load_model(model_path)
    images, labels = np.asarray(images), np.asarray(labels)
    probabilities = (
        np.concatenate(
            [
                np.asarray(model.predict_on_batch(images[i : i + 32].astype(np.float32)))
                for i in range(0, len(images), 32)
            ]
        )
        if len(images)
        else np.zeros((0, len(class_names)), np.float32)
    )
    predicted = probabilities.argmax(axis=1)
    chosen = []
    for c in range(len(class_names)):
        correct = [i for i in range(len(files)) if labels[i] == c and predicted[i] == c and not flags[i]]
        chosen += correct[:per_class]
    chosen += [i for i in range(len(files)) if predicted[i] != labels[i] or flags[i]]
    names = png_names([files[i] for i in chosen])
    rows = []
    directory.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(chosen), 16), desc="gallery", unit="batch", disable=not progress):
        part = chosen[start : start + 16]
        maps = heatmaps(model, images[part], predicted[part], layer, method=method)
        for k, (i, heatmap) in enumerate(zip(part, maps)):
            name = names[start + k]
            label, guess, p = class_names[labels[i]], class_names[predicted[i]], float(probabilities[i, predicted[i]])
            caption = (
                title(guess, p) + (" (uncertain)" if flags[i] else "") + ("" if guess == label else f" - is {label}")
            )
            save_overlay(images[i], heatmap, caption, directory / name)
            rows.append(
                {
                    "file": files[i],
                    "label": label,
                    "predicted": guess,
                    "probability": f"{p:.6f}",
                    "uncertain": "true" if flags[i] else "false",
                    "png": name,
                }
            )
    write_csv(csv_path, rows, fieldnames=["file", "label", "predicted", "probability", "uncertain", "png"])
    for stale in set(directory.glob("*.png")) - {directory / name for name in names}:
        stale.unlink()  # from an earlier gallery of another model: not listed, so not shown
    write_json(record_path, record)
    return csv_path


def _uncertain_flags(path: Path, files: Sequence[str]) -> list[bool]:
    """Per file, the ``uncertain`` column of the trust step's test predictions (matched by the file as
    in splits.csv, else by file name); all False when that file does not exist."""
    import csv

    if not path.is_file():
        return [False] * len(files)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"file", "uncertain"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: needs the columns file and uncertain")
        marked = {row["file"]: row["uncertain"].strip().lower() in ("true", "1", "yes") for row in reader}
    by_name = {Path(f).name: u for f, u in marked.items()}
    return [marked.get(f, by_name.get(Path(f).name, False)) for f in files]
