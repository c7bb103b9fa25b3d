"""Unit tests for the Keras EfficientNet-Lite0 port and the PyTorch-free legacy .pth reader."""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path

import numpy as np
import pytest

from steeldefect.models.efficientnet_lite import (
    FEATURES_LAYER,
    LITE0_SHA256,
    UnsafePickleError,
    WeightsIntegrityError,
    build_efficientnet_lite0,
    lite0_weights_path,
    load_pth_into_model,
    read_legacy_pth,
)

MAGIC = 0x1950A86A20F9469CFC6C
SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


# ---- a tiny writer that mimics torch's legacy torch.save, without torch -------------------------


class _Global:
    """Pickled as a bare GLOBAL opcode naming module.name (the real object need not exist)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args):  # save_reduce insists the reducer be callable
        raise AssertionError("never called")


class _Storage:
    def __init__(self, key: str, data: np.ndarray) -> None:
        self.key, self.data = key, data


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, shape: tuple, strides: tuple) -> None:
        self.args = (storage, offset, shape, strides, False, collections.OrderedDict())

    def __reduce__(self):
        return _Global("torch._utils", "_rebuild_tensor_v2"), self.args


class _LegacyPickler(pickle._Pickler):  # the pure-Python pickler lets us add a dispatch entry
    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[_Global] = lambda self, obj: self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            kind = {np.dtype("float32"): "FloatStorage", np.dtype("int64"): "LongStorage"}[obj.data.dtype]
            return ("storage", _Global("torch", kind), obj.key, "cpu", obj.data.size, None)
        return None


def _dump(obj, handle) -> None:
    _LegacyPickler(handle, protocol=2).dump(obj)


def write_legacy(path: Path, state: dict, storages: list[_Storage]) -> None:
    with open(path, "wb") as handle:
        for header in (MAGIC, 1001, SYS_INFO):
            _dump(header, handle)
        _dump(state, handle)
        _dump([s.key for s in storages], handle)
        for s in storages:
            handle.write(s.data.size.to_bytes(8, "little"))
            handle.write(s.data.astype(s.data.dtype.newbyteorder("<")).tobytes())


# ---- reader -------------------------------------------------------------------------------------


def test_synthetic_legacy_file_round_trips_including_non_contiguous(tmp_path):
    rng = np.random.default_rng(0)
    conv_oihw = rng.standard_normal((4, 3, 2, 5)).astype(np.float32)
    # Stored HWIO in memory behind an OIHW shape, like the real conv weights.
    hwio = np.ascontiguousarray(conv_oihw.transpose(2, 3, 1, 0))
    conv_strides = tuple(s // 4 for s in hwio.transpose(3, 2, 0, 1).strides)
    shared = rng.standard_normal(10).astype(np.float32)
    s_conv, s_shared, s_count = _Storage("7", hwio.ravel()), _Storage("3", shared), _Storage("9", np.array([5]))
    state = collections.OrderedDict(
        [
            ("conv.weight", _Tensor(s_conv, 0, (4, 3, 2, 5), conv_strides)),
            ("bn.running_mean", _Tensor(s_shared, 2, (6,), (1,))),
            ("bn.num_batches_tracked", _Tensor(s_count, 0, (), ())),
            ("head", _Tensor(s_shared, 0, (2, 2), (1, 2))),  # transposed view of the same storage
        ]
    )
    assert conv_strides != (30, 10, 5, 1)  # really non-contiguous
    path = tmp_path / "tiny.pth"
    write_legacy(path, state, sorted([s_conv, s_shared, s_count], key=lambda s: s.key))

    got = read_legacy_pth(path)
    assert list(got) == ["conv.weight", "bn.running_mean", "bn.num_batches_tracked", "head"]
    np.testing.assert_array_equal(got["conv.weight"], conv_oihw)
    assert got["conv.weight"].flags.c_contiguous and got["conv.weight"].dtype == np.float32
    np.testing.assert_array_equal(got["bn.running_mean"], shared[2:8])
    assert got["bn.num_batches_tracked"].shape == () and got["bn.num_batches_tracked"].dtype == np.int64
    assert int(got["bn.num_batches_tracked"]) == 5
    np.testing.assert_array_equal(got["head"], shared[:4].reshape(2, 2).T)


def test_hash_mismatch_names_file_and_both_hashes(tmp_path):
    path = tmp_path / "tiny.pth"
    s = _Storage("0", np.zeros(2, np.float32))
    write_legacy(path, {"w": _Tensor(s, 0, (2,), (1,))}, [s])
    with pytest.raises(WeightsIntegrityError) as info:
        read_legacy_pth(path, expected_sha256=LITE0_SHA256)
    assert str(path) in str(info.value) and LITE0_SHA256 in str(info.value)


def test_strides_reaching_past_storage_are_refused(tmp_path):
    path = tmp_path / "oob.pth"
    s = _Storage("0", np.zeros(4, np.float32))
    write_legacy(path, {"w": _Tensor(s, 0, (4, 4), (4, 1))}, [s])
    with pytest.raises(WeightsIntegrityError, match="past its storage"):
        read_legacy_pth(path)


@pytest.mark.parametrize("module,name", [("os", "system"), ("posix", "system"), ("builtins", "eval")])
@pytest.mark.parametrize("position", ["header", "state_dict"])
def test_malicious_global_is_refused_without_running(tmp_path, module, name, position):
    def payload_for(marker: Path) -> bytes:
        arg = f"touch {marker}" if name == "system" else f"open({str(marker)!r}, 'w').close()"
        return f"c{module}\n{name}\n(V{arg}\ntR.".encode()

    # Prove the payload is live: a plain pickle.loads runs it.
    live = tmp_path / "live"
    pickle.loads(payload_for(live))
    assert live.exists()

    marker = tmp_path / "pwned"
    payload = payload_for(marker)
    path = tmp_path / "evil.pth"
    buffer = io.BytesIO()
    if position == "state_dict":
        for header in (MAGIC, 1001, SYS_INFO):
            pickle.dump(header, buffer, protocol=2)
    buffer.write(payload)
    path.write_bytes(buffer.getvalue())

    with pytest.raises(UnsafePickleError) as info:
        read_legacy_pth(path)
    assert isinstance(info.value, pickle.UnpicklingError)
    assert f"{module}.{name}" in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()


def test_build_opcode_on_reader_objects_is_refused(tmp_path):
    # GLOBAL torch FloatStorage, then BUILD with a dict: would mutate the stand-in storage type.
    path = tmp_path / "build.pth"
    buffer = io.BytesIO()
    for header in (MAGIC, 1001, SYS_INFO):
        pickle.dump(header, buffer, protocol=2)
    buffer.write(b"ctorch\nFloatStorage\n}Vdtype\nVO\nsb.")
    path.write_bytes(buffer.getvalue())
    with pytest.raises(UnsafePickleError):
        read_legacy_pth(path)


# ---- architecture and mapping -------------------------------------------------------------------


def test_architecture_shapes_and_parameter_count():
    features = build_efficientnet_lite0()
    assert features.output_shape == (None, 7, 7, 1280)
    assert features.layers[-1].name == FEATURES_LAYER
    top = build_efficientnet_lite0(include_top=True, batch_size=2)
    assert top.output_shape == (2, 1000)
    # Equals the float elements in the real .pth (convs, BN incl. running stats, fc).
    assert top.count_params() == 4_694_024
    assert sum(name.endswith("_dwconv") for name in (layer.name for layer in top.layers)) == 16
    x = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    np.testing.assert_allclose(top.predict(x, verbose=0).sum(axis=1), 1.0, rtol=1e-5)


def _fake_state_dict(model) -> dict[str, np.ndarray]:
    """A torch-layout state dict whose values identify their destination."""
    from steeldefect.models.efficientnet_lite import _pth_prefix

    rng = np.random.default_rng(1)
    state: dict[str, np.ndarray] = {}
    for layer in model.layers:
        if not layer.weights:
            continue
        prefix, shapes = _pth_prefix(layer.name), [tuple(w.shape) for w in layer.weights]
        kind = type(layer).__name__
        if kind == "DepthwiseConv2D":
            state[f"{prefix}.weight"] = rng.standard_normal(shapes[0]).transpose(2, 3, 0, 1)
        elif kind == "Conv2D":
            state[f"{prefix}.weight"] = rng.standard_normal(shapes[0]).transpose(3, 2, 0, 1)
        elif kind == "Dense":
            state[f"{prefix}.weight"] = rng.standard_normal(shapes[0]).T
            state[f"{prefix}.bias"] = rng.standard_normal(shapes[1])
        else:
            for part in ("weight", "bias", "running_mean", "running_var"):
                state[f"{prefix}.{part}"] = rng.uniform(0.5, 1.5, shapes[0])
            state[f"{prefix}.num_batches_tracked"] = np.array(0, dtype=np.int64)
    return state


def test_load_pth_into_model_maps_layouts_and_rejects_leftovers():
    model = build_efficientnet_lite0(include_top=True, input_shape=(32, 32, 3))
    state = _fake_state_dict(model)
    load_pth_into_model(model, state)
    dw = model.get_layer("block3_dwconv").get_weights()[0]
    np.testing.assert_allclose(dw, state["_blocks.3._depthwise_conv.weight"].transpose(2, 3, 0, 1), rtol=1e-6)
    conv = model.get_layer("block3_expand_conv").get_weights()[0]
    np.testing.assert_allclose(conv, state["_blocks.3._expand_conv.weight"].transpose(2, 3, 1, 0), rtol=1e-6)
    gamma, beta, mean, var = model.get_layer("block3_dw_bn").get_weights()
    np.testing.assert_allclose(mean, state["_blocks.3._bn1.running_mean"], rtol=1e-6)
    np.testing.assert_allclose(model.get_layer("predictions").get_weights()[0], state["_fc.weight"].T, rtol=1e-6)

    with pytest.raises(ValueError, match="unused"):
        load_pth_into_model(model, {**state, "_blocks.16._bn0.weight": np.zeros(3)})
    missing = dict(state)
    del missing["_blocks.0._bn2.running_var"]
    with pytest.raises(KeyError, match="running_var"):
        load_pth_into_model(model, missing)
    wrong = {**state, "_conv_head.weight": np.zeros((1280, 320, 3, 3))}
    with pytest.raises(ValueError, match="head_conv"):
        load_pth_into_model(model, wrong)


def test_weights_path_follows_keras_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    expected = tmp_path / "models" / "efficientnet_lite0_579344248a93.weights.h5"
    assert lite0_weights_path() == expected
    assert lite0_weights_path(tmp_path / "other") == tmp_path / "other" / "models" / expected.name
