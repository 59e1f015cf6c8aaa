"""bench.threshold_noise: where a threshold chosen on a drawn val set lands on the other images."""

from __future__ import annotations

import numpy as np
import pytest

from bench.threshold_noise import held_out_rates


def test_scores_that_separate_the_classes_call_no_other_image_and_miss_fractured_ones_only_below_the_threshold():
    labels = np.array([1] * 40 + [0] * 160)
    probs = np.where(labels == 1, 0.9, 0.1) + np.random.default_rng(1).uniform(-0.05, 0.05, len(labels))
    rates = held_out_rates(labels, probs, 10, 40, 50, 0.85, np.random.default_rng(0))
    assert rates.shape == (50, 2)
    # The chosen threshold lies among the fractured val scores, so a held-out fractured image can
    # fall below it; no other image ever reaches it.
    assert (rates[:, 1] == 1.0).all()
    assert rates[:, 0].min() < 1.0 and rates[:, 0].max() == 1.0


def test_uninformative_scores_trade_specificity_for_the_sensitivity_the_threshold_was_chosen_for():
    labels = np.array([1] * 400 + [0] * 1600)
    probs = np.random.default_rng(2).uniform(size=len(labels))
    rates = held_out_rates(labels, probs, 100, 400, 200, 0.85, np.random.default_rng(0))
    assert np.median(rates[:, 0]) == pytest.approx(0.85, abs=0.03)
    assert np.median(rates[:, 1]) == pytest.approx(0.15, abs=0.03)
    # A smaller val set chooses a noisier threshold.
    small = held_out_rates(labels, probs, 20, 80, 200, 0.85, np.random.default_rng(0))
    assert np.std(small[:, 0]) > np.std(rates[:, 0])


def test_a_val_set_that_leaves_nothing_out_is_refused_with_the_counts():
    labels = np.array([1] * 5 + [0] * 20)
    with pytest.raises(SystemExit, match="5 fractured and 20 other"):
        held_out_rates(labels, np.zeros(len(labels)), 5, 10, 1, 0.85, np.random.default_rng(0))
