"""bench.threshold_noise: where a threshold chosen on a drawn val set lands on the other images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.threshold_noise import box_threshold, held_out_rates, read_probabilities
from fracture.evaluation import choose_threshold


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


def test_the_box_rule_spends_spare_specificity_on_sensitivity_where_the_sensitivity_rule_stops_at_its_edge():
    # 20 fractured X-rays scored 0.50-0.95, 80 others below 0.30: every threshold above 0.30 keeps
    # specificity 1.0, so the centre of the target box is where sensitivity is 1.0 too.
    labels = np.array([1] * 20 + [0] * 80)
    probs = np.r_[np.linspace(0.5, 0.95, 20), np.linspace(0.0, 0.3, 80)]
    assert box_threshold(labels, probs, 0.85, 0.85) == pytest.approx(0.5)
    edge = choose_threshold(labels, probs, 0.85)
    assert edge > 0.5
    assert (probs[labels == 1] >= edge).mean() == pytest.approx(0.85)


def test_the_box_rule_gives_up_sensitivity_where_specificity_is_short_of_its_target():
    # Uninformative scores: at the sensitivity edge specificity is about 0.15, so the box's centre
    # lies where the two margins are equal, near sensitivity = specificity = 0.5.
    rng = np.random.default_rng(3)
    labels = np.array([1] * 500 + [0] * 2000)
    probs = rng.uniform(size=len(labels))
    threshold = box_threshold(labels, probs, 0.85, 0.85)
    sensitivity = (probs[labels == 1] >= threshold).mean()
    specificity = (probs[labels == 0] < threshold).mean()
    assert sensitivity == pytest.approx(specificity, abs=0.02)
    assert threshold == pytest.approx(0.5, abs=0.05)
    rates = held_out_rates(labels, probs, 100, 400, 100, 0.85, np.random.default_rng(0), rule="box")
    assert np.median(rates[:, 0]) == pytest.approx(0.5, abs=0.05)


def test_a_long_file_is_read_as_one_column_per_variant_and_a_variant_missing_images_is_named(tmp_path):
    rows = [("a", "IMG1.jpg", 1, 0.9), ("a", "IMG2.jpg", 0, 0.2), ("b", "IMG1.jpg", 1, 0.7), ("b", "IMG2.jpg", 0, 0.4)]
    long = pd.DataFrame(rows, columns=["variant", "image_id", "label", "probability"])
    long.to_csv(tmp_path / "seeds.csv", index=False)
    wide = read_probabilities(tmp_path / "seeds.csv").set_index("image_id")
    assert wide.loc["IMG1.jpg"].to_dict() == {"a": 0.9, "b": 0.7, "label": 1}
    assert wide.loc["IMG2.jpg", "b"] == 0.4
    long[~((long.variant == "b") & (long.image_id == "IMG2.jpg"))].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(SystemExit, match="variants b do not score every image"):
        read_probabilities(tmp_path / "short.csv")
