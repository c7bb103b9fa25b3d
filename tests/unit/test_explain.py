"""Heatmaps: they point at what drives the class, and they depend on the trained head."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from PIL import Image
from scipy.stats import spearmanr

from steeldefect import explain

SQUARE = (slice(3, 9), slice(21, 27))  # rows, columns: off the diagonal, so a transposed map fails


def _bright_square_model() -> keras.Model:
    """Raw pixels -> 4 hand-set detectors (channel 0: bright 3x3 patches; 1-3: dark ones) -> GAP ->
    softmax over (clean, defect), where only the bright detector speaks for "defect"."""
    inputs = keras.Input((32, 32, 3))
    conv = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="features")
    x = keras.layers.GlobalAveragePooling2D()(conv(inputs))
    dense = keras.layers.Dense(2, activation="softmax", name="probabilities")
    model = keras.Model(inputs, dense(x))
    kernel = np.zeros((3, 3, 3, 4), np.float32)
    kernel[..., 0] = 1 / 27
    kernel[..., 1:] = -1 / 27 * np.array([1.0, 0.7, 0.4])
    conv.set_weights([kernel, np.array([-200.0, 110.0, 80.0, 50.0], np.float32)])
    dense.set_weights(
        [np.array([[-1.0, 10.0], [0.005, 0.0], [0.005, 0.0], [0.005, 0.0]], np.float32), np.zeros(2, np.float32)]
    )
    return model


def _images(n: int = 6) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 120, (n, 32, 32, 3)).astype(np.uint8)
    images[:, SQUARE[0], SQUARE[1]] = 255
    return images


@pytest.mark.parametrize("method", explain.METHODS)
def test_heatmap_maximum_falls_on_the_bright_square(method):
    model = _bright_square_model()
    images = _images()
    assert (model.predict(images.astype(np.float32), verbose=0).argmax(1) == 1).all()
    maps = explain.grad_cam(model, images, layer="features", method=method)
    assert maps.shape == (len(images), 32, 32) and maps.min() >= 0 and maps.max() <= 1
    for heatmap in maps:
        row, col = np.unravel_index(heatmap.argmax(), heatmap.shape)
        assert SQUARE[0].start - 1 <= row < SQUARE[0].stop + 1 and SQUARE[1].start - 1 <= col < SQUARE[1].stop + 1
    # The softmax was bypassed only while computing: the model still outputs probabilities.
    assert np.allclose(model.predict(images[:1].astype(np.float32), verbose=0).sum(), 1.0)


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_randomising_the_head_changes_the_synthetic_maps():
    model = _bright_square_model()
    images = _images()
    trained = explain.grad_cam(model, images, class_index=1, layer="features")
    random = explain.grad_cam(explain.randomize_head(model, seed=3), images, class_index=1, layer="features")
    rhos = [spearmanr(a.ravel(), b.ravel()).statistic for a, b in zip(trained, random)]
    assert np.median(np.nan_to_num(rhos)) < 0.5  # a constant map (NaN correlation) has no ranks in common


def test_unknown_layer_or_method_is_one_clear_error():
    model = _bright_square_model()
    with pytest.raises(ValueError, match="no layer nope"):
        explain.grad_cam(model, _images(1), layer="nope")
    with pytest.raises(ValueError, match="method"):
        explain.grad_cam(model, _images(1), layer="features", method="magic")


def test_overlay_is_a_png_with_the_heatmap_drawn(tmp_path):
    image = _images(1)[0]
    heatmap = np.zeros((8, 8), np.float32)
    heatmap[1, 6] = 1.0
    path = explain.save_overlay(image, heatmap, "defect 0.97", tmp_path / "overlay.png")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.width > 200
        pixels = np.asarray(png.convert("RGB"))
    assert pixels.std() > 10  # not a blank canvas


@pytest.mark.integration
def test_randomising_the_head_of_a_real_neu_model_changes_its_maps(neu_dir, pooled_neu_run):
    from steeldefect.data import read_image

    # The run's model to deploy (trained on all its training images), on NEU images it never saw.
    model = keras.models.load_model(pooled_neu_run / "deploy" / "model.keras")
    classes = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
    paths = [neu_dir / "IMAGES" / f"{name}_{i}.jpg" for name in classes for i in range(291, 296)]
    images = np.stack([read_image(p) for p in paths])
    trained = explain.grad_cam(model, images)
    random = explain.grad_cam(explain.randomize_head(model), images)
    rho = np.median([spearmanr(a.ravel(), b.ravel()).statistic for a, b in zip(trained, random)])
    assert rho < 0.5


def test_annotation_xml_files_are_not_images(tmp_path, make_neu_dataset):
    from steeldefect.data import scan_dataset

    root = make_neu_dataset(tmp_path / "NEU-DET")
    images = root / "IMAGES" if (root / "IMAGES").is_dir() else root
    count = len(scan_dataset(root))
    annotations = root / "ANNOTATIONS"
    annotations.mkdir(exist_ok=True)
    for path in sorted(images.glob("*.jpg")):
        (annotations / (path.stem + ".xml")).write_text("<annotation><object/></annotation>")
    assert len(scan_dataset(root)) == count
