"""Keras -> LiteRT conversion, one configuration per variant: float32, float16, full-integer int8 and
int8-mixed, all with a batch-1 signature. Feature extraction converts the frozen backbone to float32
here; the export stage converts the joined classifiers.

Why batch 1: XNNPACK only takes the whole graph when every shape is static. A Flatten over an
unknown batch leaves SHAPE/STRIDED_SLICE/PACK ops on the reference kernels, splitting the graph.

Why the int8 input is uint8 raw pixels: the preprocessing lives inside the model, so a camera frame
goes in as it is. The calibration set is pinned to the full 0..255 range so the input tensor gets
scale 1 and zero point 0: the uint8 bytes *are* the pixels. The output is uint8 too; a class
probability is ``scale * (q - zero_point)`` with the scale and zero point in the output tensor's
details (for a softmax LiteRT fixes them at 1/256 and 0).

Why the outputs are reordered after conversion: a model with several outputs (the deploy model:
class probabilities and texture statistics) gets a signature whose keys follow the Keras outputs
list (``output_0`` = ``model.outputs[0]``), but the converter lists the graph's outputs in another
order (TF 2.21 puts two outputs in reverse key order, whatever the layer names; other versions have
sorted them by tensor name). Runtimes and MediaPipe read the graph's list, so :func:`order_outputs`
rewrites it to the signature's order: output 0 is the Keras model's first output in every variant.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np

# The variant names live with the options (core), which every command parses before Keras is loaded.
from steeldefect.core.options import DEFAULT_VARIANTS, QUANTIZED_VARIANTS, VARIANTS  # noqa: F401  (re-exported)

# The variants a plain TFLiteConverter configuration produces (int8-mixed is built from int8's).
_CONVERTER_VARIANTS = ("fp32", "fp16", "int8")


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


def batch1_converter(model, input_shape: Sequence[int]):
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

    if variant not in _CONVERTER_VARIANTS:
        raise ValueError(f"a converter is configured for one of {_CONVERTER_VARIANTS}, got {variant!r}")
    converter = batch1_converter(model, model.input_shape[1:])
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
            flatbuffer = _convert_mixed(model, calibration_images, int8_flatbuffer)
        else:
            flatbuffer = make_converter(model, variant, calibration_images).convert()
    return order_outputs(flatbuffer)


def _signature_rank(key: str) -> tuple[int, int, str]:
    """Keras names a list's outputs ``output_<i>`` (numeric order, so ``output_10`` after
    ``output_9``) and a dict's by its keys (flattened in sorted order)."""
    numbered = re.fullmatch(r"output_(\d+)", key)
    return (0, int(numbered.group(1)), "") if numbered else (1, 0, key)


def order_outputs(flatbuffer: bytes) -> bytes:
    """``flatbuffer`` with its graph's outputs listed in its signature's order (see the module
    docstring). Only the main subgraph's output list is permuted, in place: same tensors, same size,
    same bytes everywhere else. A model without a signature, or whose signature names other tensors
    than the graph outputs, is returned unchanged."""
    from tensorflow.lite.python import schema_py_generated as schema

    buffer = bytearray(flatbuffer)
    model = schema.Model.GetRootAs(buffer, 0)
    if model.SubgraphsLength() == 0 or model.SignatureDefsLength() != 1:
        return bytes(flatbuffer)
    signature = model.SignatureDefs(0)
    subgraph = model.Subgraphs(signature.SubgraphIndex())
    if subgraph.OutputsLength() < 2:
        return bytes(flatbuffer)
    keyed = sorted(
        (signature.Outputs(i) for i in range(signature.OutputsLength())),
        key=lambda entry: _signature_rank(entry.Name().decode("utf-8")),
    )
    wanted = [int(entry.TensorIndex()) for entry in keyed]
    outputs = subgraph.OutputsAsNumpy()  # a writable view into ``buffer``
    if sorted(wanted) != sorted(int(i) for i in outputs):
        return bytes(flatbuffer)
    outputs[:] = wanted
    return bytes(buffer)


def high_resolution_outputs(int8_flatbuffer: bytes, min_fraction: float = 1 / 8) -> list[str]:
    """Output tensors of the ops that work at >= ``min_fraction`` of the input's resolution.

    On CPUs without int8 dot-product instructions XNNPACK's int8 kernels lose to its fp32 ones on the
    large, few-channel maps at the start of a CNN (above all the 3-channel stem convolution, 5x
    slower) and win on the small, channel-heavy rest (bench/int8_stages.py): that start is the part
    ``int8-mixed`` keeps in float.
    """
    from steeldefect.runtime.litert import make_interpreter

    interpreter = make_interpreter(int8_flatbuffer, threads=1)
    details = {detail["index"]: detail for detail in interpreter.get_tensor_details()}
    input_height = int(interpreter.get_input_details()[0]["shape"][1])
    names = []
    for op in interpreter._get_ops_details():
        for index in op["outputs"]:
            shape = details[index]["shape"]
            if op["op_name"] != "QUANTIZE" and len(shape) == 4 and shape[1] >= input_height * min_fraction:
                names.append(details[index]["name"])
    return names


def _convert_mixed(model, calibration_images: np.ndarray | None, int8_flatbuffer: bytes | None = None) -> bytes:
    """int8 from 1/8 resolution on, float before (see :func:`convert_with_float_layers`).

    The deny-list must name tensors as the calibrated full-integer graph names them (fused
    conv+BN+ReLU outputs), so it is read from that graph: ``int8_flatbuffer`` when the caller already
    converted this model to full integer (the export of the ``int8`` variant), else converted here.
    """
    if calibration_images is None or len(calibration_images) == 0:
        raise ValueError("int8-mixed export needs calibration images from the training split")
    full_integer = (
        int8_flatbuffer if int8_flatbuffer is not None else make_converter(model, "int8", calibration_images).convert()
    )
    return convert_with_float_layers(model, calibration_images, high_resolution_outputs(full_integer))


def convert_with_float_layers(model, calibration_images: np.ndarray, float_layers: Sequence[str]) -> bytes:
    """int8 except ``float_layers`` (output tensor names of the calibrated graph), which stay float:
    the converter's own selective quantization (QuantizationDebugger deny-list). Input: float32 raw
    pixels 0..255; output: float32 probabilities, listed first (:func:`order_outputs`). Serves
    ``int8-mixed`` and the int8 guard's float-layer remedy."""
    import tensorflow as tf

    converter = make_converter(model, "int8", calibration_images)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter,
        debug_dataset=representative_dataset(calibration_images[:1]),
        debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(float_layers)),
    )
    with contextlib.redirect_stdout(io.StringIO()):
        return order_outputs(debugger.get_nondebug_quantized_model())
