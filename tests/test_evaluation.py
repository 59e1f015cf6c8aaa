"""Metrics: AUC from probabilities, sensitivity and specificity from the confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest

from fracture.evaluation import choose_threshold, evaluate_probabilities


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
