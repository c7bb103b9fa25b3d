"""The export stage: each joined Keras model of a run -> LiteRT files (fp32, fp16, full-integer int8,
int8-mixed) with their sidecars, the calibration images drawn from the training split, and the
per-layer int8 error report.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from steeldefect.core import runfolder
from steeldefect.core.files import atomic_write_bytes, read_json, write_csv, write_json
from steeldefect.data import augment
from steeldefect.models.conversion import QUANTIZED_VARIANTS, batch1_converter, convert, representative_dataset
from steeldefect.runtime import uncertainty
from steeldefect.runtime.tflite_metadata import embed_metadata, read_embedded_metadata

if TYPE_CHECKING:
    from collections.abc import Callable

    from steeldefect.deploy.int8guard import CheckData, GuardSettings

log = logging.getLogger(__name__)


def provenance(run: Path, backbone: str, fold: int | str) -> dict[str, Any]:
    """Where an exported model comes from, for its embedded metadata: run folder name, the source
    revision that exported it, when, and the test accuracy of the Keras model it was converted from
    (when the run recorded it; a variant's own accuracy is measured later by `evaluate`)."""
    record: dict[str, Any] = {
        "run": Path(run).resolve().name,
        "source": runfolder.source_revision(),
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if fold == runfolder.FINAL:
        entries = [runfolder.load_summary(run)["backbones"].get(backbone, {}).get("final", {}).get("keras", {})]
    else:
        metrics_path = runfolder.test_metrics_path(run, backbone, "keras")
        entries = (
            [e for e in read_json(metrics_path).get("per_model", []) if e.get("fold") == fold]
            if metrics_path.is_file()
            else []
        )
    for entry in entries:
        if "accuracy" in entry:
            n_images = int(np.sum(entry["confusion_matrix"])) if "confusion_matrix" in entry else None
            record["test_accuracy"] = {"of": "keras", "accuracy": entry["accuracy"], "n_images": n_images}
    return record


def calibration_indices(
    labels: np.ndarray, train_indices: np.ndarray, n_samples: int = 200, seed: int = 42
) -> np.ndarray:
    """``n_samples`` training images drawn evenly across classes (never the test split)."""
    rng = np.random.default_rng(seed)
    train_indices = np.asarray(train_indices)
    classes = np.unique(labels[train_indices])
    per_class = np.full(len(classes), n_samples // len(classes))
    per_class[: n_samples % len(classes)] += 1
    chosen = []
    for cls, count in zip(classes, per_class):
        pool = train_indices[labels[train_indices] == cls]
        chosen.append(rng.choice(pool, size=min(count, len(pool)), replace=False))
    return np.sort(np.concatenate(chosen))


@dataclass(frozen=True)
class RuleData:
    """What the deploy model's uncertainty rule is fitted on: the whole dataset's images and labels
    (only the folds' rows are read), the folds, and the out-of-fold probabilities `train` recorded
    (dataset-indexed, NaN outside the folds)."""

    images: np.ndarray
    labels: np.ndarray
    folds: Sequence[tuple[np.ndarray, np.ndarray]]
    oof_probabilities: np.ndarray
    accept: float = uncertainty.DEFAULT_ACCEPT
    shrinkage: float | None = None  # the texture score's ridge; None chooses it (uncertainty.fit_ood)

    def rows(self) -> np.ndarray:
        """The training images' indices: every fold's rows (test rows are never read)."""
        return np.unique(np.concatenate([np.concatenate([t, v]) for t, v in self.folds]))

    def fit(
        self, rows: np.ndarray, texture_of_rows: np.ndarray | None, channels: Sequence[int]
    ) -> uncertainty.UncertaintyRule:
        """The rule for one model file, from that file's own texture statistics for ``rows`` (None: the
        file has none, so the rule is the softmax score alone). Every format's exporter fits it here."""
        texture = None
        if texture_of_rows is not None:
            texture = np.full((len(self.labels), texture_of_rows.shape[1]), np.nan, dtype=np.float32)
            texture[rows] = texture_of_rows
        return uncertainty.fit_rule(
            self.labels,
            self.folds,
            self.oof_probabilities,
            texture_raw=texture,
            channels=channels if texture is not None else (),
            accept=self.accept,
            shrinkage=self.shrinkage,
        )


def with_texture_output(model, layers: Sequence[str] = uncertainty.TEXTURE_LAYERS) -> Any | None:
    """``model`` with the texture statistics of its backbone as a second output, or None when the
    backbone lacks the layers the statistics are defined on. The class probabilities stay output 0
    (``outputs[0]``) of the Keras model, and so of every file converted from it (the LiteRT
    conversion keeps that order, :func:`steeldefect.models.conversion.order_outputs`)."""
    import keras

    try:
        stats = uncertainty.texture_statistics_model(model, layers)
    except ValueError:  # Keras: no such layer
        return None
    return keras.Model(model.input, [model.output, stats.output], name=f"{model.name}_with_texture")


def texture_channels(model, layers: Sequence[str] = uncertainty.TEXTURE_LAYERS) -> tuple[int, ...]:
    return tuple(int(model.get_layer(name).output.shape[-1]) for name in layers)


def fit_model_rule(flatbuffer: bytes, rule_data: RuleData, channels: Sequence[int]) -> uncertainty.UncertaintyRule:
    """The rule for one converted model, fitted on that model's own outputs for the training images (a
    quantized model's texture statistics differ a little from the float ones, so each variant gets
    its own reference scores and threshold)."""
    from steeldefect.runtime.litert import make_interpreter, predict_tflite_outputs

    rows = rule_data.rows()
    outputs = predict_tflite_outputs(make_interpreter(flatbuffer), rule_data.images[rows])
    return rule_data.fit(rows, outputs[1] if len(outputs) == 2 else None, channels)


def drift_reference(
    rule_data: RuleData, rule: uncertainty.UncertaintyRule, class_names: Sequence[str] | None
) -> dict[str, Any]:
    """What the service's drift monitor compares the line against (serve/drift.py): the share of
    training images per class (``training_class_mix``) and the share of out-of-fold training images
    the rule flags uncertain at its acceptance (``expected_uncertain_rate``)."""
    labels = np.asarray(rule_data.labels)[rule_data.rows()]
    names = list(class_names) if class_names else [str(i) for i in range(int(labels.max()) + 1)]
    counts = np.bincount(labels, minlength=len(names))
    return {
        "training_class_mix": {name: round(float(c) / len(labels), 6) for name, c in zip(names, counts)},
        "expected_uncertain_rate": round(float(np.mean(rule.combined_reference > rule.threshold)), 6),
    }


def export_model(
    model,
    variant: str,
    path: Path,
    calibration_images: np.ndarray | None = None,
    *,
    int8_flatbuffer: bytes | None = None,
    metadata: dict[str, Any] | None = None,
    rule_data: RuleData | None = None,
    channels: Sequence[int] = (),
    flatbuffer: bytes | None = None,
) -> Path:
    """Convert a Keras model (raw pixels in, probabilities out) and write it atomically.

    ``metadata``: the model's description (the dict its sidecar holds: class names, input size,
    variant, calibration, provenance), embedded as TFLite Model Metadata so the file describes itself.
    ``rule_data``: fit the model's uncertainty rule on its own outputs and embed it too
    (``metadata["uncertainty"]`` describes it, ``uncertainty.npz`` holds its arrays).
    ``flatbuffer``: the conversion already made (by the int8 guard), written instead of converting.
    """
    if flatbuffer is None:
        flatbuffer = convert(model, variant, calibration_images, int8_flatbuffer=int8_flatbuffer)
    extra_files = None
    if rule_data is not None:
        rule = fit_model_rule(flatbuffer, rule_data, channels)
        if metadata is not None:
            metadata["uncertainty"] = rule.describe()
            metadata.update(drift_reference(rule_data, rule, metadata.get("class_names")))
        extra_files = {uncertainty.RULE_FILE: rule.to_npz_bytes()}
    if metadata is not None:
        flatbuffer = embed_metadata(flatbuffer, metadata, extra_files)
        # The sidecar repeats the output names and order embed_metadata wrote into the file.
        embedded = read_embedded_metadata(flatbuffer)
        if embedded is not None and "outputs" in embedded:
            metadata["outputs"] = embedded["outputs"]
    atomic_write_bytes(path, flatbuffer)
    log.info("exported %s (%.2f MiB)", path, len(flatbuffer) / 2**20)
    return Path(path)


def export_backbone(
    run: Path,
    backbone: str,
    variants: Sequence[str],
    calibration_images: np.ndarray,
    *,
    n_folds: int,
    workers: int = 1,
    progress: bool = True,
    rule_data: RuleData | None = None,
    tta: bool = False,
    formats: Sequence[str] = ("tflite",),
    guard: GuardSettings | None = None,
    checks: Callable[[int | str], CheckData] | None = None,
    int8_weights: str = "portable",
) -> list[Path]:
    """Every (fold, variant) LiteRT file of one backbone of a run, and of its final model (refitted
    on all training images), with its sidecar (resumable: a file whose sidecar exists is done).

    Folds are independent, so they are converted ``workers`` at a time, each in its own process:
    the converter and int8 calibration keep about one core busy. Within a fold the variants run in
    order, so ``int8-mixed`` reuses the ``int8`` flatbuffer converted just before it.

    The final model also outputs its texture statistics and carries its uncertainty rule, fitted on
    ``rule_data`` (the training images): it is converted in this process, beside the fold workers, so
    the images are not copied into a worker. ``tta`` (`export --tta`): every file answers with the mean
    over the 8 flips/rotations of its input (:func:`steeldefect.data.augment.dihedral_average_model`).
    ``formats`` beyond ``tflite`` (`export --formats`): each fold also gets its ONNX and OpenVINO fp32
    and int8 files (:mod:`steeldefect.deploy.formats`), from the same model and calibration images,
    their int8 weights as ``int8_weights`` says (:func:`steeldefect.deploy.formats.quantize_onnx`).
    ``guard``/``checks``: the int8 guard (:mod:`steeldefect.deploy.int8guard`) and, per fold (or
    FINAL), the images it checks and recalibrates that model's int8 variants on; a fold's are made
    just before the fold is handed to a worker, so at most ``workers`` sets are held at once.
    """
    from tqdm.auto import tqdm

    from steeldefect.deploy.formats import FORMAT_VARIANTS

    models = [*range(n_folds)]
    if runfolder.fold_model_path(run, backbone, runfolder.FINAL, "keras").is_file():
        models.append(runfolder.FINAL)  # the model to deploy, exported like the folds
    jobs = [("tflite", v) for v in variants if "tflite" in formats]
    jobs += [(fmt, v) for fmt in formats if fmt != "tflite" for v in FORMAT_VARIANTS]
    pending = {
        fold: [
            (fmt, variant)
            for fmt, variant in jobs
            if not _is_exported(runfolder.fold_model_path(run, backbone, fold, variant, fmt))
        ]
        for fold in models
    }
    pending = {fold: todo for fold, todo in pending.items() if todo}
    total = sum(len(todo) for todo in pending.values())
    with tqdm(total=total, desc=f"{backbone} export", unit="model", disable=not progress) as bar:
        final_todo = pending.pop(runfolder.FINAL, None)

        def export_final() -> None:
            if final_todo:
                export_fold(
                    run,
                    backbone,
                    runfolder.FINAL,
                    final_todo,
                    calibration_images,
                    on_done=lambda _: bar.update(1),
                    rule_data=rule_data,
                    tta=tta,
                    int8_weights=int8_weights,
                    **_guard_args(guard, checks, runfolder.FINAL, final_todo),
                )

        if workers <= 1 or len(pending) <= 1:
            for fold, todo in pending.items():
                export_fold(
                    run,
                    backbone,
                    fold,
                    todo,
                    calibration_images,
                    on_done=lambda _: bar.update(1),
                    tta=tta,
                    int8_weights=int8_weights,
                    **_guard_args(guard, checks, fold, todo),
                )
            export_final()
        else:
            import multiprocessing
            from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

            # "spawn": a forked TensorFlow runtime is not safe to use in the child.
            context = multiprocessing.get_context("spawn")
            n_workers = min(workers, len(pending))
            queue = list(pending.items())
            with ProcessPoolExecutor(max_workers=n_workers, mp_context=context) as pool:

                def submit() -> Any:
                    fold, todo = queue.pop(0)
                    return pool.submit(
                        export_fold,
                        run,
                        backbone,
                        fold,
                        todo,
                        calibration_images,
                        tta=tta,
                        int8_weights=int8_weights,
                        **_guard_args(guard, checks, fold, todo),
                    )

                running = {submit() for _ in range(min(n_workers, len(queue)))}
                export_final()
                while running:
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        bar.update(len(future.result()))
                        if queue:
                            running.add(submit())
    return [runfolder.fold_model_path(run, backbone, fold, variant, fmt) for fold in models for fmt, variant in jobs]


def _guard_args(
    guard: GuardSettings | None,
    checks: Callable[[int | str], CheckData] | None,
    fold: int | str,
    todo: Sequence[str | tuple[str, str]],
) -> dict[str, Any]:
    """The guard arguments of one fold's export_fold: its check images only when one of its pending
    variants is quantized and the guard is on."""
    litert = {job if isinstance(job, str) else job[1] for job in todo if isinstance(job, str) or job[0] == "tflite"}
    if guard is None or guard.mode == "off" or checks is None or not litert & set(QUANTIZED_VARIANTS):
        return {}
    return {"guard": guard, "check": checks(fold)}


def _is_exported(target: Path) -> bool:
    return target.is_file() and runfolder.sidecar_path(target).is_file()


def export_fold(
    run: Path,
    backbone: str,
    fold: int | str,
    variants: Sequence[str | tuple[str, str]],
    calibration_images: np.ndarray,
    on_done=None,
    rule_data: RuleData | None = None,
    tta: bool = False,
    guard: GuardSettings | None = None,
    check: CheckData | None = None,
    int8_weights: str = "portable",
) -> list[Path]:
    """Convert one fold's joined Keras model to ``variants`` (in order; a LiteRT variant name, or a
    (format, variant) pair) and write each with its sidecar.
    With ``rule_data`` the model gets the texture statistics output and an uncertainty rule; with
    ``tta`` every output is averaged over the 8 flips/rotations of the input image; with ``guard`` and
    ``check`` each quantized variant goes through the int8 guard, its record in ``meta["int8_check"]``;
    ``int8_weights``: the ONNX/OpenVINO int8 weights (:func:`steeldefect.deploy.formats.quantize_onnx`)."""
    import keras

    source = runfolder.fold_model_path(run, backbone, fold, "keras")
    # Keras numbers auto-named layers per process; those names end up as tensor names in the
    # flatbuffer. A fresh session per fold makes every file the same whichever process (or how
    # many folds before it) converts it.
    keras.backend.clear_session()
    model = keras.models.load_model(source)
    channels: tuple[int, ...] = ()
    if rule_data is not None:
        extended = with_texture_output(model)
        if extended is not None:
            model, channels = extended, texture_channels(model)
    if tta:
        # After the texture output is added, so the uncertainty rule is fitted on, and judges, the
        # same averaged outputs the file gives.
        model = augment.dihedral_average_model(model)
    written = []
    as_converted_int8: bytes | None = None  # the int8 conversion before any remedy: int8-mixed's names
    onnx_built: dict[str, bytes] = {}  # ONNX fp32/int8 of this model, shared by the ONNX and OpenVINO files
    for job in variants:
        fmt, variant = job if isinstance(job, tuple) else ("tflite", job)
        target = runfolder.fold_model_path(run, backbone, fold, variant, fmt)
        full_integer = runfolder.fold_model_path(run, backbone, fold, "int8")
        # The description is built first: it is embedded in the model file (which is the source of
        # truth), and the sidecar repeats it with the tensor summary added.
        meta = read_json(runfolder.sidecar_path(source)) | {"variant": variant, "verified": None}
        meta["test_time_augmentation"] = "dihedral-8" if tta else "none"
        if variant in QUANTIZED_VARIANTS:
            meta["calibration"] = {
                "samples": len(calibration_images),
                "split": "train",
                "file": runfolder.calibration_path(run).name,
            }
        meta["provenance"] = provenance(run, backbone, fold)
        if fmt != "tflite":
            from steeldefect.deploy.formats import EXPORTERS

            meta["format"] = fmt
            if variant in QUANTIZED_VARIANTS:
                meta["int8_weights"] = int8_weights  # the runtime refuses "vnni" where it would saturate
            EXPORTERS[fmt](
                model,
                variant,
                target,
                calibration_images if variant in QUANTIZED_VARIANTS else None,
                metadata=meta,
                rule_data=rule_data,
                channels=channels,
                built=onnx_built,
                int8_weights=int8_weights,
            )
        else:
            int8_flatbuffer = as_converted_int8
            if variant == "int8-mixed" and int8_flatbuffer is None and _is_exported(full_integer):
                shipped = read_json(runfolder.sidecar_path(full_integer)).get("int8_check", {}).get("shipped")
                if shipped in (None, "as converted"):  # a remedied int8 file may not be full-integer
                    int8_flatbuffer = full_integer.read_bytes()
            flatbuffer = None
            if variant in QUANTIZED_VARIANTS and guard is not None and check is not None:
                from steeldefect.deploy import int8guard

                flatbuffer, meta["int8_check"], converted = int8guard.guarded_convert(
                    model,
                    variant,
                    calibration_images,
                    check,
                    guard,
                    int8_flatbuffer=int8_flatbuffer if variant == "int8-mixed" else None,
                    name=f"{backbone} {'final' if fold == runfolder.FINAL else f'fold {fold}'}",
                )
                if variant == "int8":
                    as_converted_int8 = converted
            export_model(
                model,
                variant,
                target,
                calibration_images if variant in QUANTIZED_VARIANTS else None,
                int8_flatbuffer=int8_flatbuffer if variant == "int8-mixed" else None,
                metadata=meta,
                rule_data=rule_data,
                channels=channels,
                flatbuffer=flatbuffer,
            )
            meta["tflite"] = tensor_summary(target)
        write_json(runfolder.sidecar_path(target), meta)
        written.append(target)
        if on_done is not None:
            on_done(target)
    return written


def tensor_summary(model_path: Path) -> dict:
    """Input/output dtypes and quantization of a .tflite file, and the dtypes used inside it."""
    from steeldefect.runtime.litert import make_interpreter

    interpreter = make_interpreter(Path(model_path), threads=1)
    details = interpreter.get_tensor_details()

    def describe(tensor: dict) -> dict:
        scale, zero_point = tensor["quantization"]
        return {
            "name": tensor["name"],
            "shape": [int(v) for v in tensor["shape"]],
            "dtype": np.dtype(tensor["dtype"]).name,
            "scale": float(scale),
            "zero_point": int(zero_point),
        }

    dtypes: dict[str, int] = {}
    for tensor in details:
        name = np.dtype(tensor["dtype"]).name
        dtypes[name] = dtypes.get(name, 0) + 1
    return {
        "inputs": [describe(t) for t in interpreter.get_input_details()],
        "outputs": [describe(t) for t in interpreter.get_output_details()],
        "tensor_dtypes": dtypes,
    }


def quantization_error_report(
    model, calibration_images: np.ndarray, debug_images: np.ndarray, out_csv: Path, out_png: Path, top: int = 25
) -> list[dict]:
    """Per-layer int8 error against float (QuantizationDebugger), as CSV and a bar chart.

    ``rmse/scale`` is the RMSE between the float and dequantized outputs of a layer divided by its
    quantization step: ~0.29 is the floor of uniform rounding; much more means range trouble.
    """
    import csv

    import tensorflow as tf

    # A bare Figure (no pyplot) draws with Agg without switching matplotlib's global backend.
    from matplotlib.figure import Figure

    # The debugger instruments a float-I/O model, so this converter keeps float input and output.
    converter = batch1_converter(model, model.input_shape[1:])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset(calibration_images)
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=lambda: ([image.astype(np.float32)[None]] for image in debug_images)
    )
    with contextlib.redirect_stdout(io.StringIO()):
        debugger.run()
    buffer = io.StringIO()
    debugger.layer_statistics_dump(buffer)
    rows = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    for row in rows:
        scale = float(row["scale"]) if row.get("scale") else 0.0
        mse = float(row["mean_squared_error"])
        row["rmse/scale"] = f"{(np.sqrt(mse) / scale) if scale else float('nan'):.6f}"
    fieldnames = list(rows[0].keys()) if rows else []
    write_csv(out_csv, rows, fieldnames)
    ranked = sorted(
        (row for row in rows if row["rmse/scale"] != "nan"), key=lambda row: float(row["rmse/scale"]), reverse=True
    )[:top]
    figure = Figure(figsize=(9, max(3, 0.3 * len(ranked) + 1)))
    axis = figure.subplots()
    labels = [_short_tensor_name(row["tensor_name"]) for row in ranked][::-1]
    axis.barh(labels, [float(row["rmse/scale"]) for row in ranked][::-1], color="tab:red")
    axis.axvline(1 / np.sqrt(12), color="grey", linestyle="--", label="rounding floor (0.29)")
    axis.set_xlabel("RMSE / quantization scale (int8 vs float, per layer output)")
    axis.set_title(f"Worst {len(ranked)} layers by int8 quantization error")
    axis.legend(loc="lower right")
    figure.tight_layout()
    buffer_png = io.BytesIO()
    figure.savefig(buffer_png, format="png", dpi=110)
    atomic_write_bytes(out_png, buffer_png.getvalue())
    return rows


def _short_tensor_name(name: str, limit: int = 60) -> str:
    name = name.split(";")[0]
    return name if len(name) <= limit else "..." + name[-limit:]
