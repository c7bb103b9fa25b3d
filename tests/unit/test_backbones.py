"""Backbone registry, preprocessing inside the model, and weights handling without any download."""

from __future__ import annotations

import inspect

import keras
import numpy as np
import pytest

from steeldefect import backbones, cli


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
    filename = backbones.get_backbone(name).weight_file.filename
    assert str(empty_keras_home / "models" / filename) in message
    assert "weights='imagenet'" in message and "steeldefect weights install" in message
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
        assert backbones.get_backbone(name).weight_file.keras_hash in source
    mobilenet_source = inspect.getsource(keras.src.applications.mobilenet)
    assert backbones.get_backbone("mobilenet").weight_file.filename.replace("1_0_224", "%s_%d") in mobilenet_source


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


def test_install_copies_a_valid_file(tmp_path, monkeypatch, empty_keras_home):
    payload = b"\x89HDF\r\n\x1a\n" + b"x" * 56
    spec = backbones.get_backbone("mobilenet")
    patched = backbones.WeightFile(spec.weight_file.filename, spec.weight_file.url, len(payload), None)
    monkeypatch.setitem(
        backbones.REGISTRY, "mobilenet",
        backbones.BackboneSpec(spec.name, spec.display_name, spec.feature_shape, patched, spec._build, spec.weights_source),
    )
    folder = tmp_path / "provision" / "nested"
    folder.mkdir(parents=True)
    (folder / patched.filename).write_bytes(payload)
    outcomes = dict(backbones.install_weights(tmp_path / "provision"))
    assert outcomes[patched.filename].startswith("installed to")
    assert (empty_keras_home / "models" / patched.filename).read_bytes() == payload
    assert dict(backbones.install_weights(tmp_path / "provision"))[patched.filename] == "already installed"
    status = {row.backbone: row.state for row in backbones.weights_status()}
    assert status["mobilenet"] == "present" and status["vgg16"] == "missing"
