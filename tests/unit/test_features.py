"""The feature cache: computed once, keyed by everything that could change the numbers."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from steeldefect.core.cpuinfo import cpu_description
from steeldefect.models.features import cached_features, extract_features, feature_cache_key
from tiny import build_tiny


def tiny_model():
    inputs = keras.Input((8, 8, 3))
    return keras.Model(inputs, keras.layers.Conv2D(2, 3, strides=4, padding="same")(inputs))


KEY = dict(dataset_fingerprint="abc", backbone="tiny", weights_id="sha256:1", preprocessing="model")


def test_second_call_reads_the_cache_without_building_the_backbone(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    keras.utils.set_random_seed(0)
    first, path, hit = cached_features(tiny_model, images, cache_dir=tmp_path, progress=False, **KEY)
    assert not hit and path.is_file() and first.shape == (5, 2, 2, 2)

    def must_not_build():
        raise AssertionError("backbone built on a cache hit")

    second, _, hit = cached_features(must_not_build, images, cache_dir=tmp_path, progress=False, **KEY)
    assert hit
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize(
    "change",
    [{"dataset_fingerprint": "abd"}, {"backbone": "tiny2"}, {"weights_id": "sha256:2"}, {"preprocessing": "reference"}],
)
def test_every_ingredient_changes_the_key(change):
    base = feature_cache_key(image_size=(224, 224), **KEY)
    assert feature_cache_key(image_size=(224, 224), **{**KEY, **change}) != base
    assert feature_cache_key(image_size=(192, 192), **KEY) != base


def test_cpu_description_names_model_cores_and_int8_features():
    text = cpu_description()
    assert "cores" in text and "int8 features:" in text


def test_extracted_features_match_the_keras_backbone():
    """Features come from the converted LiteRT model; they must be the Keras backbone's outputs."""
    keras.utils.set_random_seed(1)
    model = build_tiny(None, True, (16, 16, 3))  # rescaling inside, two strided convolutions
    images = np.random.default_rng(2).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    features = extract_features(model, images, progress=False)
    expected = np.asarray(model.predict_on_batch(images.astype(np.float32)))
    assert features.shape == expected.shape == (4, 4, 4, 16) and features.dtype == np.float32
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)
    assert extract_features(model, images[:0], progress=False).shape == (0, 4, 4, 16)
