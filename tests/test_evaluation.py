"""Metrics: AUC from probabilities, sensitivity and specificity from the confusion matrix, their
intervals (bootstrap for AUC, Wilson for the proportions), calibration, per-body-part breakdown and
the PNG figures."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

from fracture.config import EvaluateParams
from fracture.evaluation import (
    by_group,
    calibration,
    choose_threshold,
    confidence_intervals,
    evaluate_probabilities,
    operating_threshold,
    wilson_interval,
)
from fracture.plots import save_evaluation_plots


def test_metrics_match_the_confusion_matrix():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    probs = np.array([0.9, 0.6, 0.3, 0.7, 0.2, 0.1, 0.4, 0.05])
    result = evaluate_probabilities(labels, probs, threshold=0.5)
    assert result.confusion == {"tp": 2, "fn": 1, "fp": 1, "tn": 4}
    m = result.metrics
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(6 / 8)
    # AUC uses the probabilities: 12 of the 15 positive/negative pairs are ordered correctly.
    assert m["roc_auc"] == pytest.approx(12 / 15)


def test_auc_does_not_depend_on_the_threshold():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(labels * 0.3 + rng.random(200) * 0.7, 0, 1)
    low = evaluate_probabilities(labels, probs, 0.2)
    high = evaluate_probabilities(labels, probs, 0.8)
    assert low.metrics["roc_auc"] == high.metrics["roc_auc"]
    assert low.metrics["recall"] > high.metrics["recall"]
    assert list(low.roc.columns) == ["fpr", "tpr", "threshold"]
    assert low.roc["fpr"].is_monotonic_increasing


def test_threshold_for_a_target_sensitivity_is_the_highest_that_reaches_it():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    probs = np.array([0.9, 0.8, 0.35, 0.2, 0.7, 0.3, 0.25, 0.1, 0.05, 0.01])
    t = choose_threshold(labels, probs, 0.75)
    assert t == pytest.approx(0.35)  # 3 of 4 fractures found; no higher threshold finds 3
    assert evaluate_probabilities(labels, probs, t).metrics["recall"] >= 0.75
    assert choose_threshold(labels, probs, 1.0) == pytest.approx(0.2)
    # The target reached inside a run of fractured images (0.9, 0.8, 0.7, 0.6 above every
    # negative but one): 0.8 finds 2 of 5, and no higher threshold does.
    run = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.65, 0.4, 0.3, 0.2, 0.1])
    assert choose_threshold(np.array([1] * 5 + [0] * 5), run, 0.4) == pytest.approx(0.8)


@pytest.mark.parametrize("labels", [np.zeros(6, int), np.ones(6, int)], ids=["no fractured", "only fractured"])
def test_a_threshold_is_not_chosen_on_labels_of_one_class(labels):
    """Without fractured images no sensitivity can be reached (roc_curve only warns, and 1.0 came
    back); without non-fractured ones no specificity is kept. Either way the caller is told why."""
    probs = np.linspace(0.1, 0.9, 6)
    with pytest.raises(ValueError, match=r"needs fractured and non-fractured images, got \d fractured of 6"):
        choose_threshold(labels, probs, 0.85)


def test_the_operating_threshold_is_fixed_or_chosen_on_val_and_val_is_scored_only_when_chosen():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    probs = np.array([0.9, 0.8, 0.35, 0.2, 0.7, 0.3, 0.25, 0.1, 0.05, 0.01])
    calls: list[int] = []

    def val():
        calls.append(1)
        return labels, probs

    assert operating_threshold(EvaluateParams(threshold=0.4, batch_size=8, target_sensitivity=None), val) == 0.4
    assert calls == []  # a fixed threshold needs no val scores
    chosen = operating_threshold(EvaluateParams(threshold=0.4, batch_size=8, target_sensitivity=0.75), val)
    assert chosen == pytest.approx(0.35) and calls == [1]


def noisy_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = rng.random(n)
    labels = (rng.random(n) < probs).astype(int)  # calibrated by construction
    return labels, probs


def test_confidence_intervals_hold_the_estimate_shrink_with_data_and_repeat_with_the_seed():
    small = noisy_scores(200, 1)
    large = noisy_scores(3000, 1)
    ci_small = confidence_intervals(*small, threshold=0.5, n_resamples=200, seed=3)
    ci_large = confidence_intervals(*large, threshold=0.5, n_resamples=200, seed=3)
    point = evaluate_probabilities(*small, 0.5).metrics
    for name in ("roc_auc", "recall", "specificity"):
        low, high = ci_small[name]
        assert low <= point[name] <= high
        assert ci_large[name][1] - ci_large[name][0] < high - low
    assert confidence_intervals(*small, threshold=0.5, n_resamples=200, seed=3) == ci_small
    assert confidence_intervals(*small, threshold=0.5, n_resamples=200, seed=4) != ci_small


def wilson(k: int, n: int) -> tuple[float, float]:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return ci.low, ci.high


def test_sensitivity_and_specificity_carry_wilson_intervals_that_keep_their_width_at_all_caught():
    """At a fixed threshold both are binomial proportions: a percentile bootstrap gave 30 of 30
    fractured images caught the interval 1.000-1.000; the Wilson interval is 0.886-1.000."""
    labels = np.r_[np.ones(30, int), np.zeros(170, int)]
    probs = np.r_[np.linspace(0.5, 1.0, 30), np.linspace(0.0, 0.6, 170)]
    pred = probs >= 0.45
    tn = int(np.sum(~pred[30:]))
    ci = confidence_intervals(labels, probs, threshold=0.45, n_resamples=50, seed=0)
    assert ci["recall"] == pytest.approx(wilson(30, 30)) and ci["recall"][0] == pytest.approx(0.8865, abs=1e-4)
    assert ci["recall"][1] == 1.0
    assert ci["specificity"] == pytest.approx(wilson(tn, 170))
    assert wilson_interval(30, 30) == pytest.approx(wilson(30, 30))
    assert wilson_interval(2, 3, confidence=0.5) == pytest.approx(
        tuple(binomtest(2, 3).proportion_ci(confidence_level=0.5, method="wilson"))
    )


def test_intervals_refuse_zero_resamples_and_a_missing_class():
    labels, probs = np.array([0, 1, 0, 1, 1, 0]), np.array([0.1, 0.9, 0.3, 0.6, 0.4, 0.2])
    with pytest.raises(ValueError, match=r"at least 1 resample \(evaluate.bootstrap_resamples\), got 0"):
        confidence_intervals(labels, probs, 0.5, n_resamples=0)
    with pytest.raises(ValueError, match="got 0 fractured of 6"):
        confidence_intervals(np.zeros(6, int), probs, 0.5)
    with pytest.raises(ValueError, match="trials >= 1"):
        wilson_interval(0, 0)


def test_calibration_tells_calibrated_from_overconfident_and_matches_sklearn():
    labels, probs = noisy_scores(4000, 2)
    good = calibration(labels, probs, n_bins=10)
    overconfident = calibration(labels, np.clip((probs - 0.5) * 3 + 0.5, 0, 1), n_bins=10)
    assert good.ece < 0.03 < overconfident.ece
    assert good.curve["count"].sum() == len(labels)
    fraction, mean_predicted = calibration_curve(labels, probs, n_bins=10)
    np.testing.assert_allclose(good.curve["fraction_fractured"], fraction)
    np.testing.assert_allclose(good.curve["mean_predicted"], mean_predicted)
    assert good.brier < overconfident.brier


def test_metrics_by_body_part_match_each_subset_and_leave_undefined_ones_empty():
    labels = np.array([1, 0, 1, 0, 0, 0, 1, 1])
    probs = np.array([0.9, 0.2, 0.4, 0.6, 0.1, 0.3, 0.8, 0.7])
    parts = np.array(["hand", "hand", "hand", "hand", "hip", "hip", "leg", "leg"])
    out = by_group(labels, probs, parts, threshold=0.5)
    assert out["hand"]["roc_auc"] == pytest.approx(roc_auc_score(labels[:4], probs[:4]))
    assert out["hand"]["recall"] == 0.5 and out["hand"]["specificity"] == 0.5
    assert out["hip"] == {
        "n_images": 2, "n_fractured": 0, "roc_auc": None, "recall": None, "specificity": 1.0,
        "recall_ci_low": None, "recall_ci_high": None,
        "specificity_ci_low": pytest.approx(wilson(2, 2)[0]), "specificity_ci_high": 1.0,
    }
    assert out["leg"]["roc_auc"] is None and out["leg"]["specificity"] is None and out["leg"]["recall"] == 1.0
    assert out["leg"]["specificity_ci_low"] is None and out["leg"]["specificity_ci_high"] is None


def test_each_body_parts_sensitivity_and_specificity_carry_their_wilson_interval():
    """The card's table prints these: a part's few images show as a wide interval, not a bare 1.000."""
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 0])
    probs = np.array([0.9, 0.8, 0.3, 0.1, 0.2, 0.6, 0.3, 0.1, 0.9, 0.2])
    parts = np.array(["hand"] * 8 + ["hip"] * 2)
    out = by_group(labels, probs, parts, threshold=0.5)
    hand, hip = out["hand"], out["hip"]
    assert (hand["recall_ci_low"], hand["recall_ci_high"]) == pytest.approx(wilson(2, 3))
    assert (hand["specificity_ci_low"], hand["specificity_ci_high"]) == pytest.approx(wilson(4, 5))
    assert hand["recall_ci_low"] < hand["recall"] < hand["recall_ci_high"]
    assert (hip["recall_ci_low"], hip["recall_ci_high"]) == pytest.approx(wilson(1, 1))
    assert hip["recall"] == 1.0 and hip["recall_ci_low"] == pytest.approx(0.2065, abs=1e-4)


def test_evaluation_plots_are_written_as_png(tmp_path):
    labels, probs = noisy_scores(300, 5)
    paths = save_evaluation_plots(labels, probs, 0.4, 10, tmp_path)
    assert sorted(p.name for p in paths) == ["calibration.png", "confusion.png", "pr.png", "roc.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
