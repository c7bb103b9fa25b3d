"""ONNX and OpenVINO files from the same joined Keras model and calibration images as the LiteRT
variants (`export --formats tflite onnx openvino`), fp32 and int8 each.

- ONNX fp32: Keras 3's own ONNX export (``model.export(format="onnx")``, tf2onnx underneath) of the
  batch-1 model, then the input becomes uint8 raw pixels (a Cast node in front: preprocessing lives
  inside the model, as in the LiteRT int8) and the outputs are named ``probabilities`` and
  ``texture_statistics``.
- ONNX int8: static QDQ post-training quantization (``onnxruntime.quantization.quantize_static``,
  per-channel int8 weights, uint8 activations, min/max calibration) over the same calibration
  images as the LiteRT int8, in the same order with the same two range-pinning pixels; the
  convolutions whose 16-bit pair sums saturate on those images get 7-bit weights
  (:func:`quantize_onnx`), unless ``int8_weights="vnni"`` (`export --int8-weights vnni`): 8-bit
  weights throughout, for line PCs with an int8 dot product; the file says so
  (``int8_weights`` in its description) and the runtime refuses it on x86 CPUs without one.
- OpenVINO fp32: ``openvino.convert_model`` of the ONNX fp32 (same uint8 input, same output names),
  saved with fp32 weights; int8: ``openvino.convert_model`` of that ONNX int8. Within one fold's
  export both formats share one conversion and one quantization (``built``: see :func:`plain_onnx`).

Every file describes itself like the .tflite: the description (class names, input size, variant,
uncertainty rule summary, temperature, provenance) as ``steeldefect.json`` and the rule's arrays as
base64 ``uncertainty.npz``, in ONNX ``metadata_props`` / OpenVINO ``rt_info`` (section
``steeldefect``: ``json``, ``rule``). The deploy model's rule is fitted on that file's own outputs.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from steeldefect.core.files import atomic_write_bytes
from steeldefect.core.options import FORMAT_VARIANTS, INT8_WEIGHTS_CHOICES
from steeldefect.models.conversion import representative_dataset
from steeldefect.runtime import uncertainty
from steeldefect.runtime.backends import (
    DESCRIPTION_KEY,
    OV_RT_SECTION,
    PROBABILITIES,
    RULE_KEY,
    TEXTURE,
    open_backend,
    require_runtime,
)

log = logging.getLogger(__name__)

INPUT_NAME = "pixels"


def calibration_samples(images: np.ndarray) -> Iterator[np.ndarray]:
    """The LiteRT int8's calibration samples (same images, order and 0/255 pins) as uint8 batches of 1."""
    for (sample,) in representative_dataset(images)():
        yield sample.astype(np.uint8)


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Only warnings from the loggers ``names`` (and nothing on stdout) while inside: tf2onnx logs
    every optimizer pass at INFO; the export's own lines are what a user reads."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _batch1(model):
    import keras

    pixels = keras.Input(batch_shape=(1, *model.input_shape[1:]), name=INPUT_NAME)
    outputs = model(pixels)
    return keras.Model(pixels, outputs if isinstance(outputs, list) else [outputs], name=f"{model.name}_batch1")


def keras_to_onnx(model, n_classes: int):
    """The fp32 ONNX ModelProto of a Keras classifier: uint8 raw pixels in, named outputs."""
    import onnx
    import tensorflow as tf

    fixed = _batch1(model)
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "model.onnx"
        spec = [tf.TensorSpec((1, *model.input_shape[1:]), tf.float32, name=INPUT_NAME)]
        with _quiet("tf2onnx"):
            fixed.export(str(target), format="onnx", input_signature=spec, verbose=False)
        proto = onnx.load(str(target))
    graph = proto.graph
    # uint8 raw pixels in: a Cast to float in front of the float graph (the .tflite int8 takes the same).
    (graph_input,) = graph.input
    float_name, internal = graph_input.name, INPUT_NAME + "_float"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == float_name:
                node.input[i] = internal
    graph.node.insert(0, onnx.helper.make_node("Cast", [INPUT_NAME], [internal], to=onnx.TensorProto.FLOAT))
    graph_input.name = INPUT_NAME
    graph_input.type.tensor_type.elem_type = onnx.TensorProto.UINT8
    # Outputs by name (probabilities: the class-count wide one), so no reader depends on their order.
    renames = {}
    for output in graph.output:
        width = int(np.prod([d.dim_value or 1 for d in output.type.tensor_type.shape.dim[1:]]))
        renames[output.name] = PROBABILITIES if width == n_classes else TEXTURE
    if sorted(renames.values()) != sorted({*renames.values()}) or PROBABILITIES not in renames.values():
        raise ValueError(f"cannot tell the ONNX outputs apart by width: {renames}")
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name in renames:
                node.output[i] = renames[name]
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for output in graph.output:
        output.name = renames[output.name]
    onnx.checker.check_model(proto)
    return proto


class _Calibration:
    """onnxruntime's CalibrationDataReader over the calibration images (duck-typed: get_next)."""

    def __init__(self, images: np.ndarray) -> None:
        self._samples = calibration_samples(images)

    def get_next(self) -> dict[str, np.ndarray] | None:
        sample = next(self._samples, None)
        return None if sample is None else {INPUT_NAME: sample}


# A group-1 convolution whose u8 x s8 pair sums leave int16 for more than this share of its pairs
# on the calibration images gets 7-bit weights (see quantize_onnx). Of 1e-3, 1e-4, 1e-5 and 0,
# 1e-5 agreed best with LiteRT int8 on the NEU run of docs/formats.md (0 costs precision where no
# sum saturates).
SATURATION_LIMIT = 1e-5
SATURATION_IMAGES = 8  # calibration images the pair sums are counted on


def _quantize_static(prepared: Path, target: Path, calibration_images: np.ndarray, seven_bit: Sequence[str]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    overrides = {name: [{"axis": 0, "reduce_range": True}] for name in seven_bit}
    # ONNX Runtime's quantizer logs to the root logger (""), one INFO line per weight channel it
    # rescales (83 for Lite0's deploy model).
    with _quiet(""):
        quantize_static(
            str(prepared),
            str(target),
            _Calibration(calibration_images),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"TensorQuantOverrides": overrides} if overrides else {},
        )


def saturation_rates(qdq_path: Path, images: np.ndarray) -> dict[str, float]:
    """Weight initializer of each group-1 Conv of a QDQ model -> the share of its u8 x s8 products,
    summed in adjacent pairs along the reduction axis as the AVX2 kernels do (``vpmaddubsw``), that
    leave int16 on ``images``. The uint8 inputs of each Conv are read from the model run without
    graph optimization (exact quantize/dequantize arithmetic, no fused kernel)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    proto = onnx.load(str(qdq_path))
    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    weights = {init.name: init for init in graph.initializer}
    convs = []
    for node in graph.node:
        attributes = {a.name: a for a in node.attribute}
        if node.op_type != "Conv" or (attributes["group"].i if "group" in attributes else 1) != 1:
            continue
        x_dq, w_dq = producer.get(node.input[0]), producer.get(node.input[1])
        if x_dq is None or w_dq is None or {x_dq.op_type, w_dq.op_type} != {"DequantizeLinear"}:
            continue  # not a quantized convolution
        if w_dq.input[0] not in weights:
            continue
        pads = list(attributes["pads"].ints) if "pads" in attributes else [0, 0, 0, 0]
        strides = list(attributes["strides"].ints) if "strides" in attributes else [1, 1]
        convs.append((w_dq.input[0], x_dq.input[0], pads, strides))
    for _, activation, _, _ in convs:
        graph.output.append(onnx.helper.make_tensor_value_info(activation, onnx.TensorProto.UINT8, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    wanted = [activation for _, activation, _, _ in convs]
    runs = [session.run(wanted, {session.get_inputs()[0].name: image[None]}) for image in images]
    rates = {}
    for j, (weight_name, _, pads, strides) in enumerate(convs):
        x = np.concatenate([run[j] for run in runs]).astype(np.int32)  # N, C, H, W (uint8 values)
        w = numpy_helper.to_array(weights[weight_name]).astype(np.int32)  # O, C, kh, kw (int8 values)
        kernel = w.shape[2:]
        x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
        windows = np.lib.stride_tricks.sliding_window_view(x, kernel, axis=(2, 3))[:, :, :: strides[0], :: strides[1]]
        # im2col in (kh, kw, c) order, the NHWC order the CPU kernels reduce in
        columns = windows.transpose(0, 2, 3, 4, 5, 1).reshape(-1, int(np.prod(kernel)) * x.shape[1])
        taps = w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
        if columns.shape[1] % 2:
            columns, taps = np.pad(columns, ((0, 0), (0, 1))), np.pad(taps, ((0, 0), (0, 1)))
        outside = 0
        for k in range(0, columns.shape[1], 2):
            pair = columns[:, k, None] * taps[None, :, k] + columns[:, k + 1, None] * taps[None, :, k + 1]
            outside += int(np.count_nonzero((pair > 32767) | (pair < -32768)))
        rates[weight_name.removesuffix("_quantized")] = outside / (columns.shape[0] * taps.size / 2)
    return rates


def quantize_onnx(
    float_path: Path, target: Path, calibration_images: np.ndarray, int8_weights: str = "portable"
) -> list[str]:
    """Static QDQ int8 of an fp32 .onnx over the calibration images; returns the convolutions given
    7-bit weights (none with ``int8_weights="vnni"``).

    On x86 CPUs without VNNI, ONNX Runtime and OpenVINO multiply uint8 activations by int8 weights
    with ``vpmaddubsw``, which adds products in pairs in 16 bits and saturates: Lite0's ReLU6
    activations sit at 255 often enough that plain int8 weights lost up to 17 points on NEU. So the
    model is quantized once, each group-1 convolution's pair sums are counted on a few calibration
    images, and the ones above :data:`SATURATION_LIMIT` are quantized again with 7-bit weights
    (2 x 255 x 64 fits in int16). Depthwise convolutions are not counted and keep 8 bits: 7 bits
    there too lowered the agreement with LiteRT int8 (docs/formats.md).

    ``int8_weights="vnni"``: one quantization, 8-bit weights throughout. CPUs with an int8 dot
    product (``vpdpbusd``: AVX-512 VNNI, AVX-VNNI; ARM's) sum the products in 32 bits, so nothing
    saturates there and the file is closer to LiteRT int8; on x86 without one it would lose accuracy
    (:func:`steeldefect.runtime.backends.check_int8_weights` refuses it there)."""
    if int8_weights not in INT8_WEIGHTS_CHOICES:
        raise ValueError(f"int8 weights are one of {INT8_WEIGHTS_CHOICES}, got {int8_weights!r}")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        first = Path(folder) / "int8.onnx"
        _quantize_static(prepared, first, calibration_images, ())
        if int8_weights == "vnni":
            os.replace(first, target)
            log.info("int8: 8-bit weights throughout (for CPUs with an int8 dot product)")
            return []
        step = max(1, len(calibration_images) // SATURATION_IMAGES)
        rates = saturation_rates(first, calibration_images[::step][:SATURATION_IMAGES])
        seven_bit = sorted(name for name, rate in rates.items() if rate > SATURATION_LIMIT)
        if seven_bit:
            _quantize_static(prepared, target, calibration_images, seven_bit)
        else:
            os.replace(first, target)
    log.info(
        "int8: %d of %d convolutions saturate int16 pair sums; their weights are 7-bit", len(seven_bit), len(rates)
    )
    return seven_bit


def _fit_rule(model_file: Path, rule_data, channels: Sequence[int]) -> uncertainty.UncertaintyRule:
    """The deploy model's rule, fitted on this file's own outputs for the training images (as
    `export` does for each LiteRT variant: :meth:`steeldefect.deploy.export.RuleData.fit`)."""
    rows = rule_data.rows()
    return rule_data.fit(rows, open_backend(model_file).run(rule_data.images[rows]).get(TEXTURE), channels)


def _describe(model_file: Path, metadata: dict[str, Any], rule_data, channels) -> dict[str, str]:
    """The key/value strings the file carries: description, and the rule fitted on the file itself."""
    props = {}
    if rule_data is not None:
        rule = _fit_rule(model_file, rule_data, channels)
        metadata["uncertainty"] = rule.describe()
        props[RULE_KEY] = base64.b64encode(rule.to_npz_bytes()).decode("ascii")
    props[DESCRIPTION_KEY] = json.dumps(metadata, sort_keys=True)
    return props


def plain_onnx(
    model,
    variant: str,
    folder: Path,
    calibration_images: np.ndarray | None,
    n_classes: int,
    built: dict[str, bytes] | None = None,
    int8_weights: str = "portable",
) -> Path:
    """The undescribed ONNX (fp32 or int8) of ``model`` as a file in ``folder``. ``built`` holds the
    bytes of earlier builds of the same Keras model, calibration images and ``int8_weights`` (the
    ONNX and OpenVINO files of one fold): a variant found there is not converted or quantized again,
    and a new build is added to it. ``int8_weights``: see :func:`quantize_onnx`."""
    import onnx

    if variant not in FORMAT_VARIANTS:
        raise ValueError(f"ONNX and OpenVINO are exported as {FORMAT_VARIANTS}, got {variant!r}")
    path = Path(folder) / f"{variant}.onnx"
    if built is not None and variant in built:
        path.write_bytes(built[variant])
        return path
    float_path = Path(folder) / "fp32.onnx"
    if built is not None and "fp32" in built:
        float_path.write_bytes(built["fp32"])
    else:
        onnx.save(keras_to_onnx(model, n_classes), str(float_path))
    if variant == "int8":
        if calibration_images is None or len(calibration_images) == 0:
            raise ValueError("int8 export needs calibration images from the training split")
        quantize_onnx(float_path, path, calibration_images, int8_weights)
    if built is not None:
        built.setdefault("fp32", float_path.read_bytes())
        built[variant] = path.read_bytes()
    return path


def export_onnx(
    model,
    variant: str,
    path: Path,
    calibration_images: np.ndarray | None,
    *,
    metadata: dict[str, Any],
    rule_data=None,
    channels: Sequence[int] = (),
    built: dict[str, bytes] | None = None,
    int8_weights: str = "portable",
) -> Path:
    """One .onnx (fp32 or int8) of a Keras classifier, described inside, written atomically.
    ``built``, ``int8_weights``: see :func:`plain_onnx`."""
    import onnx

    require_runtime(Path(path))
    n_classes = len(metadata["class_names"])
    with tempfile.TemporaryDirectory(dir=Path(path).parent) as folder:
        plain = plain_onnx(model, variant, Path(folder), calibration_images, n_classes, built, int8_weights)
        props = _describe(plain, metadata, rule_data, channels)
        proto = onnx.load(str(plain))
        onnx.helper.set_model_props(proto, props)
        proto.producer_name = "steeldefect"
        atomic_write_bytes(path, proto.SerializeToString())
    log.info("exported %s (%.2f MiB)", path, Path(path).stat().st_size / 2**20)
    return Path(path)


def export_openvino(
    model,
    variant: str,
    path: Path,
    calibration_images: np.ndarray | None,
    *,
    metadata: dict[str, Any],
    rule_data=None,
    channels: Sequence[int] = (),
    built: dict[str, bytes] | None = None,
    int8_weights: str = "portable",
) -> Path:
    """One OpenVINO IR (``path`` = the .xml, its .bin beside it), fp32 or int8, described inside.
    Both files are written to a temporary name first; the .bin is moved into place before the .xml,
    so an .xml that exists always has its weights. ``built``, ``int8_weights``: see :func:`plain_onnx`."""
    import openvino as ov

    require_runtime(Path(path))
    path = Path(path)
    n_classes = len(metadata["class_names"])
    with tempfile.TemporaryDirectory(dir=path.parent) as folder:
        # The int8 is the ONNX int8 (saturation-aware QDQ), read by OpenVINO: NNCF's own int8 lost
        # agreement on CPUs without VNNI, and its overflow fix (7-bit weights everywhere) cost precision.
        onnx_path = plain_onnx(model, variant, Path(folder), calibration_images, n_classes, built, int8_weights)
        ov_model = ov.convert_model(str(onnx_path))
        plain = Path(folder) / "model.xml"
        ov.save_model(ov_model, str(plain), compress_to_fp16=False)
        props = _describe(plain, metadata, rule_data, channels)
        ov_model = ov.Core().read_model(str(plain))
        ov_model.set_rt_info(props[DESCRIPTION_KEY], [OV_RT_SECTION, "json"])
        if RULE_KEY in props:
            ov_model.set_rt_info(props[RULE_KEY], [OV_RT_SECTION, "rule"])
        described = Path(folder) / "described.xml"
        ov.save_model(ov_model, str(described), compress_to_fp16=False)
        os.replace(described.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(described, path)
    size = path.stat().st_size + path.with_suffix(".bin").stat().st_size
    log.info("exported %s (+ .bin, %.2f MiB)", path, size / 2**20)
    return path


EXPORTERS = {"onnx": export_onnx, "openvino": export_openvino}
