"""LiteRT export: float32, float16 and full-integer int8, with a batch-1 signature.

Why batch 1: XNNPACK only takes the whole graph when every shape is static. A Flatten over an
unknown batch leaves SHAPE/STRIDED_SLICE/PACK ops on the reference kernels, splitting the graph.

Why the int8 input is uint8 raw pixels: the preprocessing lives inside the model, so a camera frame
goes in as it is. The calibration set is pinned to the full 0..255 range so the input tensor gets
scale 1 and zero point 0: the uint8 bytes *are* the pixels. The output is uint8 too; a class
probability is ``scale * (q - zero_point)`` with the scale and zero point in the output tensor's
details (for a softmax LiteRT fixes them at 1/256 and 0).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from steeldefect.files import atomic_write_bytes, write_csv

log = logging.getLogger(__name__)

VARIANTS = ("fp32", "fp16", "int8", "int8-mixed")
# The reference's three, plus int8-mixed: on CPUs without int8 dot products (AVX2-only x86) full int8
# is no faster than fp32 (pooled Lite0: 0.97-1.08x its time), int8-mixed is (bench/latency.py).
DEFAULT_VARIANTS = VARIANTS
QUANTIZED_VARIANTS = ("int8", "int8-mixed")


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


def representative_dataset(images: np.ndarray) -> Callable[[], Iterator[list[np.ndarray]]]:
    """Calibration samples, batch 1, with the first sample's first two pixels set to 0 and 255.

    That pins the input range to exactly 0..255 (so the uint8 input needs no rescaling), at the cost
    of two pixels out of 200 x 50,176.
    """
    def generate() -> Iterator[list[np.ndarray]]:
        for position, image in enumerate(images):
            sample = image.astype(np.float32)[None].copy()
            if position == 0:
                sample[0, 0, 0, :] = 0.0
                sample[0, 0, 1, :] = 255.0
            yield [sample]

    return generate


def _converter(model, input_shape: Sequence[int]):
    import keras
    import tensorflow as tf

    # Re-wrap with a fixed batch of 1 (see the module docstring). from_keras_model freezes the
    # weights into constants; a hand-made tf.function would keep them as resource variables, which
    # neither calibration nor XNNPACK accept.
    pixels = keras.Input(batch_shape=(1, *input_shape), name="pixels")
    fixed_batch = keras.Model(pixels, model(pixels), name=f"{model.name}_batch1")
    return tf.lite.TFLiteConverter.from_keras_model(fixed_batch)


def make_converter(model, variant: str, calibration_images: np.ndarray | None = None):
    """A TFLiteConverter configured for one variant (also used by the quantization debugger)."""
    import tensorflow as tf

    if variant not in DEFAULT_VARIANTS:
        raise ValueError(f"a converter is configured for one of {DEFAULT_VARIANTS}, got {variant!r}")
    converter = _converter(model, model.input_shape[1:])
    if variant == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "int8":
        if calibration_images is None or len(calibration_images) == 0:
            raise ValueError("int8 export needs calibration images from the training split")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset(calibration_images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    return converter


def convert(
    model, variant: str, calibration_images: np.ndarray | None = None, *, int8_flatbuffer: bytes | None = None
) -> bytes:
    """``int8_flatbuffer``: this model's full-integer conversion, if already made; ``int8-mixed``
    reads its tensor names from it instead of converting again."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    # The Keras -> SavedModel step prints every captured variable's TensorSpec to stdout; that would
    # bury the progress bars and break `--format json` style output of callers.
    with contextlib.redirect_stdout(io.StringIO()):
        if variant == "int8-mixed":
            return _convert_mixed(model, calibration_images, int8_flatbuffer)
        return make_converter(model, variant, calibration_images).convert()


def high_resolution_outputs(int8_flatbuffer: bytes, min_fraction: float = 1 / 8) -> list[str]:
    """Output tensors of the ops that work at >= ``min_fraction`` of the input's resolution.

    On CPUs without int8 dot-product instructions XNNPACK's int8 kernels lose to its fp32 ones on the
    large, few-channel maps at the start of a CNN (above all the 3-channel stem convolution, 5x
    slower) and win on the small, channel-heavy rest (bench/int8_stages.py): that start is the part
    ``int8-mixed`` keeps in float.
    """
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=int8_flatbuffer)
    details = {detail["index"]: detail for detail in interpreter.get_tensor_details()}
    input_height = int(interpreter.get_input_details()[0]["shape"][1])
    names = []
    for op in interpreter._get_ops_details():
        for index in op["outputs"]:
            shape = details[index]["shape"]
            if op["op_name"] != "QUANTIZE" and len(shape) == 4 and shape[1] >= input_height * min_fraction:
                names.append(details[index]["name"])
    return names


def _convert_mixed(model, calibration_images: np.ndarray | None, full_integer: bytes | None = None) -> bytes:
    """int8 from 1/8 resolution on, float before: the converter's own selective quantization
    (QuantizationDebugger deny-list). Input: float32 raw pixels 0..255; output: float32 probabilities."""
    import tensorflow as tf

    # The deny-list must name tensors as the debugger's calibrated int8 graph names them (fused
    # conv+BN+ReLU outputs), so that graph is converted once to read names and shapes from.
    full_integer = make_converter(model, "int8", calibration_images).convert()
    converter = make_converter(model, "int8", calibration_images)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter,
        debug_dataset=representative_dataset(calibration_images[:1]),
        debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=high_resolution_outputs(full_integer)),
    )
    return debugger.get_nondebug_quantized_model()


def export_model(
    model, variant: str, path: Path, calibration_images: np.ndarray | None = None, *, int8_flatbuffer: bytes | None = None
) -> Path:
    """Convert a Keras model (raw pixels in, probabilities out) and write it atomically."""
    flatbuffer = convert(model, variant, calibration_images, int8_flatbuffer=int8_flatbuffer)
    atomic_write_bytes(path, flatbuffer)
    log.info("exported %s (%.2f MiB)", path, len(flatbuffer) / 2**20)
    return Path(path)


def tensor_summary(model_path: Path) -> dict:
    """Input/output dtypes and quantization of a .tflite file, and the dtypes used inside it."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(model_path))
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
    converter = _converter(model, model.input_shape[1:])
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
