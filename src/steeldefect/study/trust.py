"""The trust stage of `train`: calibrated confidence for a backbone's models.

After the grid, every training image is scored by the fold head that did not train on it (out of
fold); a temperature is fitted on those predictions (never on test images), and the test split's
expected calibration error is measured before and after, with a reliability diagram. The
out-of-fold probabilities are kept: `export` fits the deploy model's uncertainty rule on them
(:func:`steeldefect.runtime.uncertainty.fit_rule`), so the rule's thresholds come from images the heads did
not see either.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from steeldefect.core import runfolder
from steeldefect.core.files import save_npz, write_json
from steeldefect.models import training
from steeldefect.runtime import calibration

log = logging.getLogger(__name__)


def calibrate(
    run: Path,
    backbone: str,
    heads: Sequence[Any],
    features: np.ndarray,
    labels: np.ndarray,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    test_indices: np.ndarray,
) -> dict[str, Any]:
    """Fit the temperature on the out-of-fold predictions of ``heads`` (fold k's head on fold k's
    validation images), measure test ECE before/after over the fold models, write the record, the
    out-of-fold probabilities and the reliability diagram. Returns the record."""
    indices, oof = training.out_of_fold_probabilities(heads, features, folds)
    record = calibration.fit_calibration(oof, labels[indices], val_indices=indices, test_indices=test_indices)
    temperature = record["temperature"]
    test_labels = labels[test_indices]
    test_probabilities = [training.predict_proba(head, features[test_indices]) for head in heads]
    calibrated = [calibration.apply_temperature(p, temperature) for p in test_probabilities]
    ece = calibration.expected_calibration_error
    nll = calibration.negative_log_likelihood
    record = {
        "temperature": temperature,
        "fitted_on": f"out-of-fold validation predictions of the grid ({len(indices)} training images)",
        "validation": {k: v for k, v in record.items() if k != "temperature"},
        "test": {
            "images": int(len(test_indices)),
            "ece_before": float(np.mean([ece(p, test_labels) for p in test_probabilities])),
            "ece_after": float(np.mean([ece(p, test_labels) for p in calibrated])),
            "nll_before": float(np.mean([nll(p, test_labels) for p in test_probabilities])),
            "nll_after": float(np.mean([nll(p, test_labels) for p in calibrated])),
            "over": f"mean of the {len(heads)} fold models",
        },
        "ece_bins": calibration.ECE_BINS,
    }
    save_npz(runfolder.oof_probabilities_path(run, backbone), indices=indices, probabilities=oof)
    write_json(runfolder.calibration_record_path(run, backbone), record)
    calibration.reliability_diagram(
        {
            "as trained": (np.concatenate(test_probabilities), np.tile(test_labels, len(heads))),
            f"temperature {temperature:.2f}": (np.concatenate(calibrated), np.tile(test_labels, len(heads))),
        },
        runfolder.reliability_plot_path(run, backbone),
        title=f"{backbone}: test split, {len(heads)} fold models",
    )
    log.info(
        "%s: temperature %.2f (out of fold); test ECE %.2f%% -> %.2f%%",
        backbone,
        temperature,
        100 * record["test"]["ece_before"],
        100 * record["test"]["ece_after"],
    )
    return record


def read_oof_probabilities(run: Path, backbone: str, n_images: int) -> np.ndarray | None:
    """The out-of-fold probabilities as an (n_images, n_classes) array indexed like the dataset (NaN
    for rows no fold validated: the test split), or None when `train` did not record them."""
    path = runfolder.oof_probabilities_path(run, backbone)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as archive:
        indices, probabilities = archive["indices"], archive["probabilities"]
    full = np.full((n_images, probabilities.shape[1]), np.nan)
    full[indices] = probabilities
    return full
