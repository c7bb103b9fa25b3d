"""Heatmaps taught by defect boxes: Pascal VOC boxes -> cell masks, the attention head and its box loss,
its heatmap, the option refusals, and `train --head attention --boxes` end to end on the tiny backbone
(the NEU pointing-game figure is the README's, from bench/pointing_game.py)."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from steeldefect import cli
from steeldefect.core.options import TrainOptions
from steeldefect.data import annotations
from steeldefect.deploy import explain
from steeldefect.models import training
from steeldefect.study import pipeline, rundata
from tiny import CLASSES, FAST_TRAIN, TINY


def write_voc(path: Path, boxes, size=(200, 200)) -> Path:
    objects = "".join(
        f"<object><name>defect</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
        f"<ymax>{y1}</ymax></bndbox></object>"
        for x0, y0, x1, y1 in boxes
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height><depth>1</depth></size>"
        f"{objects}</annotation>"
    )
    return path


def test_voc_boxes_become_the_covered_fraction_of_each_cell(tmp_path):
    # The left half of a 200x200 image, rows 1..100 of it: on a 4x4 grid the top-left 2x2 cells.
    path = write_voc(tmp_path / "a.xml", [(1, 1, 100, 100)])
    boxes = annotations.read_voc(path)
    assert (boxes.width, boxes.height, boxes.boxes) == (200, 200, ((1.0, 1.0, 100.0, 100.0),))
    expected = np.zeros((4, 4), np.float32)
    expected[:2, :2] = 1
    np.testing.assert_allclose(annotations.cell_coverage(boxes, (4, 4)), expected)
    # Half a cell: x 1..25 of a 200-wide image is half of the first 50-px column.
    half = annotations.cell_coverage(annotations.read_voc(write_voc(tmp_path / "b.xml", [(1, 1, 25, 200)])), (4, 4))
    np.testing.assert_allclose(half[:, 0], 0.5, atol=0.04)
    assert half[:, 1:].max() == 0
    assert annotations.box_mask(boxes).sum() == 100 * 100


def test_images_without_annotation_get_an_empty_mask_and_bad_files_name_themselves(tmp_path):
    write_voc(tmp_path / "boxes" / "a.xml", [(1, 1, 200, 200)])
    masks = annotations.cell_masks(tmp_path / "boxes", ["x/a.jpg", "x/b.jpg"], (2, 2))
    np.testing.assert_allclose(masks, [[1, 1, 1, 1], [0, 0, 0, 0]])
    (tmp_path / "boxes" / "c.xml").write_text("<annotation><size>")
    with pytest.raises(annotations.AnnotationError, match=r"c\.xml: not a readable Pascal VOC file"):
        annotations.cell_masks(tmp_path / "boxes", ["c.jpg"], (2, 2))
    write_voc(tmp_path / "boxes" / "d.xml", [(1, 1, 250, 20)])
    with pytest.raises(annotations.AnnotationError, match=r"d\.xml: box \(1, 1, 250, 20\) lies outside 200x200"):
        annotations.read_voc(tmp_path / "boxes" / "d.xml")
    with pytest.raises(annotations.AnnotationError, match="nope: box folder not found"):
        annotations.cell_masks(tmp_path / "nope", ["a.jpg"], (2, 2))


def _located_features(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, 4, 4, 8) maps in which the class shows in EVERY cell, and one random cell per image, the
    boxed one, also stands out in channel 1: the class alone gives the head no reason to look there,
    only the box loss does."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    features = rng.normal(0, 1, (n, 4, 4, 8)).astype(np.float32)
    features[..., 0] += np.where(labels == 1, 2.0, -2.0)[:, None, None]
    boxed = rng.integers(0, 16, n)
    features.reshape(n, 16, 8)[np.arange(n), boxed, 1] += 4.0
    masks = np.zeros((n, 16), np.float32)
    masks[np.arange(n), boxed] = 1
    return features, labels, masks


def test_the_box_loss_teaches_the_attention_where_the_boxes_are():
    features, labels, masks = _located_features(256)
    trainer = training.HeadTrainer((4, 4, 8), 2, kind="attention", batch_size=32)
    head, history = trainer.fit(features, labels, learning_rate=0.01, epochs=30, seed=1, masks=masks)
    probabilities, attention = keras.Model(head.inputs, [head.output, head.get_layer("attention").output])(features)
    assert (np.asarray(probabilities).argmax(1) == labels).mean() > 0.95
    assert (np.asarray(attention).argmax(1) == masks.argmax(1)).mean() > 0.85
    # Without boxes (all-zero masks) the same head has no reason to prefer the marked cell.
    head, _ = trainer.fit(features, labels, learning_rate=0.01, epochs=30, seed=1, masks=np.zeros_like(masks))
    attention = np.asarray(keras.Model(head.inputs, head.get_layer("attention").output)(features))
    assert (attention.argmax(1) == masks.argmax(1)).mean() < 0.3
    with pytest.raises(ValueError, match="one box mask per training image"):
        trainer.fit(features, labels, learning_rate=0.01, epochs=1)


def test_attention_heatmap_is_the_heads_own_cell_weights():
    features, labels, masks = _located_features(64)
    head = training.build_head((4, 4, 8), 2, kind="attention")
    inputs = keras.Input((4, 4, 8))  # an identity "backbone", so the features are the model's input
    model = training.join_model(keras.Model(inputs, keras.layers.Activation("linear")(inputs)), head, name="m")
    assert explain.default_method(model) == "attention"
    weights = np.asarray(keras.Model(head.inputs, head.get_layer("attention").output)(features[:5]))
    raw = explain.heatmaps(model, features[:5], smoothing=0)
    assert raw.shape == (5, 4, 4)  # upsampled to the input size, here the 4x4 map itself
    np.testing.assert_array_equal(raw.reshape(5, 16).argmax(1), weights.argmax(1))
    # The default is the density of those same weights (one cell = one pixel here).
    assert explain.attention_grid(model) == (4, 4)
    density = explain.smooth(raw, explain.ATTENTION_SMOOTHING)
    np.testing.assert_allclose(explain.heatmaps(model, features[:5]), density, atol=1e-6)
    np.testing.assert_allclose(explain.density(raw, explain.ATTENTION_SMOOTHING, (4, 4)), density, atol=1e-6)
    assert explain.default_method(keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))) == (
        explain.DEFAULT_METHOD
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(head="attention"), "--head attention needs --boxes DIR"),
        (dict(boxes=Path("b")), "--boxes teaches an attention head where to look; it needs --head attention"),
        (dict(head="attention", boxes=Path("b"), features="multilayer"), "--head attention needs --features maps"),
        (dict(head="attention", boxes=Path("b"), augment=2), "does not go with --augment or --fine-tune"),
    ],
)
def test_attention_option_combinations_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        TrainOptions(**options)


def _tiny_boxes(data: Path, folder: Path) -> Path:
    """A box on the left half of every generated 40x40 image."""
    for image in sorted(data.rglob("*.png")):
        write_voc(folder / (image.stem + ".xml"), [(1, 1, 20, 40)], size=(40, 40))
    return folder


def test_train_attention_head_end_to_end(tiny_env, tmp_path, capsys, monkeypatch):
    boxes = _tiny_boxes(tiny_env, tmp_path / "boxes")
    read = []
    real_cell_masks = annotations.cell_masks

    def spy(folder, images, grid):
        read.extend(Path(image).name for image in images)
        return real_cell_masks(folder, images, grid)

    monkeypatch.setattr(annotations, "cell_masks", spy)
    run = tmp_path / "run"
    options = FAST_TRAIN | dict(epochs=20, learning_rates=[0.01])
    summary = pipeline.train(tiny_env, run, backbones=[TINY], head="attention", boxes=boxes, **options)
    assert summary["backbones"][TINY]["head"] == "attention"
    # Only training images' boxes were read: the test images' boxes are for measuring heatmaps.
    prepared, _ = rundata.load_run_data(run, progress=False)
    test_files = {prepared.dataset.paths[i].name for i in prepared.splits.test_indices}
    assert read and len(read) == len(prepared.splits.train_indices) and not test_files & set(read)
    model = keras.models.load_model(run / "deploy" / "model.keras")
    images = prepared.images[prepared.splits.test_indices]
    # Trained on boxes over the left half: the attention weights peak there on the test images. (Read
    # as weights, not as the default density: on the tiny backbone's 4x4 grid every cell but the
    # middle four is a border cell, and the density's zero padding pulls a border mark inwards.)
    maps = explain.heatmaps(model, images, smoothing=0)
    peaks = maps.reshape(len(maps), -1).argmax(1) % maps.shape[2]
    assert (peaks < maps.shape[2] // 2).mean() >= 0.8
    # Exported like any run: int8 answers as the .keras model does on most test images.
    pipeline.export(run, variants=["int8"], calibration_samples=12, quant_report=False, progress=False)
    from steeldefect.core import runfolder
    from steeldefect.runtime.modelfile import Classifier

    expected = np.asarray(model.predict(images.astype(np.float32), verbose=0))
    got = Classifier(runfolder.deploy_model_path(run, "int8"), threads=1).probabilities(images)
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.8
    from steeldefect.core.files import read_json
    from steeldefect.study.report import write_report

    assert read_json(runfolder.gallery_record_path(run, TINY))["method"] == "attention"
    text = Path(write_report(run)).read_text()
    assert "attention taught by the training images' boxes in boxes/" in text
    assert "Heatmaps: the attention head's own weights over the feature-map cells" in text
    assert f"as a density (Gaussian sigma {explain.ATTENTION_SMOOTHING:g} cell)" in text
    # `predict --explain` uses the attention maps and says so.
    image = next(tiny_env.rglob(f"{CLASSES[0]}_0.png"))
    assert cli.main(["--quiet", "predict", str(run), str(image), "--explain", str(tmp_path / "maps")]) == 0
    assert "(attention on" in capsys.readouterr().err
    assert len(list((tmp_path / "maps").glob("*.png"))) == 1


def test_cli_names_a_broken_box_file_in_one_line(tiny_env, tmp_path, capsys):
    boxes = _tiny_boxes(tiny_env, tmp_path / "boxes")
    broken = sorted(boxes.glob("*.xml"))[0]
    broken.write_text("<annotation>")
    args = ["--quiet", "train", "--data", str(tiny_env), "--out", str(tmp_path / "run"), "--backbone", TINY]
    args += ["--head", "attention", "--boxes", str(boxes), "--image-size", "32", "--epochs", "1", "--folds", "2"]
    assert cli.main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {broken}: not a readable Pascal VOC file") and "\n" not in error


def test_attention_density_peaks_where_the_weight_is_concentrated():
    """A lone border cell with the single highest weight against three neighbouring cells that hold
    more weight together: the upsampled weights point at the border cell, the density at the group."""
    cells = np.full((7, 7), 0.01, np.float32)
    cells[6, 0] = 0.20  # bottom-left corner
    cells[2, 3] = cells[2, 4] = cells[3, 3] = 0.15
    upsampled = np.kron(cells, np.ones((32, 32), np.float32))[None]
    assert explain.peak(upsampled[0])[0] >= 6 * 32  # the corner
    row, col = explain.peak(explain.smooth(upsampled, 0.5 * 32)[0])
    assert 2 * 32 <= row < 4 * 32 and 3 * 32 <= col < 5 * 32
    # Nothing outside the image: a uniform map's density is highest in the middle, and in [0, 1].
    flat = explain.smooth(np.ones((1, 64, 64), np.float32), 8.0)[0]
    assert flat.max() == 1.0 and flat.min() == 0.0 and explain.peak(flat) in {(31, 31), (31, 32), (32, 31), (32, 32)}
