"""An attention head taught by the real NEU-DET boxes, with the real Lite0 weights, on a NEU subset.

The README's pointing-game figure comes from the full data (bench/pointing_game.py on
runs/neu-attention); this checks on 100 images per class that `train --head attention --boxes`
runs end to end on real images and that its heatmaps land on the defect boxes of test images far
more often than a random point does.
"""

from __future__ import annotations

import numpy as np
import pytest

from steeldefect import cli
from steeldefect.deploy import explain
from steeldefect.study import rundata

pytestmark = pytest.mark.integration

PER_CLASS = 100


def test_attention_head_points_at_real_defect_boxes(neu_dir, neu_images, tmp_path, monkeypatch, pg):
    import keras

    from conftest import link_neu_subset

    monkeypatch.setenv("STEELDEFECT_CACHE", str(tmp_path / "cache"))
    data = link_neu_subset(neu_images, tmp_path / "neu100", PER_CLASS)
    boxes = neu_dir / "ANNOTATIONS"
    run = tmp_path / "run"
    args = ["--quiet", "train", "--data", str(data), "--out", str(run), "--head", "attention", "--boxes", str(boxes)]
    assert cli.main([*args, "--folds", "2", "--learning-rates", "0.01"]) == 0

    prepared, _ = rundata.load_run_data(run, progress=False)
    test = prepared.splits.test_indices
    # The bench's protocol: boxes under half the image, 15 px tolerance, scored at 200x200.
    rows, masks = pg.filtered_rows(test, prepared.dataset, boxes)
    model = keras.models.load_model(run / "deploy" / "model.keras")
    hits = pg.hits(explain.heatmaps(model, prepared.images[rows]), masks)
    random_point = masks.reshape(len(rows), -1).mean()
    assert len(rows) >= 40
    assert hits.mean() >= 0.8 and hits.mean() >= random_point + 0.25, (hits.mean(), random_point)
    # The classifier itself stays accurate on the same test images.
    predicted = np.asarray(model.predict(prepared.images[test].astype(np.float32), verbose=0)).argmax(1)
    assert (predicted == prepared.dataset.labels[test]).mean() >= 0.95
