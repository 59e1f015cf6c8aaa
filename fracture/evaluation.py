"""Test-set metrics from predicted probabilities, computed by scikit-learn.

Besides the point metrics: confidence intervals (ROC AUC's a stratified percentile bootstrap, over
whole groups of linked images where the groups are given (:func:`group_resamples`), else over
images with ``sklearn.utils.resample``; sensitivity's and specificity's the Wilson score
interval of a binomial proportion, from ``scipy.stats.binomtest``, at a threshold fixed in
advance (over the effective number of images where linked images are grouped,
:func:`design_effect`), or a bootstrap that chooses the threshold again in every resample where
it was chosen on the same predictions, :func:`rechosen_rate_intervals`), calibration
(``sklearn.calibration.calibration_curve``, the expected calibration error and the Brier score),
a breakdown by body part, and DeLong's test of two models' ROC AUCs on the same images
(:func:`delong_paired`), or of two recipes' means over several training runs each
(:func:`delong_mean_difference`), over groups of linked images where they are given
(Obuchowski's clustered DeLong).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import binomtest, norm, rankdata
from scipy.stats import t as student_t
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)
from sklearn.utils import resample

from fracture.config import EvaluateParams

#: Metrics that get a confidence interval: ROC AUC by bootstrap, sensitivity and specificity by Wilson score.
CI_METRICS = ("roc_auc", "recall", "specificity")


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    confusion: dict[str, int]
    roc: pd.DataFrame
    pr: pd.DataFrame


@dataclass(frozen=True)
class Calibration:
    ece: float
    brier: float
    curve: pd.DataFrame  # one row per non-empty bin: mean_predicted, fraction_fractured, count


def choose_threshold(labels: np.ndarray, probs: np.ndarray, target_sensitivity: float) -> float:
    """The highest threshold whose sensitivity on these images reaches the target.

    Chosen on the validation split, never on test, so the test metrics at this threshold are
    an honest estimate. The highest such threshold keeps specificity as high as possible.

    Args:
        labels: true labels (1 = fractured) of the validation images.
        probs: their predicted fracture probabilities.
        target_sensitivity: the sensitivity (recall of class 1) to reach, in (0, 1].

    Returns:
        The threshold, in [0, 1].

    Raises:
        ValueError: the labels lack fractured or non-fractured images: no sensitivity can be
            reached, or no specificity kept, so no threshold means anything.
    """
    fractured = int(np.sum(np.asarray(labels) == 1))
    if fractured == 0 or fractured == len(labels):
        raise ValueError(
            f"choosing a threshold for sensitivity {target_sensitivity} needs fractured and non-fractured "
            f"images, got {fractured} fractured of {len(labels)}: the validation images it is chosen on must "
            "hold both classes"
        )
    # Every distinct score is a candidate: roc_curve's default drops the points inside a run of
    # fractured images, and the target is often reached inside one.
    _, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)
    index = int(np.argmax(tpr >= target_sensitivity))  # tpr rises as the threshold falls
    return float(min(thresholds[index], 1.0))


def operating_threshold(ev: EvaluateParams, val: Callable[[], tuple[np.ndarray, np.ndarray]]) -> float:
    """The decision threshold of a model: the evaluate stage's, cross-validation's and the served one.

    Args:
        ev: ``evaluate.threshold``, or ``evaluate.target_sensitivity`` to choose it.
        val: gives the validation images' labels and fracture probabilities; called only when
            the threshold is chosen on them.

    Returns:
        ``evaluate.threshold`` when ``evaluate.target_sensitivity`` is null, else the highest
        threshold reaching that sensitivity on the validation images (:func:`choose_threshold`).
    """
    if ev.target_sensitivity is None:
        return ev.threshold
    labels, probs = val()
    return choose_threshold(labels, probs, ev.target_sensitivity)


def evaluate_probabilities(labels: np.ndarray, probs: np.ndarray, threshold: float) -> Evaluation:
    """Scores fracture probabilities against true labels (1 = fractured).

    ROC AUC and average precision use the probabilities; the other metrics use the labels
    obtained at ``threshold``. Recall is sensitivity; specificity is the recall of class 0.

    Args:
        labels: true labels, 0 or 1.
        probs: predicted probability of class 1.
        threshold: probability at or above which an image is called fractured.

    Returns:
        The metrics, the confusion counts and the ROC curve points.
    """
    pred = (probs >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, pred, labels=[0, 1]).ravel()
    metrics = {
        "accuracy": accuracy_score(labels, pred),
        "precision": precision_score(labels, pred, zero_division=0),
        "recall": recall_score(labels, pred, zero_division=0),
        "specificity": recall_score(labels, pred, pos_label=0, zero_division=0),
        "f1": f1_score(labels, pred, zero_division=0),
        "roc_auc": roc_auc_score(labels, probs),
        "average_precision": average_precision_score(labels, probs),
        "threshold": threshold,
        "n_images": len(labels),
        "n_fractured": int(labels.sum()),
    }
    fpr, tpr, thresholds = roc_curve(labels, probs)
    roc = pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(thresholds, 1.0)})
    precision, recall, _ = precision_recall_curve(labels, probs)
    return Evaluation(
        metrics={k: float(v) for k, v in metrics.items()},
        confusion={"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
        roc=roc,
        pr=pd.DataFrame({"recall": recall, "precision": precision}),
    )


def point_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """ROC AUC, and sensitivity (``recall``) and specificity at ``threshold``: what the promotion
    gate compares between a version and its champion."""
    pred = (probs >= threshold).astype(int)
    return {
        "roc_auc": roc_auc_score(labels, probs),
        "recall": recall_score(labels, pred, zero_division=0),
        "specificity": recall_score(labels, pred, pos_label=0, zero_division=0),
    }


def wilson_interval(
    successes: int, trials: int, confidence: float = 0.95, design_effect: float = 1.0
) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion, as diagnostic-accuracy reports (STARD) give
    sensitivity and specificity at a fixed threshold.

    Unlike a percentile bootstrap it keeps its width at a proportion of 0 or 1 (30 of 30 fractured
    images caught: 0.886 to 1 at 95%), and it is computed by ``scipy.stats.binomtest``. Linked
    images are fewer independent trials than images: with a ``design_effect`` above 1
    (:func:`design_effect`) the interval is Wilson's for the same proportion out of
    ``trials / design_effect`` trials, Kish's effective sample size (Newcombe's (1998) closed form,
    as ``binomtest`` computes it, at a count that need not be whole).

    Args:
        successes: images called correctly (true positives for sensitivity, true negatives for
            specificity).
        trials: images of that class, at least 1.
        confidence: the interval's coverage.
        design_effect: the variance of the proportion over linked images relative to that of as
            many independent ones, at least 1 (1: every image independent, the plain interval).

    Returns:
        ``(low, high)``.

    Raises:
        ValueError: no images of the class, more successes than images, or a design effect below 1.
    """
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"a Wilson interval needs 0 <= successes <= trials and trials >= 1, got {successes} of {trials}")
    if not design_effect >= 1:
        raise ValueError(f"a design effect is at least 1 (1: independent images), got {design_effect!r}")
    if design_effect == 1:
        ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=confidence, method="wilson")
        return float(ci.low), float(ci.high)
    n, p = trials / design_effect, successes / trials
    z = float(norm.ppf(0.5 + confidence / 2))
    denominator = 2 * (n + z**2)
    centre, half = (2 * n * p + z**2) / denominator, z / denominator * (4 * n * p * (1 - p) + z**2) ** 0.5
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == trials else centre + half)


def design_effect(hits: np.ndarray, groups: np.ndarray) -> float:
    """How much linked images inflate the variance of a proportion, for :func:`wilson_interval`.

    Rao & Scott's (1992) ratio-estimator design effect: the variance of ``hits.mean()`` over
    whole groups, ``k / (k - 1) * sum_i (y_i - p * n_i)^2 / n^2`` for group ``i``'s ``y_i`` hits
    among its ``n_i`` images and ``k`` groups, over the binomial ``p (1 - p) / n``. Groups of one
    image give exactly 1; every image stored twice, about 2 (``2 k / (k - 1)``). Where no image is
    missed (or none hit) nothing shows how alike a group's images are, and each group counts as one
    trial (``n / k``: 2 for copies, and no jump from the next count's estimate, as counting a large
    group's images as copies would make); one group alone is one trial (``n``), since nothing then
    shows its spread. Never below 1: a few groups that happen to disagree within do not make the
    images more than independent.

    Args:
        hits: 1 where an image of the class was called right, else 0.
        groups: each image's group of linked images, in the order of ``hits``.

    Returns:
        The design effect, at least 1.
    """
    hits = np.asarray(hits, dtype=np.float64)
    _, code = np.unique(np.asarray(groups), return_inverse=True)
    sizes = np.bincount(code.ravel())
    if len(hits) == 0 or sizes.max() == 1:
        return 1.0
    n, k, p = len(hits), len(sizes), float(hits.mean())
    if k == 1:
        return float(n)
    if p in (0.0, 1.0):
        return n / k
    residual = np.bincount(code.ravel(), weights=hits) - p * sizes
    return max(1.0, k / (k - 1) * float(residual @ residual) / (n * p * (1 - p)))


def _rate_intervals(
    labels: np.ndarray, pred: np.ndarray, confidence: float, groups: np.ndarray | None = None
) -> dict[str, tuple[float, float] | None]:
    """Wilson intervals of sensitivity (``recall``) and specificity, widened by each class's design
    effect over ``groups`` of linked images when given; ``None`` for a class with no images."""
    labels, pred = np.asarray(labels), np.asarray(pred)
    out: dict[str, tuple[float, float] | None] = {}
    for name, cls in (("recall", 1), ("specificity", 0)):
        rows = labels == cls
        hits = pred[rows] == cls
        effect = 1.0 if groups is None else design_effect(hits, np.asarray(groups)[rows])
        out[name] = wilson_interval(int(hits.sum()), int(rows.sum()), confidence, effect) if rows.any() else None
    return out


def group_resamples(
    labels: np.ndarray, groups: np.ndarray, n_resamples: int, seed: int
) -> Iterator[np.ndarray]:
    """The rows of each resample of a cluster bootstrap: whole groups drawn with replacement.

    Linked images (byte-identical files, near-duplicates, one patient's: the split's ``group``,
    :func:`fracture.split.group_key`) are not independent evidence, so each resample draws
    groups, not images. The draw is stratified by what a group holds (only fractured images, only
    non-fractured ones, or both), each stratum drawing as many groups as it has, so every resample
    holds both classes whenever the data does. Groups of one image (no links) make it the
    label-stratified bootstrap over images.

    Args:
        labels: true labels, 0 or 1, one per image.
        groups: each image's group key (any hashable, sortable values), in the order of ``labels``.
        n_resamples: how many resamples.
        seed: seeds the draw (``numpy.random.RandomState``).

    Yields:
        For each resample, the row indices it holds (a group drawn twice counted twice).

    Raises:
        ValueError: ``groups`` and ``labels`` differ in length.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    if len(groups) != len(labels):
        raise ValueError(f"one group key per image is needed: {len(groups)} keys for {len(labels)} images")
    _, code = np.unique(groups, return_inverse=True)  # groups numbered in the order of their keys
    code = code.ravel()
    sizes = np.bincount(code)
    order = np.argsort(code, kind="stable")
    members = np.split(order, np.cumsum(sizes)[:-1])  # each group's rows
    fractured = np.bincount(code, weights=labels == 1, minlength=len(sizes))
    kind = np.where(fractured == 0, 0, np.where(fractured == sizes, 1, 2))  # none, all or some fractured
    strata = [stratum for stratum in (np.flatnonzero(kind == k) for k in range(3)) if len(stratum)]
    rng = np.random.RandomState(seed)
    for _ in range(n_resamples):
        drawn = np.concatenate([stratum[rng.randint(0, len(stratum), len(stratum))] for stratum in strata])
        yield np.concatenate([members[g] for g in drawn])


def _percentile_interval(values: Sequence[float], confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def confidence_intervals(
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    groups: np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
    """Confidence intervals of the test figures: ROC AUC by bootstrap, sensitivity and specificity by Wilson.

    ROC AUC: a percentile bootstrap. With ``groups``, each resample draws whole groups of linked
    images with replacement (:func:`group_resamples`, stratified by whether a group holds
    fractured images), as the split and the folds keep them together: copies and one patient's
    images are not independent evidence, and counting them so narrows the interval (each image
    stored twice made the image bootstrap's 27% narrower). Without, each resample draws the
    images with replacement, stratified by label, so every resample keeps the split's number of
    fractured images (and an AUC is always defined). Sensitivity and specificity: at a threshold
    fixed before the test split is scored (``evaluate.threshold``, or chosen on val) each is a
    binomial proportion, given the Wilson score interval (:func:`wilson_interval`), which a
    percentile bootstrap is not: its interval collapses to a point when every image of a class is
    called right (or wrong). With ``groups`` the Wilson interval counts the class's images as
    ``n / design effect`` (:func:`design_effect`, Rao & Scott 1992), not ``n``: every image
    stored twice leaves it about as for the images stored once, where counting each copy narrowed it.
    A cluster bootstrap of the rates would collapse at 0 and 1 as the image bootstrap did, so the
    design effect widens Wilson's interval instead (in 400 simulated datasets of 40 patients of
    five X-rays whose calls mostly agree, it covered the true sensitivity in 94.5%, Wilson's over
    images in 72%; ``tests/test_grouped_statistics.py``).

    Args:
        labels: true labels, 0 or 1, both present.
        probs: predicted probability of class 1.
        threshold: the decision threshold for sensitivity and specificity.
        n_resamples: bootstrap resamples for ROC AUC, at least 1.
        seed: seeds the resampling, so the intervals are reproducible.
        confidence: the intervals' coverage.
        groups: each image's group key (the split tables' ``group``,
            :func:`fracture.split.group_key`); ``None``: every image independent, resampled alone
            and counted as one trial.

    Returns:
        ``metric -> (low, high)`` for each of :data:`CI_METRICS`.

    Raises:
        ValueError: fewer than 1 resample, one class missing, or ``groups`` of another length.
    """
    _check_bootstrap(labels, n_resamples)
    rates = _rate_intervals(labels, (probs >= threshold).astype(int), confidence, groups)
    return {"roc_auc": auc_interval(labels, probs, n_resamples, seed, confidence, groups)} | rates


def auc_interval(
    labels: np.ndarray,
    probs: np.ndarray,
    n_resamples: int,
    seed: int,
    confidence: float = 0.95,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """ROC AUC's percentile bootstrap interval, as :func:`confidence_intervals` draws it: whole
    groups of linked images with ``groups`` (:func:`group_resamples`), else images stratified by label.

    Raises:
        ValueError: fewer than 1 resample, or one class missing.
    """
    _check_bootstrap(labels, n_resamples)
    if groups is None:
        rng = np.random.RandomState(seed)
        aucs = []
        for _ in range(n_resamples):
            y, p = resample(labels, probs, stratify=labels, random_state=rng)
            aucs.append(roc_auc_score(y, p))
    else:
        y, p = np.asarray(labels), np.asarray(probs)
        aucs = [roc_auc_score(y[rows], p[rows]) for rows in group_resamples(y, groups, n_resamples, seed)]
    return _percentile_interval(aucs, confidence)


def _check_bootstrap(labels: np.ndarray, n_resamples: int) -> None:
    if not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"the bootstrap needs at least 1 resample (evaluate.bootstrap_resamples), got {n_resamples!r}")
    fractured = int(np.sum(labels == 1))
    if fractured == 0 or fractured == len(labels):
        raise ValueError(f"intervals need fractured and non-fractured images, got {fractured} fractured of {len(labels)}")


def rechosen_rate_intervals(
    labels: np.ndarray,
    probs: np.ndarray,
    target_sensitivity: float,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    groups: np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
    """Intervals of sensitivity and specificity when the threshold is chosen on the same predictions.

    A Wilson interval holds the threshold fixed; chosen on the very images it is scored on (the
    pooled out-of-fold predictions), the threshold moves with them, and the Wilson interval of
    the specificity covered the truth in 69% of simulated datasets at a nominal 95% (that of the
    sensitivity, which meets the target by construction, says nothing). Here the whole procedure
    is bootstrapped: in every resample (:func:`group_resamples`, whole groups; each image a group
    of its own without ``groups``) the threshold is chosen again (:func:`choose_threshold`) and
    both rates are computed at it; the intervals are those rates' percentiles (in a
    simulation of 200 datasets of 300 images at a target of 0.85, the specificity's covered the
    truth in 96.5%, Wilson's in 63%). The sensitivity's stays at or above the target by
    construction; the specificity's is the one to read.

    Args:
        labels: true labels, 0 or 1, both present.
        probs: predicted probability of class 1.
        target_sensitivity: the sensitivity the threshold is chosen to reach.
        n_resamples: bootstrap resamples, at least 1.
        seed: seeds the resampling.
        confidence: the intervals' coverage.
        groups: each image's group key; ``None``: every image a group of its own.

    Returns:
        ``{"recall": (low, high), "specificity": (low, high)}``.

    Raises:
        ValueError: fewer than 1 resample, one class missing, or ``groups`` of another length.
    """
    labels, probs = np.asarray(labels), np.asarray(probs)
    _check_bootstrap(labels, n_resamples)
    keys = np.arange(len(labels)) if groups is None else groups
    rates: dict[str, list[float]] = {"recall": [], "specificity": []}
    for rows in group_resamples(labels, keys, n_resamples, seed):
        y, p = labels[rows], probs[rows]
        called = p >= choose_threshold(y, p, target_sensitivity)
        rates["recall"].append(float(np.mean(called[y == 1])))
        rates["specificity"].append(float(np.mean(~called[y == 0])))
    return {name: _percentile_interval(values, confidence) for name, values in rates.items()}


def calibration(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> Calibration:
    """Reliability curve, expected calibration error (ECE) and Brier score.

    The curve uses equal-width probability bins (``calibration_curve(strategy="uniform")``);
    the ECE is the bin-size-weighted mean gap between the fraction of fractured images and
    the mean predicted probability in each bin.

    Args:
        labels: true labels, 0 or 1.
        probs: predicted probability of class 1.
        n_bins: number of equal-width bins over [0, 1].
    """
    fraction, mean_predicted = calibration_curve(labels, probs, n_bins=n_bins, strategy="uniform")
    # calibration_curve drops empty bins; the same edges give the counts of the bins it kept.
    counts = np.bincount(np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], probs), minlength=n_bins)
    counts = counts[counts > 0]
    ece = float(np.sum(counts / len(probs) * np.abs(fraction - mean_predicted)))
    curve = pd.DataFrame({"mean_predicted": mean_predicted, "fraction_fractured": fraction, "count": counts})
    return Calibration(ece=ece, brier=float(brier_score_loss(labels, probs)), curve=curve)


#: The fewest groups of linked images holding fractured images, and holding non-fractured ones,
#: from which a body part's ROC AUC gets a bootstrap interval.
MIN_GROUPS_FOR_AUC_INTERVAL = 2


def _independent(labels: np.ndarray, links: np.ndarray | None) -> int:
    """The fewer of the groups of linked images (each image its own without ``links``) holding a
    fractured image and holding a non-fractured one."""
    keys = np.arange(len(labels)) if links is None else np.asarray(links)
    return min(len(set(keys[labels == 1].tolist())), len(set(keys[labels == 0].tolist())))


def by_group(
    labels: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray,
    threshold: float,
    confidence: float = 0.95,
    linked: np.ndarray | None = None,
    n_resamples: int = 0,
    seed: int = 0,
) -> dict[str, dict[str, float | None]]:
    """Metrics per group (e.g. body part): images, fractured, ROC AUC, sensitivity, specificity.

    Sensitivity and specificity carry their Wilson score intervals (``recall_ci_low`` /
    ``recall_ci_high``, ``specificity_ci_low`` / ``specificity_ci_high``), as the whole split's
    do (over the effective number of images where ``linked`` groups them, :func:`design_effect`,
    each part's own), so a group with few images shows how little its figures say. With
    ``n_resamples``, ROC AUC carries its bootstrap interval (``roc_auc_ci_low`` /
    ``roc_auc_ci_high``, :func:`auc_interval` over the group's own images, drawing linked ones
    together), as the whole split's does, when at least :data:`MIN_GROUPS_FOR_AUC_INTERVAL`
    groups of linked images hold each class (a part whose X-rays are all one patient's would be
    drawn alike in every resample: an interval of no width). A metric a group cannot define (AUC
    with one class only, sensitivity without fractures) is ``None``, with its interval, rather
    than a misleading number.

    Args:
        labels: true labels, 0 or 1.
        probs: predicted probability of class 1.
        groups: each image's group.
        threshold: the decision threshold for sensitivity and specificity.
        confidence: the intervals' coverage.
        linked: each image's group of linked images (the split table's ``group``); ``None``:
            every image independent.
        n_resamples: bootstrap resamples of each group's ROC AUC; 0: no interval (``None``).
        seed: seeds each group's bootstrap.

    Returns:
        ``group -> metric -> value``, groups sorted by name.

    Raises:
        ValueError: ``linked`` of another length than ``labels``, or negative ``n_resamples``.
    """
    if linked is not None and len(linked) != len(labels):
        raise ValueError(f"one linked-images group per image is needed: {len(linked)} for {len(labels)} images")
    if n_resamples < 0:
        raise ValueError(f"the bootstrap needs 0 (no interval) or more resamples (evaluate.bootstrap_resamples), got {n_resamples}")
    out: dict[str, dict[str, float | None]] = {}
    for group in sorted(set(groups)):
        mask = groups == group
        y, p = labels[mask], probs[mask]
        pred = (p >= threshold).astype(int)
        both = 0 < y.sum() < len(y)
        links = None if linked is None else np.asarray(linked)[mask]
        intervals = _rate_intervals(y, pred, confidence, links)
        resampled = both and n_resamples and _independent(y, links) >= MIN_GROUPS_FOR_AUC_INTERVAL
        intervals["roc_auc"] = auc_interval(y, p, n_resamples, seed, confidence, links) if resampled else None
        row: dict[str, float | None] = {
            "n_images": int(mask.sum()),
            "n_fractured": int(y.sum()),
            "roc_auc": float(roc_auc_score(y, p)) if both else None,
            "recall": float(recall_score(y, pred, zero_division=0)) if y.sum() else None,
            "specificity": float(recall_score(y, pred, pos_label=0, zero_division=0)) if (y == 0).any() else None,
        }
        for name, interval in intervals.items():
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = interval if interval else (None, None)
        out[str(group)] = row
    return out


#: Why a paired test of two ROC AUCs shows no interval (:attr:`PairedAUC.no_interval`): the two
#: rank every image alike (each image has as many images of the other class below it under both), so
#: DeLong's variance is 0 and there is no difference to measure.
SAME_RANKING = "same ranking"
#: The difference is the same at every image (each model separates the classes perfectly, inversely
#: or not at all): DeLong's variance is 0 however real the difference, so it gives no interval and
#: no p-value; where one run a side is compared, the p-value is a paired randomisation test's.
NO_VARIANCE = "no variance"
#: Fewer than two images (or groups of linked images) of a class: no spread can be estimated, the
#: interval is the whole range (-1 to 1) and the p-value 1.
TOO_FEW = "too few"


@dataclass(frozen=True)
class PairedAUC:
    """Two models' ROC AUCs on the same images and DeLong's test of their difference.

    Attributes:
        auc_a: model A's ROC AUC.
        auc_b: model B's ROC AUC.
        difference: ``auc_a - auc_b``.
        ci_low: lower end of the difference's two-sided interval at ``confidence``.
        ci_high: its upper end.
        p_value: two-sided p-value of "the two AUCs are equal".
        confidence: the interval's coverage.
        n_images: images both were scored on.
        n_fractured: fractured images among them.
        n_groups: the groups of linked images the variance was estimated over (Obuchowski's
            clustered DeLong); ``None``: each image independent.
        no_interval: why DeLong's variance gave no interval (:data:`SAME_RANKING`,
            :data:`NO_VARIANCE`, :data:`TOO_FEW`), or ``""`` where it gave one. ``ci_low`` and
            ``ci_high`` are then no confidence interval: equal to ``difference`` (no width, which is
            no certainty), or -1 and 1.
        test: what the p-value comes from: ``DeLong``, ``paired randomisation`` (DeLong's variance
            0, one run a side), or ``none`` (nothing measured: the p-value is 1 by convention).
    """

    auc_a: float
    auc_b: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    confidence: float
    n_images: int
    n_fractured: int
    n_groups: int | None = None
    no_interval: str = ""
    test: str = "DeLong"

    def evidence(self) -> str:
        """The difference's evidence in words, as the gate, its report and ``crossval-compare`` print it:
        ``95% CI -0.0101 to +0.0125, DeLong p = 0.84``, or, where DeLong's variance gave no interval,
        why not and where the p-value (if any) comes from. A zero-width interval printed as
        ``+0.0000 to +0.0000`` read as certainty where there was no spread to measure."""
        p = f"{self.p_value:.3g}" if self.p_value > 0 else "< 1e-300"  # 0 is the normal tail underflowing
        if self.no_interval == SAME_RANKING:
            return ("no interval: the two rank the fractured against the non-fractured images alike, image by image, "
                    "so there is no difference to measure")
        if self.no_interval == NO_VARIANCE:
            found = (f"paired randomisation test p = {p}" if self.test == "paired randomisation"
                     else "no p-value can be measured")
            return ("no interval: the difference is the same at every image (each model separates the classes "
                    f"perfectly, inversely or not at all), which leaves DeLong's variance at 0 however real it is; {found}")
        if self.no_interval == TOO_FEW:
            kind = "groups of linked images" if self.n_groups is not None else "images"
            return f"nothing measured: a class has fewer than two {kind}, so no spread can be estimated"
        return f"{self.confidence:.0%} CI {self.ci_low:+.4f} to {self.ci_high:+.4f}, {self.test} p = {p}"


def delong_paired(
    labels: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    confidence: float = 0.95,
    groups: np.ndarray | None = None,
) -> PairedAUC:
    """DeLong's test for the difference of two correlated ROC AUCs (the same images, two models).

    DeLong, DeLong & Clarke-Pearson (1988), computed with midranks as in Sun & Xu (2014): each
    AUC is the mean of its structural components, and the covariance of the two AUCs comes
    from the covariances of those components over the fractured and the non-fractured images.
    The interval and the p-value use the normal approximation, as ``pROC::roc.test`` does.
    With ``groups`` of linked images, the variance is estimated over groups, not images
    (Obuchowski 1997; see :func:`delong_mean_difference`).

    Args:
        labels: true labels, 0 or 1, both present.
        scores_a: model A's fracture probability for each image.
        scores_b: model B's, for the same images in the same order.
        confidence: coverage of the difference's interval.
        groups: each image's group of linked images (the split table's ``group``); ``None``:
            every image independent.

    Returns:
        Both AUCs, the difference, its interval and the two-sided p-value. Two models that
        rank every image alike have a difference of 0 with no spread: p-value 1.

    Raises:
        ValueError: lengths differ, or one class is missing.
    """
    return delong_mean_difference(labels, [scores_a], [scores_b], confidence, groups=groups)


def _swap_test(
    labels: np.ndarray, a: np.ndarray, b: np.ndarray, difference: float, code: np.ndarray, draws: int = 9_999
) -> float:
    """Two-sided p-value of a paired randomisation test of ``AUC(a) - AUC(b)``: under no difference
    each image's two scores are exchangeable, so they are swapped at random (seeded), a group of
    linked images (``code``, :func:`_group_codes`) all at once, and the p-value is the share of
    draws at least as far from 0 as ``difference``, counting the data's own."""
    swap = (np.random.default_rng(0).random((draws, int(code.max()) + 1)) < 0.5)[:, code]
    pos = labels == 1
    m, n = int(pos.sum()), int((~pos).sum())

    def aucs(scores: np.ndarray) -> np.ndarray:
        ranks = rankdata(np.concatenate([scores[:, pos], scores[:, ~pos]], axis=1), axis=1)
        return (ranks[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)

    drawn = aucs(np.where(swap, b, a)) - aucs(np.where(swap, a, b))
    return float((1 + np.sum(np.abs(drawn) >= abs(difference) - 1e-12)) / (draws + 1))


def _group_codes(groups: np.ndarray | None, n: int) -> np.ndarray:
    """Each image's group as 0, 1, ... in the order the groups first appear (groups of one image:
    ``0 .. n-1``, as with no groups)."""
    if groups is None:
        return np.arange(n)
    groups = np.asarray(groups)
    if len(groups) != n:
        raise ValueError(f"one group key per image is needed: {len(groups)} keys for {n} images")
    _, first, code = np.unique(groups, return_index=True, return_inverse=True)
    order = np.empty(len(first), dtype=np.intp)
    order[np.argsort(first, kind="stable")] = np.arange(len(first))
    return order[code.ravel()]


def _clustered_variance(
    code: np.ndarray, pos: np.ndarray, parts_pos: np.ndarray, parts_neg: np.ndarray
) -> float:
    """Obuchowski's (1997) variance of a contrast of AUCs, from its structural components'
    deviations (``parts_pos``: one per fractured image, ``parts_neg``: one per other image, each
    already the contrast's weighted sum over the runs): summed within each group, squared, summed
    over groups. Each class's part carries its own small-sample factor ``k / (k - 1)`` (``k``: the
    groups holding that class) where Obuchowski's carries ``I / (I - 1)`` over all ``I`` groups, so
    that groups of one image give DeLong's ``1 / (m - 1)`` and ``1 / (n - 1)`` exactly; where every
    group holds both classes the two are the same."""
    m, n = len(parts_pos), len(parts_neg)
    k_pos, k_neg = len(np.unique(code[pos])), len(np.unique(code[~pos]))
    size = int(code.max()) + 1
    per_group = (
        np.bincount(code[pos], weights=parts_pos, minlength=size) * (k_pos / (k_pos - 1)) ** 0.5 / m
        + np.bincount(code[~pos], weights=parts_neg, minlength=size) * (k_neg / (k_neg - 1)) ** 0.5 / n
    )
    return float(per_group @ per_group)


def delong_mean_difference(
    labels: np.ndarray,
    runs_a: Sequence[np.ndarray],
    runs_b: Sequence[np.ndarray],
    confidence: float = 0.95,
    between_run_variance: float = 0.0,
    between_run_df: int | None = None,
    groups: np.ndarray | None = None,
) -> PairedAUC:
    """The mean ROC AUC of A's runs minus that of B's, all scored on the same images.

    One run per side is :func:`delong_paired`. With several (one recipe trained under several
    seeds), the difference is of the means, and its variance over the images is DeLong's for
    that contrast of correlated AUCs: ``c' S c``, where ``S`` is the covariance of every run's
    AUC from their structural components and ``c`` weighs each of A's runs ``1/len(runs_a)``
    and each of B's ``-1/len(runs_b)``. That variance holds the runs fixed; how far a recipe
    moves between training runs is another source, added as ``between_run_variance`` (the
    law of total variance: the images' part given the runs, plus the runs' part). When that
    part is estimated from a few runs (``between_run_df`` degrees of freedom), the interval and
    p-value use Student's t with the Welch-Satterthwaite degrees of freedom of the sum (the
    images' part counted as exact), not the normal approximation.

    Linked images (copies, near-duplicates, one patient's) are not independent evidence: counted
    as such, every image stored twice shrank the variance by half and the p-value with it. With
    ``groups``, the variance is Obuchowski's (1997, "Nonparametric analysis of clustered ROC
    curve data", Biometrics 53:567-578): each image's structural components are summed within its
    group, and the variance and covariance are estimated across groups (:func:`_clustered_variance`).
    Groups of one image give DeLong's variance (to rounding). The spread then needs two groups
    holding each class, where DeLong's needs two images. In 300 simulated pairs of equally good
    models on 80 patients of four X-rays each, DeLong over images rejected at a nominal 5% in
    31%, over patients in 4% (``tests/test_grouped_statistics.py``).

    Args:
        labels: true labels, 0 or 1, both present.
        runs_a: each of A's runs' fracture probabilities, in the images' order.
        runs_b: B's, for the same images in the same order.
        confidence: coverage of the difference's interval.
        between_run_variance: the variance of the difference between training runs, on these
            images (0: the runs' predictions are taken as fixed).
        between_run_df: the degrees of freedom ``between_run_variance`` was estimated with;
            ``None``: the normal approximation.
        groups: each image's group of linked images; ``None``: every image independent.

    Returns:
        The two means as ``auc_a`` and ``auc_b``, their difference, its interval (normal
        approximation, or Student's t as above) and the two-sided p-value. Runs that rank every image alike, with no
        between-run variance, differ by 0 with no spread: p-value 1, ``no_interval`` :data:`SAME_RANKING`.
        A difference with no spread (:data:`NO_VARIANCE`) gets no interval either (its ends equal the
        difference), and one run a side the p-value of a paired randomisation test. With fewer than two
        images (or groups) of a class no spread can be estimated (:data:`TOO_FEW`): the interval is -1 to 1
        and the p-value 1.

    Raises:
        ValueError: a side without runs, lengths that differ (groups' too), a score that is not a
            finite number, or one class missing.
    """
    y = np.asarray(labels).astype(int)
    runs = [np.asarray(s, dtype=np.float64) for s in (*runs_a, *runs_b)]
    if not runs_a or not runs_b:
        raise ValueError(f"each side needs a run at least: {len(runs_a)} and {len(runs_b)}")
    if any(len(s) != len(y) for s in runs):
        raise ValueError(f"labels and scores differ in length: {len(y)}, {', '.join(str(len(s)) for s in runs)}")
    # A NaN ranks nowhere: it left every AUC, the interval and the p-value NaN, read as "not higher".
    for side, side_runs in (("A", runs_a), ("B", runs_b)):
        for i, s in enumerate(side_runs, 1):
            if (bad := int((~np.isfinite(np.asarray(s, dtype=np.float64))).sum())):
                raise ValueError(f"DeLong's test needs a finite score for every image: model {side}'s run {i} has {bad} "
                                 "NaN or infinite score(s)")
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m == 0 or n == 0:
        raise ValueError(f"DeLong's test needs both classes: {m} fractured, {n} not fractured")
    aucs, v_pos, v_neg = [], [], []
    for s in runs:
        x, z = s[pos], s[neg]
        rank_x, rank_z, rank_all = rankdata(x), rankdata(z), rankdata(np.concatenate([x, z]))
        aucs.append((rank_all[:m].sum() - m * (m + 1) / 2) / (m * n))
        v_pos.append((rank_all[:m] - rank_x) / n)  # per fractured image: share of negatives ranked below it
        v_neg.append(1.0 - (rank_all[m:] - rank_z) / m)  # per negative: share of fractured ranked above it
    weights = np.array([1 / len(runs_a)] * len(runs_a) + [-1 / len(runs_b)] * len(runs_b))
    code = _group_codes(groups, len(y))
    spread = len(np.unique(code[pos])) > 1 and len(np.unique(code[neg])) > 1
    images = 0.0
    if spread and groups is None:
        cov = np.atleast_2d(np.cov(np.vstack(v_pos))) / m + np.atleast_2d(np.cov(np.vstack(v_neg))) / n
        images = max(float(weights @ cov @ weights), 0.0)
    elif spread:
        centred = np.array(aucs)[:, None]
        images = _clustered_variance(code, pos, weights @ (np.vstack(v_pos) - centred),
                                     weights @ (np.vstack(v_neg) - centred))
    variance = images + max(float(between_run_variance), 0.0)
    auc_a, auc_b = float(np.mean(aucs[: len(runs_a)])), float(np.mean(aucs[len(runs_a):]))
    difference = auc_a - auc_b
    no_interval, test = "", "DeLong"
    if not spread:
        # One image (or group) of a class: the images' spread cannot be estimated, so nothing is shown.
        low, high, p = -1.0, 1.0, 1.0
        no_interval, test = TOO_FEW, "none"
    elif variance <= 1e-15:
        # No spread to estimate: identical rankings (the AUCs agree), or rankings each without
        # spread of its own (a perfect separation against a perfect inversion, or against constant
        # scores). DeLong's variance is then zero whether or not the difference is real, and
        # reading that as certainty let a random model "beat" a constant one at 2 images a class
        # in 1 draw of 6. The interval has no width to show; the p-value comes from a paired
        # randomisation test instead (each image's two scores swapped at random).
        # Neither case is certainty: ``no_interval`` says which it is, and the gate decides on the
        # randomisation test's p-value, never on the interval's missing width.
        low = high = difference
        single = len(runs_a) == len(runs_b) == 1
        moved = abs(difference) >= 1e-12
        p = _swap_test(y, runs[0], runs[1], difference, code) if single and moved else 1.0
        no_interval = NO_VARIANCE if moved else SAME_RANKING
        test = "paired randomisation" if single and moved else "none"
    else:
        se = variance**0.5
        runs_part = variance - images
        law = norm
        if between_run_df is not None and runs_part > 0:
            law = student_t(df=variance**2 * between_run_df / runs_part**2)  # Welch-Satterthwaite
        half = float(law.ppf(0.5 + confidence / 2)) * se
        low, high = difference - half, difference + half
        p = float(2 * law.sf(abs(difference) / se))
    n_groups = None if groups is None else int(code.max()) + 1
    return PairedAUC(auc_a, auc_b, difference, low, high, p, confidence, m + n, m, n_groups, no_interval, test)
