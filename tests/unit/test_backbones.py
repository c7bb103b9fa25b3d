"""Backbone registry, preprocessing inside the model, and weights handling without any download."""

from __future__ import annotations

import dataclasses
import inspect

import keras
import numpy as np
import pytest

from steeldefect import cli
from steeldefect.models import backbones
from tiny import write_hdf5


@pytest.fixture()
def empty_keras_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    return tmp_path / "keras"


def test_all_means_the_reference_three_plus_lite0():
    assert backbones.resolve_backbones(["all"]) == ["mobilenet", "efficientnetb0", "vgg16", "efficientnet_lite0"]
    assert backbones.resolve_backbones(["vgg16", "all"])[0] == "vgg16"
    with pytest.raises(ValueError, match="unknown backbone 'resnet'"):
        backbones.resolve_backbones(["resnet"])


@pytest.mark.parametrize("name", backbones.REFERENCE_BACKBONES)
def test_missing_keras_weights_error_names_the_file_and_both_ways(name, empty_keras_home):
    with pytest.raises(backbones.WeightsMissingError) as error:
        backbones.build_backbone(name)
    message = str(error.value)
    filename = backbones.get_backbone(name).weights.filename
    assert str(empty_keras_home / "models" / filename) in message
    assert f"steeldefect weights download {name}" in message and "steeldefect weights install" in message
    assert "\n" not in message


@pytest.mark.parametrize("name", backbones.REFERENCE_BACKBONES)
def test_random_weights_only_when_asked_and_preprocessing_inside(name, empty_keras_home):
    model = backbones.build_backbone(name, weights="none", image_size=(64, 64))
    assert not model.trainable
    assert model.input_shape == (None, 64, 64, 3)
    reference = backbones.build_backbone(name, weights="none", preprocessing="reference", image_size=(64, 64))
    expected_first = {"mobilenet": "rescaling", "vgg16": "caffe_bgr_mean"}.get(name)
    if expected_first:
        assert model.layers[1].name.startswith(expected_first)
        assert not reference.layers[1].name.startswith(expected_first)
    else:  # EfficientNetB0 scales inside Keras' own model, so "reference" changes nothing for it.
        assert [type(layer) for layer in model.layers] == [type(layer) for layer in reference.layers]


def test_mobilenet_and_vgg_preprocessing_layers():
    model = backbones.build_backbone("mobilenet", weights="none", image_size=(32, 32))
    rescale = model.layers[1]
    assert isinstance(rescale, keras.layers.Rescaling)
    np.testing.assert_allclose(rescale(np.array([[0.0, 127.5, 255.0]])), [[-1.0, 0.0, 1.0]])
    caffe = backbones.caffe_preprocess_layer()
    out = np.asarray(caffe(np.array([[[[10.0, 20.0, 30.0]]]], np.float32)))
    np.testing.assert_allclose(out[0, 0, 0], [30 - 103.939, 20 - 116.779, 10 - 123.68], rtol=1e-6)


def test_hashes_are_the_ones_in_keras_source():
    sources = {
        "efficientnetb0": inspect.getsource(keras.src.applications.efficientnet),
        "vgg16": inspect.getsource(keras.src.applications.vgg16),
    }
    for name, source in sources.items():
        assert backbones.get_backbone(name).weights.keras_hash in source
    mobilenet_source = inspect.getsource(keras.src.applications.mobilenet)
    assert backbones.get_backbone("mobilenet").weights.filename.replace("1_0_224", "%s_%d") in mobilenet_source


def test_download_urls_are_the_ones_keras_fetches():
    apps = keras.src.applications
    url = {name: backbones.get_backbone(name).weights.url() for name in backbones.REFERENCE_BACKBONES}
    assert url["mobilenet"] == apps.mobilenet.BASE_WEIGHT_PATH + "mobilenet_1_0_224_tf_no_top.h5"
    assert url["efficientnetb0"] == apps.efficientnet.BASE_WEIGHTS_PATH + "efficientnetb0_notop.h5"
    assert url["vgg16"] == apps.vgg16.WEIGHTS_PATH_NO_TOP
    assert backbones.get_backbone("efficientnetb0").weights.keras_hash == apps.efficientnet.WEIGHTS_HASHES["b0"][1]


def test_install_refuses_a_corrupt_file_and_status_reports(tmp_path, empty_keras_home, capsys):
    folder = tmp_path / "provision"
    folder.mkdir()
    (folder / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"0" * 100)
    outcomes = dict(backbones.install_weights(folder))
    assert outcomes["vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"].startswith("refused")
    assert outcomes["mobilenet_1_0_224_tf_no_top.h5"] == "not found in folder"
    assert not (empty_keras_home / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5").exists()
    assert cli.main(["weights", "install", str(folder)]) == 1
    assert cli.main(["weights", "status"]) == 1  # three reference backbones missing
    out = capsys.readouterr().out
    assert "mobilenet" in out and "missing" in out and "efficientnet_lite0" in out


def patch_mobilenet_size(monkeypatch, size):
    """MobileNet's registry entry with ``size`` bytes (no pinned hash, as in Keras), for small test files."""
    spec = backbones.get_backbone("mobilenet")
    patched = dataclasses.replace(spec.weights, size=size)
    monkeypatch.setitem(backbones.REGISTRY, "mobilenet", dataclasses.replace(spec, weights=patched))
    return patched


def test_install_copies_a_valid_file(tmp_path, monkeypatch, empty_keras_home):
    source = write_hdf5(tmp_path / "provision" / "nested" / "mobilenet_1_0_224_tf_no_top.h5")
    payload = source.read_bytes()
    patched = patch_mobilenet_size(monkeypatch, len(payload))
    outcomes = dict(backbones.install_weights(tmp_path / "provision"))
    assert outcomes[patched.filename].startswith("installed to")
    assert (empty_keras_home / "models" / patched.filename).read_bytes() == payload
    assert dict(backbones.install_weights(tmp_path / "provision"))[patched.filename] == "already installed"
    status = {row.backbone: row.state for row in backbones.weights_status()}
    assert status["mobilenet"] == "present" and status["vgg16"] == "missing"
