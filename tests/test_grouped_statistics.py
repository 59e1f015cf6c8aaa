"""Linked images (copies, near-duplicates, one patient's) counted as the evidence they are: the
Wilson intervals of sensitivity and specificity, per body part too, over the effective number of
images, and DeLong's paired test of the promotion gate over groups (Obuchowski 1997)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest, norm

from fracture.config import RegisterParams
from fracture.evaluation import (
    by_group,
    confidence_intervals,
    delong_mean_difference,
    delong_paired,
    wilson_interval,
)
from fracture.gate import EvaluatedSplit, PairedScores, against_champion, compare


def paired_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """About 30% fractured, two correlated models of AUC about 0.8."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(int)
    a = rng.normal(size=n) + 1.2 * labels
    b = 0.5 * a + 0.8 * rng.normal(size=n) + 0.6 * labels
    return labels, a, b


def twice(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every image stored twice, and the groups pairing each with its copy."""
    return (*(np.repeat(x, 2) for x in arrays), np.repeat(np.arange(len(arrays[0])), 2))


def obuchowski(labels: np.ndarray, a: np.ndarray, b: np.ndarray, groups: np.ndarray) -> float:
    """The variance of AUC(a) - AUC(b) as Obuchowski (1997) writes it: per cluster, the sums of the
    structural components V10 (fractured) and V01 (not fractured), then S10, S01 and S11 across the
    I clusters, var = S10 / M + S01 / N + 2 S11 / (M N)."""
    pos, neg = labels == 1, labels == 0
    M, N = pos.sum(), neg.sum()
    keys = np.unique(groups)
    I = len(keys)

    def components(s: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
        theta = psi.mean()
        x = np.array([v10[groups[pos] == k].sum() - theta * np.sum(groups[pos] == k) for k in keys])
        y = np.array([v01[groups[neg] == k].sum() - theta * np.sum(groups[neg] == k) for k in keys])
        return x, y, theta

    xa, ya, _ = components(a)
    xb, yb, _ = components(b)
    x, y = xa - xb, ya - yb
    s10, s01, s11 = I / ((I - 1) * M) * x @ x, I / ((I - 1) * N) * y @ y, I / (I - 1) * x @ y
    return float(s10 / M + s01 / N + 2 * s11 / (M * N))


def se(result) -> float:
    return (result.ci_high - result.ci_low) / 2 / norm.ppf(0.975)


def test_every_image_stored_twice_leaves_the_clustered_delong_test_as_for_the_images_once():
    """Counted as independent, the copies halved DeLong's variance and shrank the p-value; with
    each copy in its original's group the interval and the p-value are the undoubled data's."""
    labels, a, b = paired_scores(300, 0)
    once = delong_paired(labels, a, b)
    y2, a2, b2, pairs = twice(labels, a, b)
    grouped = delong_paired(y2, a2, b2, groups=pairs)
    by_image = delong_paired(y2, a2, b2)
    assert grouped.difference == once.difference
    assert (grouped.ci_low, grouped.ci_high, grouped.p_value) == pytest.approx(
        (once.ci_low, once.ci_high, once.p_value), abs=1e-12
    )
    assert grouped.n_images == 600 and grouped.n_groups == 300 and once.n_groups is None
    assert se(by_image) / se(once) == pytest.approx(2**-0.5, rel=0.01)
    assert by_image.p_value < once.p_value


def test_groups_of_one_image_give_delong_exactly():
    labels, a, b = paired_scores(250, 1)
    alone = np.array([f"img{i}" for i in range(250)])
    for plain, grouped in (
        (delong_paired(labels, a, b), delong_paired(labels, a, b, groups=alone)),
        (
            delong_mean_difference(labels, [a, a + 0.1 * b], [b, b - 0.2 * a, b * 2], between_run_variance=1e-5,
                                   between_run_df=3),
            delong_mean_difference(labels, [a, a + 0.1 * b], [b, b - 0.2 * a, b * 2], between_run_variance=1e-5,
                                   between_run_df=3, groups=alone),
        ),
        # No spread to estimate: the randomisation test swaps each image's scores, alone or in a group of one.
        (delong_paired(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.2, 0.1]), np.full(4, 0.5)),
         delong_paired(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.2, 0.1]), np.full(4, 0.5), groups=np.arange(4))),
    ):
        assert (grouped.auc_a, grouped.auc_b, grouped.difference) == (plain.auc_a, plain.auc_b, plain.difference)
        assert grouped.ci_low == pytest.approx(plain.ci_low, abs=1e-12)
        assert grouped.ci_high == pytest.approx(plain.ci_high, abs=1e-12)
        assert grouped.p_value == pytest.approx(plain.p_value, abs=1e-12)


def test_where_every_group_holds_both_classes_the_variance_is_obuchowskis_equation():
    """Patients of 2 to 4 X-rays, each with a fractured and an intact one at least: the clustered
    variance is the paper's S10 / M + S01 / N + 2 S11 / (M N), the cross term included."""
    rng = np.random.default_rng(2)
    sizes = rng.integers(2, 5, 60)
    groups = np.repeat(np.arange(60), sizes)
    labels = np.concatenate([rng.permutation([1, 0] + list(rng.integers(0, 2, k - 2))) for k in sizes])
    shared = np.repeat(rng.normal(size=60), sizes)
    a = labels + shared + 0.7 * rng.normal(size=len(labels))
    b = labels + shared + 0.9 * rng.normal(size=len(labels))
    result = delong_paired(labels, a, b, groups=groups)
    assert se(result) ** 2 == pytest.approx(obuchowski(labels, a, b, groups), rel=1e-9)
    # and one fractured group of a class is no spread to estimate, as one fractured image is
    few = delong_paired(np.array([1, 1, 0, 0, 0]), np.array([.9, .8, .1, .2, .3]), np.array([.7, .9, .2, .1, .3]),
                        groups=np.array(["p", "p", "q", "r", "s"]))
    assert (few.ci_low, few.ci_high, few.p_value) == (-1.0, 1.0, 1.0)


def test_clustered_delong_keeps_the_type_one_error_near_nominal_where_delong_over_images_does_not():
    """Two equally good models on patients of 4 X-rays whose scores each model errs on alike
    (simulated under no difference): DeLong over images rejected in 31% of 300 datasets at a
    nominal 5%; over patients, in 4%."""
    rejected = np.zeros(2)
    for seed in range(300):
        rng = np.random.default_rng(seed)
        sick = (rng.random(80) < 0.35).astype(int)
        labels, patients = np.repeat(sick, 4), np.repeat(np.arange(80), 4)

        def model() -> np.ndarray:
            return labels + np.repeat(shared + rng.normal(size=80), 4) + 0.3 * rng.normal(size=320)  # noqa: B023

        shared = rng.normal(size=80)
        a, b = model(), model()
        rejected += [delong_paired(labels, a, b).p_value < 0.05,
                     delong_paired(labels, a, b, groups=patients).p_value < 0.05]
    by_image, by_patient = rejected / 300
    assert by_image > 0.2
    assert 0.02 <= by_patient <= 0.09


def test_the_gate_reads_the_test_splits_groups_and_does_not_promote_on_copies(tmp_path):
    """A gain DeLong calls significant when each test image counts twice is not one over the
    split's groups: the version stays a challenger."""
    frame = pd.DataFrame({
        "image_id": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], "path": ["x/a.jpg", "x/b.jpg", "x/c.jpg", "x/d.jpg"],
        "label": [1, 1, 0, 0], "sha256": ["h1", "h1", "h2", "h3"],
    })
    frame.to_csv(tmp_path / "old.csv", index=False)
    frame.assign(group=["g1", "g1", "g2", "g2"]).to_csv(tmp_path / "test.csv", index=False)
    assert EvaluatedSplit.from_csv(tmp_path / "test.csv", tmp_path).groups == ("g1", "g1", "g2", "g2")
    # a table written before the split recorded `group`: linked as the split links them
    assert EvaluatedSplit.from_csv(tmp_path / "old.csv", tmp_path).groups == ("a.jpg", "a.jpg", "c.jpg", "d.jpg")

    rng = np.random.default_rng(7)  # a gain of 0.050 in ROC AUC, p = 0.08 on the 400 images once
    labels = (rng.random(400) < 0.3).astype(int)
    champion = labels + rng.normal(size=400)
    candidate = labels * 1.25 + rng.normal(size=400) * 0.9 + 0.35 * (champion - labels)
    y2, ours, theirs, pairs = twice(labels, candidate, champion)
    params = RegisterParams("fracture", "t")
    as_images = compare(PairedScores(y2, ours, 0.5, theirs, 0.5, "1"), 0.95)
    as_groups = compare(PairedScores(y2, ours, 0.5, theirs, 0.5, "1", groups=pairs), 0.95)
    assert as_images.auc.difference == as_groups.auc.difference > 0
    assert as_images.auc.p_value < 0.05 < as_groups.auc.p_value
    assert as_groups.auc.p_value == pytest.approx(delong_paired(labels, candidate, champion).p_value, abs=1e-12)
    assert against_champion(params, as_images)[0].passed
    check = against_champion(params, as_groups)[0]
    assert not check.passed and "on the same 800 images (400 groups of linked images)" in check.detail


def wilson(k: int, n: int) -> tuple[float, float]:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return ci.low, ci.high


def test_every_image_stored_twice_leaves_the_sensitivity_and_specificity_intervals_as_for_the_images_once():
    rng = np.random.default_rng(3)
    labels = (rng.random(300) < 0.3).astype(int)
    probs = np.clip(0.35 * labels + 0.65 * rng.random(300), 0, 1)
    once = confidence_intervals(labels, probs, 0.5, n_resamples=20, seed=0)
    y2, p2, pairs = twice(labels, probs)
    grouped = confidence_intervals(y2, p2, 0.5, n_resamples=20, seed=0, groups=pairs)
    by_image = confidence_intervals(y2, p2, 0.5, n_resamples=20, seed=0)
    for name in ("recall", "specificity"):
        # as wide as for the images once, but for Rao & Scott's k / (k - 1): one trial fewer
        assert grouped[name][0] <= once[name][0] and grouped[name][1] >= once[name][1]
        assert grouped[name][1] - grouped[name][0] < 1.02 * (once[name][1] - once[name][0])
        assert by_image[name][1] - by_image[name][0] < 0.8 * (once[name][1] - once[name][0])
    # groups of one image: Wilson's interval over the images, bit for bit
    alone = confidence_intervals(labels, probs, 0.5, n_resamples=20, seed=0, groups=np.arange(300))
    assert (alone["recall"], alone["specificity"]) == (once["recall"], once["specificity"])
    # every fractured image caught, each twice: Wilson's 30 of 30, not 60 of 60
    caught = np.r_[np.ones(30, int), np.zeros(30, int)]
    y2, p2, pairs = twice(caught, np.r_[np.full(30, 0.9), np.linspace(0, 0.8, 30)])
    assert confidence_intervals(y2, p2, 0.5, 20, groups=pairs)["recall"] == pytest.approx(wilson(30, 30), abs=1e-12)


def test_wilson_over_the_effective_number_of_images_covers_clustered_sensitivity_near_nominal():
    """Patients of 5 X-rays whose calls mostly agree (each patient's chance of being caught drawn
    from Beta(0.8, 0.2), mean 0.8): Wilson's interval over images covered the true sensitivity in
    72% of 400 datasets, over the effective number of images in 94.5%."""
    from fracture.evaluation import design_effect

    patients = np.repeat(np.arange(40), 5)
    covered = np.zeros(2)
    for seed in range(400):
        rng = np.random.default_rng(seed)
        caught = (rng.random((40, 5)) < rng.beta(0.8, 0.2, size=40)[:, None]).ravel()
        for i, effect in enumerate((1.0, design_effect(caught, patients))):
            low, high = wilson_interval(int(caught.sum()), 200, design_effect=effect)
            covered[i] += low <= 0.8 <= high
    by_image, by_patient = covered / 400
    assert by_image < 0.85
    assert 0.92 <= by_patient <= 0.98


def test_each_body_parts_intervals_count_linked_images_once():
    rng = np.random.default_rng(4)
    labels = (rng.random(200) < 0.4).astype(int)
    probs = np.clip(0.3 * labels + 0.7 * rng.random(200), 0, 1)
    parts = rng.choice(["hand", "leg", "hip"], 200)
    once = by_group(labels, probs, parts, 0.5, n_resamples=200, seed=1)
    y2, p2, parts2, pairs = twice(labels, probs, parts)
    grouped = by_group(y2, p2, parts2, 0.5, linked=pairs, n_resamples=200, seed=1)
    by_image = by_group(y2, p2, parts2, 0.5, n_resamples=200, seed=1)
    assert by_group(labels, probs, parts, 0.5, linked=np.arange(200)) == by_group(labels, probs, parts, 0.5)
    for part, row in once.items():
        assert grouped[part]["n_images"] == 2 * row["n_images"]
        # The ROC AUC's bootstrap: drawing copies together keeps it as wide as for the images
        # stored once, where drawing them apart narrows it.
        low, high = "roc_auc_ci_low", "roc_auc_ci_high"
        assert grouped[part][high] - grouped[part][low] > 0.85 * (row[high] - row[low])
        assert by_image[part][high] - by_image[part][low] < 0.85 * (row[high] - row[low])
        for name in ("recall", "specificity"):
            low, high = f"{name}_ci_low", f"{name}_ci_high"
            assert grouped[part][low] <= row[low] and grouped[part][high] >= row[high]
            assert grouped[part][high] - grouped[part][low] < 1.05 * (row[high] - row[low])
            assert by_image[part][high] - by_image[part][low] < 0.8 * (row[high] - row[low])


def test_the_design_effect_is_one_for_lone_images_two_for_copies_and_widens_wilson_by_the_effective_count():
    from fracture.evaluation import design_effect

    hits = np.array([1, 1, 0, 1, 0, 1, 1, 1])
    assert design_effect(hits, np.arange(8)) == 1.0
    assert design_effect(np.repeat(hits, 2), np.repeat(np.arange(8), 2)) == pytest.approx(2 * 8 / 7)
    assert design_effect(np.ones(6), np.array([0, 0, 0, 1, 2, 3])) == pytest.approx(6 / 4)  # each group one trial
    assert design_effect(np.array([1, 1, 1, 1, 0, 0]), np.zeros(6)) == 6.0  # one group: one trial
    # a patient whose two X-rays disagree is no less than two independent images
    assert design_effect(np.array([1, 0, 1, 0]), np.array([0, 0, 1, 1])) == 1.0
    # Wilson's for a whole number of trials, as scipy gives it; and for n / design effect trials
    assert wilson_interval(7, 10, design_effect=1 + 1e-13) == pytest.approx(wilson(7, 10), abs=1e-9)
    assert wilson_interval(14, 20, design_effect=2.0) == pytest.approx(wilson(7, 10), abs=1e-12)
    assert wilson_interval(20, 20, design_effect=2.0) == pytest.approx(wilson(10, 10), abs=1e-12)
    assert wilson_interval(0, 20, design_effect=2.0) == pytest.approx(wilson(0, 10), abs=1e-12)
    with pytest.raises(ValueError, match="design effect is at least 1"):
        wilson_interval(3, 4, design_effect=0.5)


def test_calling_one_more_image_right_never_narrows_the_effective_count_by_a_jump():
    """200 fractured images, one patient's 50 and 150 patients' one each: all caught counts each
    patient as one trial, as one missed does nearly (the patient's X-rays disagree there), so the
    lower bound does not fall from 0.97 to 0.80 for the better model; and a body part that is one
    patient's images is one trial, not six."""
    from fracture.evaluation import design_effect

    patients = np.r_[np.zeros(50, int), np.arange(1, 151)]
    everything = np.ones(200)
    one_missed = everything.copy()
    one_missed[0] = 0
    lows = [wilson_interval(int(h.sum()), 200, design_effect=design_effect(h, patients))[0] for h in (everything, one_missed)]
    assert lows[0] >= lows[1] > 0.95
    six = np.array([1, 1, 1, 1, 0, 0])
    assert design_effect(six, np.zeros(6)) == 6.0
    low, high = wilson_interval(4, 6, design_effect=design_effect(six, np.zeros(6)))
    plain = wilson(4, 6)
    assert high - low > (plain[1] - plain[0]) + 0.2  # over images: 0.30-0.90; as the one patient it is: wider


def test_a_body_part_whose_class_is_one_patients_gets_no_roc_auc_interval_and_the_card_says_why():
    """Every resample draws a lone group alike: a part whose X-rays were all one patient's showed
    a 95% interval of no width on the card, a point dressed as certainty."""
    from fracture.model_card import _part_auc

    rng = np.random.default_rng(1)
    labels = np.array([1] * 6 + [0] * 6 + [1] * 30 + [0] * 30)
    probs = np.clip(rng.normal(0.5 + 0.15 * (2 * labels - 1), 0.2), 0, 1)
    parts = np.array(["hip"] * 12 + ["hand"] * 60)
    one_patient = np.array(["patient-1"] * 12 + [f"img{i}" for i in range(60)])
    # the hip's fractured X-rays one patient's, its others each their own
    fractures_linked = np.array(["patient-1"] * 6 + [f"hip{i}" for i in range(6)] + [f"img{i}" for i in range(60)])
    for linked in (one_patient, fractures_linked):
        rows = by_group(labels, probs, parts, 0.5, linked=linked, n_resamples=200, seed=0)
        hip, hand = rows["hip"], rows["hand"]
        assert hip["roc_auc"] is not None and hip["roc_auc_ci_low"] is None and hip["roc_auc_ci_high"] is None
        assert _part_auc(hip) == f"{hip['roc_auc']:.3f} (no interval: all its fractured, or all its other, X-rays are one patient's or linked)"
        assert hand["roc_auc_ci_high"] - hand["roc_auc_ci_low"] > 0.05
        assert hip["recall_ci_low"] is not None  # Wilson's, over the effective count, still shown
    # two patients each side: resamples differ, and the interval is shown
    two = np.array(["p1", "p2"] * 3 + ["p3", "p4"] * 3 + [f"img{i}" for i in range(60)])
    hip = by_group(labels, probs, parts, 0.5, linked=two, n_resamples=200, seed=0)["hip"]
    assert hip["roc_auc_ci_high"] > hip["roc_auc_ci_low"]
    assert "no interval" not in _part_auc(hip)
    # a body_parts.json written before the intervals: the figure alone, no false reason
    assert _part_auc({"n_images": 12, "n_fractured": 6, "roc_auc": 0.75}) == "0.750"
