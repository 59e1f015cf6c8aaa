"""The promotion gate where DeLong's variance is 0: the interval has no width, which is no certainty.

Two versions that rank every test image alike (the same run registered again, a model and a
monotone rescaling of it, two perfect separations) leave DeLong's variance at exactly 0: the
interval printed as ``+0.0000 to +0.0000`` with ``DeLong p = 1``, as if the difference were known
to be 0 to four decimals. Each case here goes through the real :func:`fracture.evaluation.delong_paired`
(by :func:`fracture.gate.compare`), and the gate, its tags and the retrain report say what was
measured instead: nothing to measure, a randomisation test's p-value, or nothing at all.
"""

from __future__ import annotations

import numpy as np
import pytest

from fracture.config import RegisterParams
from fracture.evaluation import (
    NO_VARIANCE,
    SAME_RANKING,
    TOO_FEW,
    delong_mean_difference,
    delong_paired,
)
from fracture.gate import PairedScores, against_champion, compare

PARAMS = RegisterParams(model_name="fracture-classifier", experiment="t", confidence=0.95, sensitivity_tolerance=0.05)


def task(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and a champion's scores: 40 fractured of 200, AUC about 0.76."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(40), np.zeros(160)].astype(int)
    return y, 1 / (1 + np.exp(-(rng.normal(size=len(y)) + 1.0 * y - 1.0)))


def gate(y: np.ndarray, candidate: np.ndarray, champion: np.ndarray):
    comparison = compare(PairedScores(y, candidate, 0.5, champion, 0.5, "2"), 0.95)
    return comparison, against_champion(PARAMS, comparison)[0]


@pytest.mark.parametrize("rescaled", [False, True], ids=["the same scores", "a monotone rescaling"])
def test_the_same_ranking_says_there_is_no_difference_to_measure_not_a_zero_width_interval(rescaled):
    y, champion = task()
    candidate = champion ** 0.5 if rescaled else champion.copy()
    comparison, beats = gate(y, candidate, champion)
    a = comparison.auc
    assert (a.difference, a.no_interval, a.test, a.p_value) == (0.0, SAME_RANKING, "none", 1.0)
    assert not beats.passed and beats.detail.endswith("not higher")
    assert "rank the fractured against the non-fractured images alike" in beats.detail
    assert "no difference to measure" in beats.detail
    assert "CI" not in beats.detail and "DeLong p" not in beats.detail
    tags = comparison.tags()
    assert tags["gate_auc_difference_ci"] == "none (same ranking)" and tags["gate_p_value"] == "1"


def test_two_perfect_separations_have_no_difference_to_measure():
    y = np.r_[np.ones(10), np.zeros(10)].astype(int)
    right = np.r_[np.linspace(0.9, 0.6, 10), np.linspace(0.4, 0.1, 10)]
    other = np.r_[np.linspace(0.99, 0.51, 10), np.linspace(0.49, 0.01, 10)]  # other scores, the same separation
    comparison, beats = gate(y, other, right)
    assert (comparison.auc.auc_a, comparison.auc.auc_b, comparison.auc.no_interval) == (1.0, 1.0, SAME_RANKING)
    assert not beats.passed and "no difference to measure" in beats.detail and "CI" not in beats.detail


def test_a_difference_with_no_spread_is_judged_by_the_randomisation_test_and_says_so():
    """A perfect separation against a perfect inversion: DeLong's variance is 0 however real the
    difference. The gate decides on the paired randomisation test's p-value, named as such, not on
    an interval of +1.0000 to +1.0000 nor on a "DeLong p" DeLong never gave."""
    y = np.r_[np.ones(10), np.zeros(10)].astype(int)
    right = np.r_[np.linspace(0.9, 0.6, 10), np.linspace(0.4, 0.1, 10)]
    comparison, beats = gate(y, right, 1 - right)
    a = comparison.auc
    assert (a.difference, a.no_interval, a.test) == (1.0, NO_VARIANCE, "paired randomisation") and a.p_value < 0.001
    assert beats.passed and "paired randomisation test p = " in beats.detail and "DeLong p" not in beats.detail
    assert "no interval: the difference is the same at every image" in beats.detail
    assert comparison.tags()["gate_auc_difference_ci"] == "none (no variance)"
    # At 2 images a class the same test finds no evidence: the version is not promoted on it.
    y = np.array([1, 1, 0, 0])
    comparison, beats = gate(y, np.array([0.9, 0.8, 0.2, 0.1]), np.full(4, 0.5))
    assert comparison.auc.no_interval == NO_VARIANCE and comparison.auc.p_value > 0.1 and not beats.passed


def test_one_image_of_a_class_measures_nothing_and_the_gate_does_not_call_the_gain_short_of_confidence():
    y = np.array([1, 0, 0, 0, 0])
    comparison, beats = gate(y, np.array([0.9, 0.1, 0.2, 0.3, 0.4]), np.array([0.3, 0.1, 0.2, 0.5, 0.4]))
    a = comparison.auc
    assert (a.no_interval, a.test, a.ci_low, a.ci_high, a.p_value) == (TOO_FEW, "none", -1.0, 1.0, 1.0)
    assert not beats.passed and "nothing measured: a class has fewer than two images" in beats.detail
    assert beats.detail.endswith("not promoted on it") and "not with 95% confidence" not in beats.detail


def test_an_interval_with_width_reads_as_before():
    y, champion = task()
    rng = np.random.default_rng(1)
    better = 1 / (1 + np.exp(-(rng.normal(size=len(y)) + 3.0 * y - 1.5)))
    comparison, beats = gate(y, better, champion)
    a = comparison.auc
    assert (a.no_interval, a.test) == ("", "DeLong") and a.ci_low < a.difference < a.ci_high
    assert f"(95% CI {a.ci_low:+.4f} to {a.ci_high:+.4f}, DeLong p = {a.p_value:.3g})" in beats.detail


def test_a_score_that_is_not_a_number_is_refused_rather_than_read_as_not_higher():
    y, champion = task()
    broken = champion.copy()
    broken[3] = np.nan
    with pytest.raises(ValueError, match="model A's run 1 has 1 NaN or infinite score"):
        delong_paired(y, broken, champion)
    with pytest.raises(ValueError, match="model B's run 2 has 1 NaN or infinite score"):
        delong_mean_difference(y, [champion], [champion, broken])
