"""Drift alarms: is the line still showing the service the images its model was trained on?

The deploy model carries its training class mix (``training_class_mix``) and the share of
out-of-fold training images its uncertainty rule flags at its acceptance (``expected_uncertain_rate``),
both written at export (deploy/export.py). The monitor keeps the last ``window`` answers (default
500) and tests them against both:

- the class mix with Pearson's chi-square goodness-of-fit test of the window's top-1 counts against
  ``window * training_class_mix`` (the population-stability index of the same two mixes is reported
  beside it, as dashboards often show it);
- the uncertain share with a one-sided exact binomial test (the p-value of ``scipy.stats.binomtest``
  with ``alternative="greater"``) of the window's uncertain count against ``expected_uncertain_rate``.

The alarm starts when either p-value falls below ``alarm_p`` (default 1e-6) once the window holds at
least ``min_images`` (default 100) answers, and clears when both are back above ``clear_p`` (default
1e-3): the gap keeps a window sitting near the threshold from starting and clearing it on alternate
images. The thresholds are strict because the test runs on every answer over a sliding window (thousands
of correlated tests a day); bench/drift.py counts the false alarms they give on in-distribution NEU.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 500
DEFAULT_MIN_IMAGES = 100
DEFAULT_ALARM_P = 1e-6
DEFAULT_CLEAR_P = 1e-3
_PSI_FLOOR = 1e-4  # a share of 0 would make the PSI infinite: the usual small floor instead


@dataclass(frozen=True)
class DriftReference:
    """What a model says the line should look like (read from its metadata; either part may be missing)."""

    class_mix: dict[str, float] | None
    expected_uncertain_rate: float | None

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], class_names: Sequence[str]) -> DriftReference:
        """The reference in a model's metadata; a malformed field is ignored (logged), never fatal."""
        mix = metadata.get("training_class_mix")
        rate = metadata.get("expected_uncertain_rate")
        if mix is not None:
            valid = (
                isinstance(mix, dict)
                and set(mix) == set(class_names)
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in mix.values())
                and sum(mix.values()) > 0
            )
            if not valid:
                log.warning("model metadata: training_class_mix does not match the class names; no class-mix test")
                mix = None
            else:
                total = float(sum(mix.values()))
                mix = {name: float(mix[name]) / total for name in class_names}
        if rate is not None and not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0 <= rate < 1):
            log.warning("model metadata: expected_uncertain_rate is not a share in [0, 1); no uncertain-share test")
            rate = None
        return cls(mix, None if rate is None else float(rate))


def population_stability_index(observed: np.ndarray, expected: np.ndarray) -> float:
    """PSI of two share vectors: sum((o - e) * ln(o / e)), shares floored at 1e-4."""
    o = np.maximum(np.asarray(observed, dtype=np.float64), _PSI_FLOOR)
    e = np.maximum(np.asarray(expected, dtype=np.float64), _PSI_FLOOR)
    return float(np.sum((o - e) * np.log(o / e)))


def chi_square_test(counts: np.ndarray, shares: np.ndarray) -> tuple[float, float]:
    """Pearson's chi-square statistic and p-value of ``counts`` against the expected ``shares``: the
    value ``scipy.stats.chisquare`` gives, through the chi-square survival function directly (the
    test runs on every answer, and ``chisquare``'s checks cost milliseconds each)."""
    from scipy import special

    counts = np.asarray(counts, dtype=np.float64)
    expected = counts.sum() * np.asarray(shares, dtype=np.float64) / np.sum(shares)
    statistic = float(np.sum((counts - expected) ** 2 / expected))
    return statistic, float(special.chdtrc(len(counts) - 1, statistic))


def binomial_greater_p(successes: int, trials: int, rate: float) -> float:
    """The one-sided exact binomial test's p-value, P(X >= successes) for X ~ Binomial(trials, rate):
    ``scipy.stats.binomtest(..., alternative="greater").pvalue``, computed by ``scipy.special.bdtrc``."""
    from scipy import special

    if successes <= 0:
        return 1.0
    return float(special.bdtrc(successes - 1, trials, rate))


class DriftMonitor:
    """A rolling window of answers (top-1 class, uncertain flag) and the drift tests on it.

    Thread-safe; :meth:`observe` returns ``"start"`` or ``"clear"`` when the alarm changes (and logs
    one line), else None.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        reference: DriftReference,
        *,
        window: int = DEFAULT_WINDOW,
        min_images: int = DEFAULT_MIN_IMAGES,
        alarm_p: float = DEFAULT_ALARM_P,
        clear_p: float = DEFAULT_CLEAR_P,
    ) -> None:
        if window < 1 or not 1 <= min_images <= window:
            raise ValueError(f"drift window must be >= 1 and min images in [1, window], got {window}, {min_images}")
        if not 0 < alarm_p <= clear_p < 1:
            raise ValueError(f"drift thresholds need 0 < alarm_p <= clear_p < 1, got {alarm_p}, {clear_p}")
        self.class_names = tuple(class_names)
        self._index = {name: i for i, name in enumerate(self.class_names)}
        self.reference = reference
        self.window, self.min_images, self.alarm_p, self.clear_p = window, min_images, alarm_p, clear_p
        self._answers: collections.deque[tuple[int, bool | None]] = collections.deque(maxlen=window)
        self._counts = np.zeros(len(self.class_names), dtype=np.int64)
        self._uncertain = 0
        self._flagged = 0  # answers in the window with an uncertain flag (None when the model has no rule)
        self._lock = threading.Lock()
        self.alarm = False
        self.alarms_started = 0
        self.seen = 0
        self._last: dict[str, Any] = self._score()

    def observe(self, class_name: str, uncertain: bool | None) -> str | None:
        """Add one answer; re-test the window; say whether the alarm started or cleared."""
        index = self._index.get(class_name)
        if index is None:
            return None
        with self._lock:
            if len(self._answers) == self.window:
                old_index, old_uncertain = self._answers[0]
                self._counts[old_index] -= 1
                if old_uncertain is not None:
                    self._flagged -= 1
                    self._uncertain -= int(old_uncertain)
            self._answers.append((index, uncertain))
            self._counts[index] += 1
            if uncertain is not None:
                self._flagged += 1
                self._uncertain += int(uncertain)
            self.seen += 1
            self._last = score = self._score()
            change = None
            worst = score["worst_p"]
            if not self.alarm and worst is not None and worst < self.alarm_p:
                self.alarm, change = True, "start"
                self.alarms_started += 1
            elif self.alarm and (worst is None or worst > self.clear_p):
                self.alarm, change = False, "clear"
        if change == "start":
            log.warning(
                "drift alarm: started after %d answers (class-mix p %s, uncertain share %s vs %s expected, p %s)",
                self.seen,
                _p(score["class_mix"]["p_value"]),
                _share(score["uncertain"]["share"]),
                _share(score["uncertain"]["expected"]),
                _p(score["uncertain"]["p_value"]),
            )
        elif change == "clear":
            log.warning("drift alarm: cleared after %d answers", self.seen)
        return change

    def _score(self) -> dict[str, Any]:
        n = int(self._counts.sum())
        shares = self._counts / n if n else np.zeros(len(self.class_names))
        mix: dict[str, float | None] = {"p_value": None, "chi_square": None, "psi": None}
        if self.reference.class_mix is not None and n >= self.min_images:
            expected = np.array([self.reference.class_mix[name] for name in self.class_names])
            known = expected > 0  # a class the model never trained on cannot be tested by chi-square
            if np.any(self._counts[~known]):
                chi, p = math.inf, 0.0
            else:
                chi, p = chi_square_test(self._counts[known], expected[known])
            mix = {"p_value": p, "chi_square": chi, "psi": population_stability_index(shares, expected)}
        rate = self.reference.expected_uncertain_rate
        uncertain = {
            "share": self._uncertain / self._flagged if self._flagged else None,
            "expected": rate,
            "p_value": None,
        }
        if rate is not None and self._flagged >= self.min_images:
            if rate == 0:
                uncertain["p_value"] = 0.0 if self._uncertain else 1.0
            else:
                uncertain["p_value"] = binomial_greater_p(self._uncertain, self._flagged, rate)
        ps = [p for p in (mix["p_value"], uncertain["p_value"]) if p is not None]
        return {
            "images": n,
            "class_share": {name: float(s) for name, s in zip(self.class_names, shares)},
            "class_mix": mix,
            "uncertain": uncertain,
            "worst_p": min(ps) if ps else None,
        }

    def status(self) -> dict[str, Any]:
        """What ``GET /v1/drift`` answers: the window, both tests, the thresholds and the alarm."""
        with self._lock:
            score = dict(self._last)
            return {
                "alarm": self.alarm,
                "alarms_started": self.alarms_started,
                "answers_seen": self.seen,
                "window": self.window,
                "min_images": self.min_images,
                "alarm_p": self.alarm_p,
                "clear_p": self.clear_p,
                "training_class_mix": self.reference.class_mix,
                **score,
            }


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2g}"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def monitor_for(info: Any, accept: float | None = None, *, window: int = DEFAULT_WINDOW) -> DriftMonitor:
    """The drift monitor of one served model (a :class:`~steeldefect.runtime.modelfile.ModelInfo`).

    The expected uncertain rate is the model's ``expected_uncertain_rate``; when the service overrides
    the rule's acceptance (``serve --accept``), or the model predates the field, it is the share of the
    rule's out-of-fold reference scores above the threshold actually in use.
    """
    reference = DriftReference.from_metadata(info.metadata, info.class_names)
    rule = info.rule
    if rule is not None and (accept is not None or reference.expected_uncertain_rate is None):
        effective = rule.with_accept(accept) if accept is not None else rule
        rate = float(np.mean(effective.combined_reference > effective.threshold))
        reference = DriftReference(reference.class_mix, rate)
    elif rule is None:  # no uncertain flag on this model's answers: nothing to compare the share with
        reference = DriftReference(reference.class_mix, None)
    return DriftMonitor(info.class_names, reference, window=window, min_images=min(DEFAULT_MIN_IMAGES, window))


class DriftGauges:
    """The monitor's state as Prometheus gauges (set from :meth:`DriftMonitor.status` at each scrape)."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Gauge

        def gauge(name: str, text: str, labels: tuple[str, ...] = ()) -> Any:
            return Gauge(f"steeldefect_drift_{name}", text, labels, registry=registry)

        self.alarm = gauge("alarm", "1 while the drift alarm is on")
        self.images = gauge("window_images", "answers in the drift window")
        self.class_share = gauge("class_share", "share of the window's answers per top-1 class", ("class",))
        self.training_share = gauge(
            "training_class_share", "share of the model's training images per class", ("class",)
        )
        self.uncertain = gauge("uncertain_share", "share of the window's answers flagged uncertain")
        self.expected = gauge("expected_uncertain_share", "the model's expected uncertain share at its acceptance")
        self.mix_p = gauge("class_mix_p_value", "chi-square test p-value of the window's class mix (NaN: not tested)")
        self.mix_psi = gauge("class_mix_psi", "population-stability index of the window's class mix")
        self.uncertain_p = gauge("uncertain_p_value", "binomial test p-value of the uncertain share (NaN: not tested)")
        self.alarms = gauge("alarms_started", "drift alarms started since the model began serving")

    def update(self, status: Mapping[str, Any]) -> None:
        def value(v: float | None) -> float:
            return math.nan if v is None else float(v)

        self.alarm.set(1 if status["alarm"] else 0)
        self.images.set(status["images"])
        for name, share in status["class_share"].items():
            self.class_share.labels(name).set(share)
        for name, share in (status["training_class_mix"] or {}).items():
            self.training_share.labels(name).set(share)
        self.uncertain.set(value(status["uncertain"]["share"]))
        self.expected.set(value(status["uncertain"]["expected"]))
        self.mix_p.set(value(status["class_mix"]["p_value"]))
        self.mix_psi.set(value(status["class_mix"]["psi"]))
        self.uncertain_p.set(value(status["uncertain"]["p_value"]))
        self.alarms.set(status["alarms_started"])
