"""The drift monitor (serve/drift.py) on seeded streams: silent in distribution, an alarm within the
window when the line changes, one start and one clear, and the reference read from model metadata."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from steeldefect.serve.drift import DriftMonitor, DriftReference, population_stability_index

NAMES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
EVEN = DriftReference({name: 1 / 6 for name in NAMES}, 0.02)


def feed(monitor: DriftMonitor, rng, n: int, mix, uncertain_rate: float) -> list[tuple[int, str]]:
    changes = []
    for _ in range(n):
        change = monitor.observe(NAMES[rng.choice(len(NAMES), p=mix)], bool(rng.random() < uncertain_rate))
        if change:
            changes.append((monitor.seen, change))
    return changes


def test_in_distribution_stream_raises_no_alarm():
    monitor = DriftMonitor(NAMES, EVEN)
    assert feed(monitor, np.random.default_rng(0), 5000, np.full(6, 1 / 6), 0.02) == []
    status = monitor.status()
    assert status["alarm"] is False and status["images"] == 500 and status["class_mix"]["p_value"] > 1e-6


def test_a_stream_of_unseen_images_starts_the_alarm_within_the_window_and_it_clears_after(caplog):
    monitor = DriftMonitor(NAMES, EVEN)
    rng = np.random.default_rng(1)
    with caplog.at_level(logging.WARNING, logger="steeldefect.serve.drift"):
        assert feed(monitor, rng, 1000, np.full(6, 1 / 6), 0.02) == []
        # Unseen images: mostly answered as two classes, most of them flagged uncertain.
        changes = feed(monitor, rng, 500, [0.5, 0.0, 0.5, 0.0, 0.0, 0.0], 0.7)
        assert changes and changes[0][1] == "start" and changes[0][0] - 1000 <= 500
        assert monitor.status()["alarm"] is True
        back = feed(monitor, rng, 1500, np.full(6, 1 / 6), 0.02)
    assert [change for _, change in back] == ["clear"]
    lines = [r.getMessage() for r in caplog.records]
    assert (
        len(lines) == 2 and lines[0].startswith("drift alarm: started") and lines[1].startswith("drift alarm: cleared")
    )


def test_only_the_uncertain_share_rising_is_drift_too():
    monitor = DriftMonitor(NAMES, EVEN)
    changes = feed(monitor, np.random.default_rng(2), 600, np.full(6, 1 / 6), 0.15)
    assert changes and changes[0][1] == "start"
    assert monitor.status()["uncertain"]["p_value"] < 1e-6


def test_reference_from_metadata_and_bad_fields_are_ignored(caplog):
    good = DriftReference.from_metadata(
        {"training_class_mix": {n: 2.0 for n in NAMES}, "expected_uncertain_rate": 0.01}, NAMES
    )
    assert good.class_mix == pytest.approx({n: 1 / 6 for n in NAMES}) and good.expected_uncertain_rate == 0.01
    bad = DriftReference.from_metadata({"training_class_mix": {"x": 1}, "expected_uncertain_rate": 3}, NAMES)
    assert bad == DriftReference(None, None)
    monitor = DriftMonitor(NAMES, bad)
    assert feed(monitor, np.random.default_rng(3), 600, [1, 0, 0, 0, 0, 0], 1.0) == []  # nothing to test against


def test_psi_is_zero_for_equal_mixes_and_grows_with_the_shift():
    even = np.full(6, 1 / 6)
    assert population_stability_index(even, even) == 0
    assert population_stability_index([0.5, 0.5, 0, 0, 0, 0], even) > 1


def test_fast_tests_give_scipys_chisquare_and_binomtest_p_values():
    from scipy import stats

    from steeldefect.serve.drift import binomial_greater_p, chi_square_test

    counts = np.array([80, 95, 70, 90, 85, 80])
    statistic, p = chi_square_test(counts, np.full(6, 1 / 6))
    reference = stats.chisquare(counts, np.full(6, counts.sum() / 6))
    assert statistic == pytest.approx(reference.statistic) and p == pytest.approx(reference.pvalue)
    for k in (0, 3, 12, 40):
        assert binomial_greater_p(k, 500, 0.02) == pytest.approx(
            stats.binomtest(k, 500, 0.02, alternative="greater").pvalue, rel=1e-9
        )
