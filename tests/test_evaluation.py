"""Metrics: AUC from probabilities, sensitivity and specificity from the confusion matrix, their
intervals (bootstrap for AUC, Wilson for the proportions), calibration, per-body-part breakdown and
the PNG figures."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score
from sklearn.utils import resample

from fracture.config import EvaluateParams
from fracture.evaluation import (
    by_group,
    calibration,
    choose_threshold,
    confidence_intervals,
    evaluate_probabilities,
    group_resamples,
    operating_threshold,
    rechosen_rate_intervals,
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


def test_without_groups_the_auc_interval_is_the_stratified_image_bootstrap_it_always_was():
    """``groups=None`` draws exactly as before groups existed: the seeded ``sklearn.utils.resample``."""
    labels, probs = noisy_scores(200, 1)
    rng = np.random.RandomState(3)
    aucs = [roc_auc_score(*resample(labels, probs, stratify=labels, random_state=rng)) for _ in range(200)]
    expected = (float(np.percentile(aucs, 2.5)), float(np.percentile(aucs, 97.5)))
    assert confidence_intervals(labels, probs, 0.5, n_resamples=200, seed=3)["roc_auc"] == expected
    assert confidence_intervals(labels, probs, 0.5, n_resamples=200, seed=3, groups=None)["roc_auc"] == expected


def separable_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """About 30% fractured, scores that rank them well but not perfectly (AUC about 0.85)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(int)
    probs = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.5 * labels - 0.8)))
    return labels, probs


def test_an_image_stored_twice_does_not_narrow_the_auc_interval_when_its_group_is_given():
    """Each image and its copy in one group: the bootstrap over groups gives the interval of the
    images stored once, while the bootstrap over images counts each copy as new evidence and
    narrowed it by about a quarter."""
    labels, probs = separable_scores(300, 0)
    twice, twice_probs, pairs = np.repeat(labels, 2), np.repeat(probs, 2), np.repeat(np.arange(300), 2)

    def width(ci: dict[str, tuple[float, float]]) -> float:
        return ci["roc_auc"][1] - ci["roc_auc"][0]

    once = confidence_intervals(labels, probs, 0.5, n_resamples=500, seed=0)
    grouped = confidence_intervals(twice, twice_probs, 0.5, n_resamples=500, seed=0, groups=pairs)
    by_image = confidence_intervals(twice, twice_probs, 0.5, n_resamples=500, seed=0)
    # The same draw of groups as the images stored once, each a group of its own: the same interval.
    assert grouped["roc_auc"] == pytest.approx(
        confidence_intervals(labels, probs, 0.5, n_resamples=500, seed=0, groups=np.arange(300))["roc_auc"]
    )
    assert 0.9 < width(grouped) / width(once) < 1.1
    assert width(by_image) / width(once) < 0.85  # what the image bootstrap did to copies
    assert grouped["roc_auc"][0] <= roc_auc_score(labels, probs) <= grouped["roc_auc"][1]


def test_the_group_bootstrap_draws_whole_groups_and_both_classes_even_when_every_group_mixes_them():
    # Patients with one fractured and one intact X-ray each, and one patient of two intact ones.
    labels = np.array([1, 0] * 6 + [0, 0])
    groups = np.repeat([f"p{i}" for i in range(7)], 2)
    for rows in group_resamples(labels, groups, 200, seed=1):
        assert len(rows) == len(labels)
        assert 0 < labels[rows].sum() < len(rows)
        drawn = pd.Series(groups[rows]).value_counts()
        assert (drawn % 2 == 0).all()  # a patient's two images come together, however often drawn
    with pytest.raises(ValueError, match="3 keys for 14 images"):
        next(group_resamples(labels, groups[:3], 1, seed=0))


def test_sensitivity_and_specificity_at_a_threshold_chosen_on_the_same_images_bootstrap_the_choice():
    """Chosen again in every resample, the threshold's own noise widens the specificity's interval
    beyond Wilson's (which holds the threshold fixed); the sensitivity's sits at the target."""
    labels, probs = separable_scores(300, 5)
    threshold = choose_threshold(labels, probs, 0.85)
    point = evaluate_probabilities(labels, probs, threshold).metrics
    ci = rechosen_rate_intervals(labels, probs, 0.85, n_resamples=300, seed=0)
    negatives = labels == 0
    fixed = wilson_interval(int(np.sum(probs[negatives] < threshold)), int(negatives.sum()))
    assert ci["specificity"][0] <= point["specificity"] <= ci["specificity"][1]
    assert ci["specificity"][1] - ci["specificity"][0] > 1.5 * (fixed[1] - fixed[0])
    assert 0.85 <= ci["recall"][0] <= point["recall"] <= ci["recall"][1]
    # Reproducible, and a copy of each image in its group changes nothing.
    assert rechosen_rate_intervals(labels, probs, 0.85, n_resamples=300, seed=0) == ci
    twice = rechosen_rate_intervals(np.repeat(labels, 2), np.repeat(probs, 2), 0.85, n_resamples=300, seed=0,
                                    groups=np.repeat(np.arange(300), 2))
    assert all(twice[name] == pytest.approx(ci[name]) for name in ci)


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
        "recall_ci_low": None, "recall_ci_high": None, "roc_auc_ci_low": None, "roc_auc_ci_high": None,
        "specificity_ci_low": pytest.approx(wilson(2, 2)[0]), "specificity_ci_high": 1.0,
    }
    assert out["leg"]["roc_auc"] is None and out["leg"]["specificity"] is None and out["leg"]["recall"] == 1.0
    assert out["leg"]["specificity_ci_low"] is None and out["leg"]["specificity_ci_high"] is None


def test_each_body_parts_roc_auc_carries_the_bootstrap_interval_of_its_own_images():
    """As the whole split's: the same draw over the part's images alone, and none for a part of one class."""
    rng = np.random.default_rng(3)
    labels = (rng.random(120) < 0.3).astype(int)
    probs = np.clip(0.2 * labels + 0.8 * rng.random(120), 0, 1)
    parts = np.array(["hand"] * 80 + ["leg"] * 30 + ["hip"] * 10)
    labels[110:] = 0
    linked = np.arange(120) // 2
    for groups in (None, linked):
        out = by_group(labels, probs, parts, 0.5, linked=groups, n_resamples=200, seed=5)
        for part in ("hand", "leg"):
            mask = parts == part
            own = confidence_intervals(labels[mask], probs[mask], 0.5, 200, 5,
                                       groups=None if groups is None else groups[mask])["roc_auc"]
            assert (out[part]["roc_auc_ci_low"], out[part]["roc_auc_ci_high"]) == pytest.approx(own), part
            assert out[part]["roc_auc_ci_low"] <= out[part]["roc_auc"] <= out[part]["roc_auc_ci_high"]
            assert out[part]["roc_auc_ci_high"] - out[part]["roc_auc_ci_low"] > 0.05
        assert out["hip"]["roc_auc"] is None and out["hip"]["roc_auc_ci_low"] is None
    # The leg's 30 images give a wider interval than the hand's 80.
    out = by_group(labels, probs, parts, 0.5, n_resamples=200, seed=5)
    width = {part: out[part]["roc_auc_ci_high"] - out[part]["roc_auc_ci_low"] for part in ("hand", "leg")}
    assert width["leg"] > width["hand"]
    assert by_group(labels, probs, parts, 0.5)["hand"]["roc_auc_ci_low"] is None
    with pytest.raises(ValueError, match="evaluate.bootstrap_resamples"):
        by_group(labels, probs, parts, 0.5, n_resamples=-1)


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


def test_evaluation_plots_are_written_as_png_and_draw_the_test_splits_curves_and_counts(tmp_path, monkeypatch):
    from matplotlib import pyplot as plt
    from sklearn.calibration import calibration_curve as reliability
    from sklearn.metrics import confusion_matrix, precision_recall_curve, roc_curve

    labels, probs = noisy_scores(300, 5)
    drawn, close = [], plt.close
    monkeypatch.setattr(plt, "close", drawn.append)  # each figure as it was saved, kept to be read
    paths = save_evaluation_plots(labels, probs, 0.4, 10, tmp_path)
    assert [p.name for p in paths] == ["roc.png", "pr.png", "calibration.png", "confusion.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    roc, pr, calibration, confusion = (figure.axes[0] for figure in drawn)

    def curve(ax):  # the test split's line (the others are the chance or perfect-calibration references)
        (line,) = [line for line in ax.lines if line.get_label().startswith("test")]
        return line.get_xydata()

    fpr, tpr, _ = roc_curve(labels, probs)
    np.testing.assert_allclose(curve(roc), np.column_stack([fpr, tpr]))
    precision, recall, _ = precision_recall_curve(labels, probs)
    np.testing.assert_allclose(curve(pr), np.column_stack([recall, precision]))
    observed, predicted = reliability(labels, probs, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(curve(calibration), np.column_stack([predicted, observed]))
    counts = confusion_matrix(labels, (probs >= 0.4).astype(int), labels=[0, 1])
    assert [text.get_text() for text in confusion.texts] == [str(n) for n in counts.ravel()]
    assert confusion.get_title() == "threshold 0.4"
    for figure in drawn:
        close(figure)


def test_the_test_splits_groups_come_from_its_table_or_as_the_split_links_them():
    from fracture.split import group_key, split_groups

    test = pd.DataFrame({
        "image_id": ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"],
        "sha256": ["h1", "h1", "h2", "h3", "h4"],
        "near_duplicate_group": ["a.jpg", "a.jpg", "c.jpg", "c.jpg", "e.jpg"],
    })
    linked = ["a.jpg", "a.jpg", "c.jpg", "c.jpg", "e.jpg"]
    assert list(split_groups(test)) == linked == list(group_key(test))  # a table written without `group`
    assert list(split_groups(test.assign(group=["x", "x", "y", "z", "w"]))) == ["x", "x", "y", "z", "w"]


def test_the_evaluate_stage_counts_the_test_splits_linked_images_once_in_its_intervals(tmp_path, monkeypatch):
    """A trained model through the evaluate stage, on a test split holding linked pairs: the AUC's
    bootstrap draws whole groups, and the Wilson intervals, the split's and each body part's, count
    the effective images, as the split table's groups say; unlinked, the same scores give other intervals."""
    from fracture.evaluation import by_group
    from fracture.manifest import body_part
    from fracture.split import split_groups
    from fracture.stages.evaluate import run_evaluate
    from fracture.stages.train import run_train
    from tests.test_crossval import tiny_ensemble_project

    params, workspace = tiny_ensemble_project(tmp_path, monkeypatch)
    tables = workspace.read_split_tables()
    pool = pd.concat([tables["train"], tables["test"]], ignore_index=True)
    test_ids = [*pool.loc[pool["label"] == 1, "image_id"][:6], *pool.loc[pool["label"] == 0, "image_id"][:8]]
    test = pool[pool["image_id"].isin(test_ids)].sort_values("image_id").reset_index(drop=True)
    # Pairs of linked images (near-duplicates of one X-ray), each pair of one label and body part.
    parts = body_part(test).to_numpy()
    for _, ids in test.groupby(["label", parts])["image_id"]:
        for first, second in zip(ids.to_list()[0::2], ids.to_list()[1::2], strict=False):
            test.loc[test["image_id"] == second, "near_duplicate_group"] = first
    linked = split_groups(test)
    assert len(set(linked)) <= len(test) - 4
    workspace.write_split({"train": pool[~pool["image_id"].isin(test_ids)], "val": tables["val"], "test": test}, {})
    run_train(params, workspace)
    metrics = run_evaluate(params, workspace).metrics

    predictions = pd.read_csv(workspace.curve("predictions"))
    assert predictions["image_id"].to_list() == test["image_id"].to_list()
    labels, probs = predictions["label"].to_numpy(), predictions["fracture_probability"].to_numpy()
    ev, threshold = params.evaluate, metrics["threshold"]
    grouped = confidence_intervals(labels, probs, threshold, ev.bootstrap_resamples, ev.seed, groups=linked)
    unlinked = confidence_intervals(labels, probs, threshold, ev.bootstrap_resamples, ev.seed)
    assert grouped != unlinked
    for name, (low, high) in grouped.items():
        assert (metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"]) == pytest.approx((low, high)), name
    written = json.loads(workspace.body_parts.read_text())
    expected = by_group(labels, probs, parts, threshold, linked=linked, n_resamples=ev.bootstrap_resamples, seed=ev.seed)
    assert expected != by_group(labels, probs, parts, threshold, n_resamples=ev.bootstrap_resamples, seed=ev.seed)
    assert written.keys() == expected.keys()
    for part, figures in expected.items():
        assert written[part] == pytest.approx(figures), part

    # A clone whose tracking store lacks the training run (the outputs pulled from a DVC remote, not
    # the MLflow store): the stage stops naming the run before it scores an image or writes an output.
    import shutil

    from fracture.tracking import TrainingRunMissing

    shutil.rmtree(workspace.evaluate_dir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'another-store.db'}")
    scored = []
    monkeypatch.setattr("fracture.stages.evaluate.probabilities", lambda *a, **k: scored.append(1))
    with pytest.raises(TrainingRunMissing, match=workspace.read_train().run_id):
        run_evaluate(params, workspace)
    assert scored == [] and not workspace.evaluate_dir.exists()
