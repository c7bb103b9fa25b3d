"""Model files that describe themselves: standard TFLite Model Metadata inside every exported .tflite.

Written with MediaPipe's metadata writer (``mediapipe.tasks.python.metadata``): model name,
description and version, the input image (RGB, raw pixels 0..255, so normalization mean 0 / std 1)
and output 0's class labels as an associated ``labels.txt``, which MediaPipe Tasks'
``ImageClassifier`` and the other LiteRT metadata readers understand. Output 0 is always the class
probabilities; a deploy model's output 1, ``texture_statistics``, feeds the uncertainty rule only and
carries no labels (docs/model-outputs.md). Beside it, the model-level
associated file ``steeldefect.json`` carries everything our own tools need (class names, input size,
variant, calibration, uncertainty threshold, provenance).

Associated files are packed as a zip archive appended to the flatbuffer (that is the metadata
format's design), so reading them back needs only :mod:`zipfile`: `predict` and the service read
``steeldefect.json`` without importing MediaPipe or TensorFlow.

The MediaPipe wheels for NumPy 2 (0.10.30, 1.2.3 and the 1.2.0 nightly checked) ship the metadata
writer without the compiled ``_pywrap_metadata_version`` module it imports, so it fails at import.
That module computes one field, the metadata's minimum parser version; :func:`min_parser_version`
computes it the same way (it follows mediapipe/tasks/cc/metadata/metadata_version.cc) and stands in
for the missing module only when the real one cannot be imported.
"""

from __future__ import annotations

import importlib
import io
import json
import sys
import tempfile
import types
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from steeldefect.runtime.litert import ModelFileError

OUR_FILE = "steeldefect.json"
LABELS_FILE = "labels.txt"
PROBABILITIES_OUTPUT = "probabilities"
TEXTURE_OUTPUT = "texture_statistics"
OUTPUT_NAMES = (PROBABILITIES_OUTPUT, TEXTURE_OUTPUT)  # in the model's output order
NO_CATEGORY_THRESHOLD = float(np.finfo(np.float32).max)
# TFLite schema TensorType values of the dtypes an exported classifier's outputs have.
_TENSOR_TYPES = {0: "float32", 1: "float16", 3: "uint8", 9: "int8"}
MAX_DESCRIPTION_BYTES = 1 << 20
_MISSING_MODULE = "mediapipe.tasks.cc.metadata.python._pywrap_metadata_version"


def min_parser_version(metadata_buffer: bytes) -> str:
    """The lowest metadata parser version that understands every field set in ``metadata_buffer``.

    Fields added to the schema after 1.0.0 raise it (versions from the schema's change log).
    """
    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb

    metadata = fb.ModelMetadataT.InitFromObj(fb.ModelMetadata.GetRootAsModelMetadata(bytes(metadata_buffer), 0))
    needed = [(1, 0, 0)]

    def files(items) -> None:
        for item in items or []:
            if item.type == fb.AssociatedFileType.VOCABULARY:
                needed.append((1, 0, 1))
            if item.type == fb.AssociatedFileType.SCANN_INDEX_FILE:
                needed.append((1, 4, 0))
            if item.version is not None:
                needed.append((1, 4, 1))

    def units(items) -> None:
        for item in items or []:
            if item.optionsType in (
                fb.ProcessUnitOptions.BertTokenizerOptions,
                fb.ProcessUnitOptions.SentencePieceTokenizerOptions,
            ):
                needed.append((1, 1, 0))
            if item.optionsType == fb.ProcessUnitOptions.RegexTokenizerOptions:
                needed.append((1, 2, 1))

    for subgraph in metadata.subgraphMetadata or []:
        for tensor in (subgraph.inputTensorMetadata or []) + (subgraph.outputTensorMetadata or []):
            files(tensor.associatedFiles)
            units(tensor.processUnits)
            content = tensor.content
            if content is not None and content.contentPropertiesType == fb.ContentProperties.AudioProperties:
                needed.append((1, 3, 0))
        files(subgraph.associatedFiles)
        for process_units in (subgraph.inputProcessUnits, subgraph.outputProcessUnits):
            if process_units is not None:
                needed.append((1, 1, 0))
                units(process_units)
        if subgraph.inputTensorGroups is not None or subgraph.outputTensorGroups is not None:
            needed.append((1, 2, 0))
        if subgraph.customMetadata is not None:
            needed.append((1, 5, 0))
    files(metadata.associatedFiles)
    return ".".join(str(part) for part in max(needed))


def _metadata_writer_modules():
    """MediaPipe's metadata modules (``metadata``, ``metadata_info``, ``writer_utils``, schema)."""
    try:
        importlib.import_module("mediapipe.tasks")
    except ImportError as error:
        raise RuntimeError(f"writing model metadata needs MediaPipe (pip install mediapipe): {error}") from error
    try:
        importlib.import_module(_MISSING_MODULE)
    except ImportError:
        # Stand-in modules for the compiled one the wheel lacks (see the module docstring); a wheel
        # that has the real module always gets it.
        parts = _MISSING_MODULE.split(".")
        for end in range(3, len(parts) + 1):
            name = ".".join(parts[:end])
            try:
                module = importlib.import_module(name)
            except ImportError:
                module = types.ModuleType(name)
                if end == len(parts):
                    setattr(module, "GetMinimumMetadataParserVersion", min_parser_version)  # noqa: B010
                sys.modules[name] = module
                setattr(sys.modules[".".join(parts[: end - 1])], parts[end - 1], module)
    from mediapipe.tasks.metadata import metadata_schema_py_generated as schema
    from mediapipe.tasks.python.metadata import metadata
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_info, writer_utils

    return metadata, metadata_info, writer_utils, schema


def embed_metadata(flatbuffer: bytes, meta: dict[str, Any], extra_files: dict[str, bytes] | None = None) -> bytes:
    """``flatbuffer`` (a .tflite without metadata) with TFLite Model Metadata and ``meta`` inside.

    ``meta`` is the model's description as its sidecar holds it: at least ``class_names`` and
    ``input`` (height, width); all of it is stored as ``steeldefect.json``. The writer re-serializes
    the flatbuffer with one buffer (the metadata) added and the files appended; the graph, tensors
    and weights keep their values, so predictions are byte-identical (tests/unit/test_model_metadata.py).
    ``extra_files``: more model-level associated files (the uncertainty rule's arrays).
    """
    metadata, metadata_info, writer_utils, schema = _metadata_writer_modules()
    class_names = [str(name) for name in meta["class_names"]]
    height, width = int(meta["input"]["height"]), int(meta["input"]["width"])
    model = bytearray(flatbuffer)
    if metadata.get_metadata_buffer(model) is not None:
        raise ValueError("the model already carries TFLite metadata; embed into the converter's output")
    subgraph = writer_utils.get_subgraph(model)
    inputs = [subgraph.Tensors(subgraph.Inputs(i)) for i in range(subgraph.InputsLength())]
    outputs = [subgraph.Tensors(subgraph.Outputs(i)) for i in range(subgraph.OutputsLength())]
    # One image in; out the class probabilities (output 0, see steeldefect.models.conversion) and, for
    # a model that carries its uncertainty score, the texture statistics.
    if len(inputs) != 1 or not 1 <= len(outputs) <= 2:
        raise ValueError(
            f"an image classifier has one input and one or two outputs, this model {len(inputs)} and {len(outputs)}"
        )
    in_shape = inputs[0].ShapeAsNumpy().tolist()
    out_shapes = [output.ShapeAsNumpy().tolist() for output in outputs]
    if in_shape[1:3] != [height, width]:
        raise ValueError(f"metadata input size {height}x{width} does not match the model's {in_shape}")
    if out_shapes[0][-1] != len(class_names):
        widths = " and ".join(str(shape[-1]) for shape in out_shapes)
        raise ValueError(
            f"{len(class_names)} class names for a model with {widths} outputs "
            "(the class probabilities must be output 0)"
        )
    # What our own readers go by: runtime.modelfile picks the outputs by these names, not by position.
    described = [
        {"name": name, "index": index, "shape": shape, "dtype": _TENSOR_TYPES.get(output.Type(), "other")}
        for index, (name, shape, output) in enumerate(zip(OUTPUT_NAMES, out_shapes, outputs))
    ]
    if meta.get("outputs") not in (None, described):
        raise ValueError(f"the description's outputs {meta['outputs']} are not the model's {described}")
    meta = {**meta, "outputs": described}

    variant = str(meta.get("variant", "tflite"))
    provenance = meta.get("provenance") or {}
    fold = meta.get("fold")
    general = metadata_info.GeneralMd(
        name=" ".join(str(part) for part in ("steeldefect", meta.get("backbone"), variant) if part),
        version=" ".join(
            str(part)
            for part in (provenance.get("run"), f"fold{fold}" if fold is not None else None, meta.get("created"))
            if part
        )
        or None,
        description=(
            f"Steel surface defect classifier, {len(class_names)} classes: {', '.join(class_names)}. "
            f"Input: one {height}x{width} RGB image, raw pixels 0..255. Output 0: class probabilities"
            + (f"; output 1: {TEXTURE_OUTPUT} for the uncertainty score, not classes. " if len(outputs) == 2 else ". ")
            + f"{OUR_FILE} holds the variant, calibration and provenance."
        ),
        author="steeldefect",
    ).create_metadata()
    image = metadata_info.InputImageTensorMd(
        name="image",
        description=f"RGB image {height}x{width}, raw pixels 0..255 (the model normalizes inside)",
        # Raw pixels in: identity normalization, as the metadata format spells it.
        norm_mean=[0.0],
        norm_std=[1.0],
        color_space_type=schema.ColorSpaceType.RGB,
        tensor_type=inputs[0].Type(),
    )
    output_metadata = [
        metadata_info.ClassificationTensorMd(
            name=PROBABILITIES_OUTPUT,
            description="Probability of each class (softmax), in the order of labels.txt",
            label_files=[metadata_info.LabelFileMd(LABELS_FILE)],
            tensor_type=outputs[0].Type(),
        ).create_metadata()
    ]
    if len(outputs) == 2:
        texture = metadata_info.TensorMd(
            name=TEXTURE_OUTPUT,
            description=(
                "Not a classification: per-channel mean and mean of squares of four backbone layers, the "
                f"input of the uncertainty score described in {OUR_FILE}"
            ),
        ).create_metadata()
        # MediaPipe Tasks turns every output tensor into a classification head (it cannot be told to
        # skip one) and drops scores below a head's ScoreThresholdingOptions: with the largest float as
        # the threshold this head reports no categories unless a caller overrides score_threshold.
        texture.processUnits = [metadata_info.ScoreThresholdingMd(NO_CATEGORY_THRESHOLD).create_metadata()]
        output_metadata.append(texture)
    ours = metadata_info.AssociatedFileMd(
        OUR_FILE,
        description="steeldefect model description (JSON): class names, input size, variant, calibration, provenance",
        file_type=schema.AssociatedFileType.DESCRIPTIONS,
    )
    subgraph_metadata = schema.SubGraphMetadataT()
    subgraph_metadata.inputTensorMetadata = [image.create_metadata()]
    subgraph_metadata.outputTensorMetadata = output_metadata
    general.subgraphMetadata = [subgraph_metadata]
    extra_files = dict(extra_files or {})
    general.associatedFiles = [ours.create_metadata()] + [
        metadata_info.AssociatedFileMd(
            name, description=f"{name}: see {OUR_FILE}", file_type=schema.AssociatedFileType.UNKNOWN
        ).create_metadata()
        for name in extra_files
    ]

    import flatbuffers

    builder = flatbuffers.Builder(0)
    builder.Finish(general.Pack(builder), metadata.MetadataPopulator.METADATA_FILE_IDENTIFIER)
    # The populator works on a file; a private temporary folder is removed here, deterministically
    # (the in-memory variant leaves its temporary file to a destructor).
    with tempfile.TemporaryDirectory(prefix="steeldefect-metadata-") as folder:
        path = Path(folder) / "model.tflite"
        path.write_bytes(model)
        populator = metadata.MetadataPopulator.with_model_file(str(path))
        populator.load_metadata_buffer(builder.Output())
        populator.load_associated_file_buffers(
            {
                LABELS_FILE: "\n".join(class_names).encode("utf-8"),
                OUR_FILE: json.dumps(meta, indent=2).encode("utf-8"),
                **extra_files,
            }
        )
        populator.populate()
        return path.read_bytes()


def read_embedded_metadata(model: Path | bytes) -> dict[str, Any] | None:
    """The ``steeldefect.json`` a model file carries, or None when it has none (an older export).

    A damaged archive, unreadable JSON or labels that contradict it raise a one-line
    :class:`ModelFileError` naming the file.
    """
    if isinstance(model, (bytes, bytearray)):
        data, name = bytes(model), "model bytes"
    else:
        name = str(model)
        try:
            data = Path(model).read_bytes()
        except OSError as error:
            raise ModelFileError(f"{name}: cannot read the model file ({error.strerror or error})") from error
    stream = io.BytesIO(data)
    if not zipfile.is_zipfile(stream):
        return None
    try:
        with zipfile.ZipFile(stream) as archive:
            members = {info.filename: info for info in archive.infolist()}
            if OUR_FILE not in members:
                return None
            # Model files are untrusted: a description is a few KiB, never worth a huge decompression.
            for member in (OUR_FILE, LABELS_FILE):
                if member in members and members[member].file_size > MAX_DESCRIPTION_BYTES:
                    raise ModelFileError(
                        f"{name}: {member} inside the model file is {members[member].file_size} bytes, "
                        f"more than the {MAX_DESCRIPTION_BYTES} a model description may take"
                    )
            text = archive.read(OUR_FILE).decode("utf-8")
            labels = archive.read(LABELS_FILE).decode("utf-8").splitlines() if LABELS_FILE in members else None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, UnicodeDecodeError, OSError, EOFError, ValueError) as error:
        raise ModelFileError(f"{name}: damaged metadata in the model file ({type(error).__name__}: {error})") from error
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as error:
        raise ModelFileError(f"{name}: {OUR_FILE} inside the model file is not valid JSON ({error})") from error
    if not isinstance(meta, dict):
        raise ModelFileError(f"{name}: {OUR_FILE} inside the model file is not a JSON object")
    if labels is not None and labels != meta.get("class_names"):
        raise ModelFileError(f"{name}: {LABELS_FILE} and {OUR_FILE} inside the model file name different classes")
    return meta


def read_embedded_file(model: Path, member: str, limit: int) -> bytes | None:
    """An associated file packed in a model file, or None when it has none; a member larger than
    ``limit`` bytes (model files are untrusted) or a damaged archive raise a one-line :class:`ModelFileError`."""
    name = str(model)
    try:
        with zipfile.ZipFile(Path(model)) as archive:
            try:
                info = archive.getinfo(member)
            except KeyError:
                return None
            if info.file_size > limit:
                raise ModelFileError(f"{name}: {member} inside the model file is {info.file_size} bytes, over {limit}")
            return archive.read(member)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as error:
        raise ModelFileError(f"{name}: damaged metadata in the model file ({type(error).__name__}: {error})") from error
