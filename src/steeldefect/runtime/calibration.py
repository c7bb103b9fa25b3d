"""Calibrated confidence: temperature scaling fitted on held-out logits, its negative log-likelihood,
the expected calibration error and the reliability diagram. The out-of-distribution score and the
deployed rule that use it are in :mod:`steeldefect.runtime.uncertainty`."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ECE_BINS = 15


def _log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    # log p equals the logits up to a per-row constant, which softmax ignores.
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, None))


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): T > 1 softens over-confident probabilities; the ranking never changes."""
    z = _log_probabilities(probabilities) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    labels = np.asarray(labels, dtype=np.int64)
    return float(-_log_probabilities(probabilities)[np.arange(len(labels)), labels].mean())


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE: over ``n_bins`` equal-width confidence bins (0, 1/n], ..., the sample-weighted mean of
    |accuracy - mean confidence| of the top-1 prediction."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    # Right-closed bins, as in Guo et al. 2017: confidence 1.0 falls into the last bin.
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        members = bins == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the NLL of ``labels`` (searched on log T in [1/100, 100])."""
    from scipy.optimize import minimize_scalar

    logp = _log_probabilities(probabilities)
    labels = np.asarray(labels, dtype=np.int64)

    def nll(log_t: float) -> float:
        z = logp / np.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        return float(-(z[np.arange(len(labels)), labels] - np.log(np.exp(z).sum(axis=1))).mean())

    result = minimize_scalar(nll, bounds=(np.log(0.01), np.log(100.0)), method="bounded")
    return float(np.exp(result.x))


def fit_calibration(
    val_probabilities: np.ndarray,
    val_labels: np.ndarray,
    *,
    val_indices: Sequence[int] | np.ndarray | None = None,
    test_indices: Sequence[int] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Temperature from validation predictions; returns {temperature, nll/ece before and after, n}.

    Pass the dataset indices of the validation rows and of the test split to have it checked that no
    test image is used (raises ValueError otherwise).
    """
    if val_indices is not None and test_indices is not None:
        shared = np.intersect1d(np.asarray(val_indices), np.asarray(test_indices))
        if len(shared):
            raise ValueError(f"calibration must not see test images; {len(shared)} validation rows are test images")
    temperature = fit_temperature(val_probabilities, val_labels)
    calibrated = apply_temperature(val_probabilities, temperature)
    return {
        "temperature": temperature,
        "n": len(val_labels),
        "nll_before": negative_log_likelihood(val_probabilities, val_labels),
        "nll_after": negative_log_likelihood(calibrated, val_labels),
        "ece_before": expected_calibration_error(val_probabilities, val_labels),
        "ece_after": expected_calibration_error(calibrated, val_labels),
    }


def reliability_diagram(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, *, n_bins: int = ECE_BINS, title: str = ""
) -> Path:
    """PNG: accuracy against confidence per bin for each named (probabilities, labels), with its ECE."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from steeldefect.core.files import atomic_write_bytes

    fig = Figure(figsize=(5.2, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    edges = np.linspace(0, 1, n_bins + 1)
    for name, (probabilities, labels) in curves.items():
        confidence = probabilities.max(axis=1)
        correct = probabilities.argmax(axis=1) == labels
        bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
        xs, ys, ns = [], [], []
        for b in range(n_bins):
            if (bins == b).any():
                xs.append(confidence[bins == b].mean())
                ys.append(correct[bins == b].mean())
                ns.append(int((bins == b).sum()))
        ece = expected_calibration_error(probabilities, labels, n_bins)
        (line,) = ax.plot(xs, ys, marker="o", label=f"{name} (ECE {100 * ece:.2f}%)")
        # How many answers each point stands for: at high accuracy nearly all sit in the top bin, and
        # a point made of two images should not read like one made of two thousand.
        for x, y, n in zip(xs, ys, ns):
            ax.annotate(
                f"n={n}", (x, y), textcoords="offset points", xytext=(-4, -12), fontsize=7, color=line.get_color()
            )
    ax.set_xticks(edges[::3])
    ax.set(
        xlim=(0, 1.02),
        ylim=(0, 1.02),
        xlabel="confidence (top-1 probability)",
        ylabel="accuracy",
        title=title or f"Reliability diagram ({n_bins} bins)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return atomic_write_bytes(path, buffer.getvalue())
