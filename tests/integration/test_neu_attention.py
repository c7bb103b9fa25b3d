"""An attention head taught by the real NEU-DET boxes, with the real Lite0 weights, on a NEU subset.

The README's pointing-game figure comes from the full data (bench/pointing_game.py on
runs/neu-attention); this checks on 100 images per class that `train --head attention --boxes`
runs end to end on real images and that its heatmaps land on the defect boxes of test images far
more often than a random point does.
"""

from __future__ import annotations

import numpy as np
import pytest

from steeldefect import annotations, cli, explain, pipeline

pytestmark = pytest.mark.integration

PER_CLASS = 100


def test_attention_head_points_at_real_defect_boxes(neu_dir, neu_images, tmp_path, monkeypatch):
    import keras
    import tensorflow as tf

    from conftest import link_neu_subset

    monkeypatch.setenv("STEELDEFECT_CACHE", str(tmp_path / "cache"))
    data = link_neu_subset(neu_images, tmp_path / "neu100", PER_CLASS)
    boxes = neu_dir / "ANNOTATIONS"
    run = tmp_path / "run"
    args = ["--quiet", "train", "--data", str(data), "--out", str(run), "--head", "attention", "--boxes", str(boxes)]
    assert cli.main([*args, "--folds", "2", "--learning-rates", "0.01"]) == 0

    prepared, _ = pipeline.load_run_data(run, progress=False)
    test = prepared.splits.test_indices
    rows, masks = [], []
    for i in test:  # the bench's protocol: boxes under half the image, 15 px tolerance, 200x200
        found = annotations.read_voc(annotations.annotation_path(boxes, prepared.dataset.paths[i]))
        if found.boxes and annotations.box_mask(found).mean() < 0.5:
            rows.append(i)
            masks.append(annotations.box_mask(found, 15))
    masks = np.stack(masks)
    model = keras.models.load_model(run / "deploy" / "model.keras")
    maps = explain.heatmaps(model, prepared.images[rows])
    small = np.asarray(tf.image.resize(maps[..., None], (200, 200), method="bilinear"))[..., 0]
    peaks = small.reshape(len(rows), -1).argmax(axis=1)
    hits = masks.reshape(len(rows), -1)[np.arange(len(rows)), peaks]
    random_point = masks.reshape(len(rows), -1).mean()
    assert len(rows) >= 40
    assert hits.mean() >= 0.8 and hits.mean() >= random_point + 0.25, (hits.mean(), random_point)
    # The classifier itself stays accurate on the same test images.
    predicted = np.asarray(model.predict(prepared.images[test].astype(np.float32), verbose=0)).argmax(1)
    assert (predicted == prepared.dataset.labels[test]).mean() >= 0.95
