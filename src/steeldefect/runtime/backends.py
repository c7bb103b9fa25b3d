"""One small interface over the three runtimes a steeldefect model file can be run with: LiteRT
(.tflite), ONNX Runtime (.onnx) and OpenVINO (.xml + .bin IR). `Classifier`, `read_model_info` and
through them `predict`, the batch engines, the service and `evaluate` open every model here, so no
other stage branches on the format.

A backend is created with a thread count, takes uint8 RGB images (N, H, W, 3) of its input size and
returns its outputs by name: ``probabilities`` (N, n_classes) and, for a deploy model that carries
an uncertainty rule, ``texture_statistics`` (N, 2 * channels). The format is chosen by the file's
suffix and then checked against its content, so a file of the wrong format behind a known extension
gets one line naming it instead of a runtime's traceback. ONNX Runtime and OpenVINO are optional
dependencies (extras ``steeldefect[onnx]``, ``steeldefect[openvino]``); a missing one is named
with the command that installs it.

Each format's file also describes itself (class names, input size, variant, uncertainty rule,
temperature): :func:`read_embedded` returns that description and the rule's arrays, from the TFLite
Model Metadata, the ONNX ``metadata_props`` or the OpenVINO ``rt_info``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from steeldefect.runtime.litert import ModelFileError, resolve_threads

PROBABILITIES = "probabilities"
TEXTURE = "texture_statistics"

# Keys of the description inside ONNX metadata_props / OpenVINO rt_info (the .tflite packs files
# of the same names into its metadata, see tflite_metadata).
DESCRIPTION_KEY = "steeldefect.json"
RULE_KEY = "uncertainty.npz"  # base64 of the rule's .npz bytes
OV_RT_SECTION = "steeldefect"  # rt_info section: <rt_info><steeldefect><json .../><rule .../></steeldefect>

# suffix -> (format name, runtime name, extra to install, module whose import proves it is there)
FORMATS: dict[str, tuple[str, str, str | None, str]] = {
    ".tflite": ("tflite", "LiteRT", None, "ai_edge_litert.interpreter"),
    ".onnx": ("onnx", "ONNX Runtime", "onnx", "onnxruntime"),
    ".xml": ("openvino", "OpenVINO", "openvino", "openvino"),
}
MODEL_SUFFIXES = tuple(FORMATS)
EXPORTED = ".tflite, .onnx or OpenVINO .xml"
MAX_DESCRIPTION_BYTES = 24 << 20  # the rule's arrays take ~0.7 MiB in base64; anything far larger is not ours


def is_model_file(path: Path) -> bool:
    """Whether the suffix is one of an exported model (.tflite, .onnx, .xml); content is checked on open."""
    return Path(path).suffix.lower() in FORMATS


def format_of(path: Path) -> str:
    """``tflite``, ``onnx`` or ``openvino`` for a model file, by suffix (content is checked on open)."""
    entry = FORMATS.get(Path(path).suffix.lower())
    if entry is None:
        raise ModelFileError(f"{path}: not a model file this runtime runs ({', '.join(MODEL_SUFFIXES)})")
    return entry[0]


def require_runtime(path: Path) -> None:
    """Import the runtime a model file needs; one line naming the extra when it is not installed."""
    import importlib

    _, runtime, extra, module = FORMATS[Path(path).suffix.lower()]
    try:
        importlib.import_module(module)
    except ImportError as error:
        hint = f": pip install steeldefect[{extra}]" if extra else ""
        raise ModelFileError(f"{path}: {runtime} is not installed ({error.name or module}){hint}") from error


def check_content(path: Path) -> None:
    """The file exists, is not empty and its content is what its suffix says (one line otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: model file is empty")
    with path.open("rb") as handle:
        head = handle.read(512)
    fmt = format_of(path)
    if fmt == "tflite" and head[4:8] != b"TFL3":
        raise ModelFileError(f"{path}: not a LiteRT model (no TFL3 identifier)")
    if fmt == "openvino":
        if b"<net" not in head:
            raise ModelFileError(f"{path}: not an OpenVINO IR (.xml without a <net> element)")
        weights = path.with_suffix(".bin")
        if not weights.is_file():
            raise ModelFileError(f"{path}: OpenVINO IR without its weights file {weights.name} beside it")
    if fmt == "onnx" and (head[:4] == b"PK\x03\x04" or head[4:8] == b"TFL3" or head.lstrip().startswith(b"<")):
        raise ModelFileError(f"{path}: not an ONNX model (content of another format)")


def check_int8_weights(path: Path, description: dict[str, Any] | None) -> None:
    """Refuse, in one line, a file whose int8 weights are 8-bit throughout (`export --int8-weights
    vnni`) on an x86 CPU without an int8 dot product: there its int16 pair sums saturate and it
    loses accuracy (17 points of NEU test accuracy, docs/formats.md)."""
    from steeldefect.core import cpuinfo

    if description and description.get("int8_weights") == "vnni" and cpuinfo.saturating_int8():
        raise ModelFileError(
            f"{path}: its int8 weights are 8-bit throughout (exported with --int8-weights vnni), for CPUs with "
            f"an int8 dot product (AVX-512 VNNI, AVX-VNNI); this CPU ({cpuinfo.cpu_model()}) has none and would "
            "misclassify: use the file exported with --int8-weights portable"
        )


def _description(props: dict[str, str]) -> dict[str, Any] | None:
    """The description among a file's key/values, or None when it has none or it is not readable
    (read_embedded reports a damaged one)."""
    try:
        meta = json.loads(props.get(DESCRIPTION_KEY) or "null")
    except json.JSONDecodeError:
        return None
    return meta if isinstance(meta, dict) else None


class Backend(ABC):
    """One loaded model; not thread-safe (one per thread or worker process).

    ``prepare`` turns a uint8 image into the runtime's input, ``invoke`` runs the model on it and
    ``outputs`` reads what the last invoke produced, so `evaluate` can time the model alone.
    """

    runtime: str
    input_size: tuple[int, int]  # (height, width)
    output_widths: dict[str, int]  # output name -> values per image

    @abstractmethod
    def prepare(self, image: np.ndarray) -> Any:
        """The runtime's batch-1 input for one uint8 image (H, W, 3)."""

    @abstractmethod
    def invoke(self, prepared: Any) -> None:
        """Run the model on a prepared input."""

    def details(self) -> dict[str, Any]:
        """Runtime-specific facts recorded beside a measurement (e.g. XNNPACK partitions)."""
        return {}

    # Set by each backend: its outputs in the runtime's order, as (our name, shape).
    _order: list[tuple[str, list[int]]]

    def _set_order(self, names: list[str], shapes: list[list[int]]) -> None:
        ours = _name_outputs(names, [int(np.prod(shape[1:])) for shape in shapes])
        self._order = list(zip(ours, shapes))
        self.output_widths = {name: int(np.prod(shape[1:])) for name, shape in self._order}

    def name_outputs(self, described: Any, where: Path | str) -> None:
        """Name the outputs as the model's description does (``outputs``: name, index, shape; written
        into .tflite files since issue #27), instead of by the names or widths the runtime reports.
        Anything that does not fit the model is one line naming ``where``."""
        if not isinstance(described, list) or not all(isinstance(entry, dict) for entry in described):
            raise ModelFileError(f"{where}: outputs in the model metadata must be a list of objects")
        names = [f"output_{i}" for i in range(len(self._order))]
        for entry in described:
            name, index = entry.get("name"), entry.get("index")
            if name not in (PROBABILITIES, TEXTURE) or name in names:
                raise ModelFileError(f"{where}: unknown or repeated output name {name!r} in the model metadata")
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self._order):
                raise ModelFileError(
                    f"{where}: output {name!r} has index {index!r}; the model has {len(names)} outputs"
                )
            shape = [int(v) for v in self._order[index][1]]
            if entry.get("shape") != shape:
                raise ModelFileError(
                    f"{where}: output {name!r} is described with shape {entry.get('shape')}, "
                    f"the model's output {index} has {shape}"
                )
            names[index] = name
        if PROBABILITIES not in names:
            raise ModelFileError(f"{where}: the model metadata names no {PROBABILITIES!r} output")
        self._order = [(name, shape) for name, (_, shape) in zip(names, self._order)]
        self.output_widths = {name: int(np.prod(shape[1:])) for name, shape in self._order}

    @abstractmethod
    def _raw_outputs(self) -> list[np.ndarray]:
        """The last invoke's outputs in the runtime's order, each (width,) float32."""

    def outputs(self) -> dict[str, np.ndarray]:
        """Every output of the last invoke, by name, each (width,) float32."""
        return {name: value for (name, _), value in zip(self._order, self._raw_outputs())}

    def run_one(self, image: np.ndarray) -> dict[str, np.ndarray]:
        self.invoke(self.prepare(np.ascontiguousarray(image, dtype=np.uint8)))
        return self.outputs()

    def run(self, images: np.ndarray | Iterable[np.ndarray]) -> dict[str, np.ndarray]:
        """Every output (N, width) for uint8 images (N, H, W, 3), or an iterable of (H, W, 3), by name."""
        collected: dict[str, list[np.ndarray]] = {name: [] for name in self.output_widths}
        for image in images:
            for name, value in self.run_one(image).items():
                collected[name].append(value)
        return {
            name: np.stack(values) if values else np.zeros((0, self.output_widths[name]), np.float32)
            for name, values in collected.items()
        }


def _name_outputs(names: list[str], widths: list[int]) -> list[str]:
    """Our names for a model's outputs: by the names the model carries when they say which is which
    (exported ONNX/OpenVINO files, and .tflite files whose signature names them, e.g.
    ``serving_default_probabilities:0``), else by width, narrowest first (older .tflite files: the
    class probabilities are narrower than the texture statistics)."""
    by_name = [TEXTURE if TEXTURE in name else PROBABILITIES if PROBABILITIES in name else None for name in names]
    if PROBABILITIES in by_name and len(set(by_name)) == len(by_name):
        return [ours or name for ours, name in zip(by_name, names)]
    result = list(names)
    for rank, index in enumerate(sorted(range(len(names)), key=lambda i: widths[i])):
        result[index] = (PROBABILITIES, TEXTURE)[rank] if rank < 2 else f"output_{index}"
    return result


class LiteRTBackend(Backend):
    runtime = "LiteRT"

    def __init__(self, path: Path | None, threads: int | None, *, interpreter=None) -> None:
        from steeldefect.runtime.litert import from_output, make_interpreter, to_input

        self._to_input, self._from_output = to_input, from_output
        if interpreter is None:
            if path is None:
                raise ValueError("LiteRTBackend needs a model path or an interpreter")
            interpreter = make_interpreter(Path(path), threads)
        self.interpreter = interpreter
        self._input = self.interpreter.get_input_details()[0]
        shape = self._input["shape"]
        self.input_size = (int(shape[1]), int(shape[2]))
        self._details = self.interpreter.get_output_details()
        self._set_order([d["name"] for d in self._details], [[int(v) for v in d["shape"]] for d in self._details])

    def prepare(self, image: np.ndarray) -> np.ndarray:
        return self._to_input(image, self._input)

    def invoke(self, prepared: np.ndarray) -> None:
        self.interpreter.set_tensor(self._input["index"], prepared)
        self.interpreter.invoke()

    def _raw_outputs(self) -> list[np.ndarray]:
        return [self._from_output(self.interpreter.get_tensor(d["index"])[0], d).reshape(-1) for d in self._details]

    def details(self) -> dict[str, Any]:
        from steeldefect.runtime.litert import delegate_partitions

        return {"xnnpack_partitions": delegate_partitions(self.interpreter)}


class OnnxBackend(Backend):
    runtime = "ONNX Runtime"

    def __init__(self, path: Path, threads: int | None, *, profile: str | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = resolve_threads(threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if profile:
            options.enable_profiling = True
            options.profile_file_prefix = profile
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
            raise ModelFileError(f"{path}: not a model ONNX Runtime can load ({_first_line(error)})") from error
        check_int8_weights(path, _description(self.session.get_modelmeta().custom_metadata_map))
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ModelFileError(f"{path}: expects one image input (N, H, W, 3), has {len(inputs)} inputs")
        self._input = inputs[0].name
        self._float_input = inputs[0].type != "tensor(uint8)"
        shape = inputs[0].shape
        try:
            self.input_size = (int(shape[1]), int(shape[2]))
        except (TypeError, ValueError) as error:
            raise ModelFileError(f"{path}: the image input has no fixed height/width ({shape})") from error
        outputs = self.session.get_outputs()
        self._names = [o.name for o in outputs]
        self._set_order(self._names, [[d if isinstance(d, int) else 1 for d in o.shape] for o in outputs])

    def prepare(self, image: np.ndarray) -> np.ndarray:
        return image[None].astype(np.float32) if self._float_input else image[None]

    def invoke(self, prepared: np.ndarray) -> None:
        self._last = self.session.run(self._names, {self._input: prepared})

    def _raw_outputs(self) -> list[np.ndarray]:
        return [np.asarray(v, np.float32).reshape(-1) for v in self._last]


class OpenVinoBackend(Backend):
    runtime = "OpenVINO"

    def __init__(self, path: Path, threads: int | None, *, profile: bool = False) -> None:
        import openvino as ov

        core = ov.Core()
        n_threads = resolve_threads(threads)
        config: dict[str, Any] = {
            "INFERENCE_NUM_THREADS": n_threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            # On CPUs with native bf16 (AVX512_BF16, AMX) the CPU plugin otherwise runs float layers
            # in bf16: an fp32 IR then disagrees with LiteRT fp32 (seen in CI: 1 NEU test image in 270).
            "INFERENCE_PRECISION_HINT": "f32",
            # Fewer threads than cores means other processes share the machine (the archive engine's
            # one-thread workers): pinned, every worker's thread lands on the same core.
            "ENABLE_CPU_PINNING": n_threads >= (os.cpu_count() or 1),
        }
        if profile:
            config["PERF_COUNT"] = True
        try:
            model = core.read_model(str(path), str(Path(path).with_suffix(".bin")))
        except Exception as error:  # OpenVINO raises RuntimeError with a multi-line message
            raise ModelFileError(f"{path}: not a model OpenVINO can load ({_first_line(error)})") from error
        check_int8_weights(path, _description(_rt_props(model)))
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as error:
            raise ModelFileError(f"{path}: not a model OpenVINO can load ({_first_line(error)})") from error
        inputs = self.compiled.inputs
        if len(inputs) != 1 or len(inputs[0].get_partial_shape()) != 4 or inputs[0].get_partial_shape().is_dynamic:
            raise ModelFileError(f"{path}: expects one static image input (1, H, W, 3)")
        shape = inputs[0].get_shape()
        self.input_size = (int(shape[1]), int(shape[2]))
        self._float_input = inputs[0].get_element_type() != ov.Type.u8
        self.request = self.compiled.create_infer_request()
        self._ports = self.compiled.outputs
        names = [o.get_any_name() if o.get_names() else f"output_{i}" for i, o in enumerate(self._ports)]
        self._set_order(names, [[int(v) for v in o.get_shape()] for o in self._ports])

    def prepare(self, image: np.ndarray) -> np.ndarray:
        return image[None].astype(np.float32) if self._float_input else image[None]

    def invoke(self, prepared: np.ndarray) -> None:
        self.request.infer({0: prepared})

    def _raw_outputs(self) -> list[np.ndarray]:
        return [np.array(self.request.get_tensor(port).data, np.float32).reshape(-1) for port in self._ports]


def open_backend(path: Path, threads: int | None = None) -> Backend:
    """The backend for a model file, chosen by suffix and checked against its content."""
    path = Path(path)
    check_content(path)
    require_runtime(path)
    fmt = format_of(path)
    if fmt == "tflite":
        return LiteRTBackend(path, threads)
    if fmt == "onnx":
        return OnnxBackend(path, threads)
    return OpenVinoBackend(path, threads)


def model_files(path: Path) -> list[Path]:
    """The files one model consists of (an OpenVINO IR: the .xml and its .bin)."""
    path = Path(path)
    return [path, path.with_suffix(".bin")] if path.suffix.lower() == ".xml" else [path]


def size_on_disk(path: Path) -> int:
    """Bytes of every file the model consists of."""
    return sum(p.stat().st_size for p in model_files(path) if p.is_file())


def model_digest(path: Path) -> str:
    """sha256 of a model: of its file, or for an OpenVINO IR of the .xml's and the .bin's digests
    together (the weights are in the .bin, so a swapped .bin must change the digest too)."""
    import hashlib

    from steeldefect.core.files import file_digest

    files = model_files(path)
    if len(files) == 1:
        return file_digest(files[0])
    return hashlib.sha256("".join(file_digest(p) for p in files if p.is_file()).encode()).hexdigest()


def runtime_name(path: Path) -> str:
    return FORMATS[Path(path).suffix.lower()][1]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


# --- the description each file carries --------------------------------------------------------------


def read_embedded(path: Path) -> tuple[dict[str, Any] | None, bytes | None]:
    """(description, rule .npz bytes) carried inside a model file; (None, None) when it has none.
    Damaged descriptions raise one-line :class:`ModelFileError`."""
    path = Path(path)
    fmt = format_of(path)
    check_content(path)
    if fmt == "tflite":
        from steeldefect.runtime.tflite_metadata import read_embedded_file, read_embedded_metadata
        from steeldefect.runtime.uncertainty import RULE_FILE

        meta = read_embedded_metadata(path)
        has_rule = meta is not None and isinstance(meta.get("uncertainty"), dict)
        return meta, (read_embedded_file(path, RULE_FILE, MAX_DESCRIPTION_BYTES) if has_rule else None)
    require_runtime(path)
    props = _onnx_props(path) if fmt == "onnx" else _openvino_props(path)
    text = props.get(DESCRIPTION_KEY)
    if text is None:
        return None, None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as error:
        raise ModelFileError(f"{path}: {DESCRIPTION_KEY} inside the model file is not valid JSON ({error})") from error
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: {DESCRIPTION_KEY} inside the model file is not a JSON object")
    rule = props.get(RULE_KEY)
    if rule is None:
        return meta, None
    if len(rule) > MAX_DESCRIPTION_BYTES:
        raise ModelFileError(f"{path}: {RULE_KEY} inside the model file is {len(rule)} bytes, over the limit")
    try:
        return meta, base64.b64decode(rule, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ModelFileError(f"{path}: {RULE_KEY} inside the model file is not base64 ({error})") from error


def _onnx_props(path: Path) -> dict[str, str]:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        # No external data: the model's weights are not needed here, and a path inside an untrusted
        # file must not make us read other files.
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as error:
        raise ModelFileError(f"{path}: not an ONNX model ({_first_line(error)})") from error
    if not model.graph.node or not model.ir_version:
        raise ModelFileError(f"{path}: not an ONNX model (no graph)")
    return {entry.key: entry.value for entry in model.metadata_props}


def _openvino_props(path: Path) -> dict[str, str]:
    import openvino as ov

    try:
        model = ov.Core().read_model(str(path), str(Path(path).with_suffix(".bin")))
    except Exception as error:
        raise ModelFileError(f"{path}: not a model OpenVINO can load ({_first_line(error)})") from error
    return _rt_props(model)


def _rt_props(model: Any) -> dict[str, str]:
    """The description and rule strings in an OpenVINO model's rt_info."""
    props = {}
    for key, field in ((DESCRIPTION_KEY, "json"), (RULE_KEY, "rule")):
        if model.has_rt_info([OV_RT_SECTION, field]):
            props[key] = model.get_rt_info([OV_RT_SECTION, field]).astype(str)
    return props
