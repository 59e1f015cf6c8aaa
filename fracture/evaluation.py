"""Test-set metrics from predicted probabilities, computed by scikit-learn.

Besides the point metrics: stratified bootstrap confidence intervals (resampling with
``sklearn.utils.resample``), calibration (``sklearn.calibration.calibration_curve``, the
expected calibration error and the Brier score) and a breakdown by body part.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
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

#: Metrics that get a bootstrap confidence interval.
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
    """
    _, tpr, thresholds = roc_curve(labels, probs)
    index = int(np.argmax(tpr >= target_sensitivity))  # tpr rises as the threshold falls
    return float(min(thresholds[index], 1.0))


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


def _point_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    pred = (probs >= threshold).astype(int)
    return {
        "roc_auc": roc_auc_score(labels, probs),
        "recall": recall_score(labels, pred, zero_division=0),
        "specificity": recall_score(labels, pred, pos_label=0, zero_division=0),
    }


def bootstrap_intervals(
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals for ROC AUC, sensitivity and specificity.

    Each resample draws the images with replacement, stratified by label, so every resample
    keeps the test split's number of fractured images (and an AUC is always defined).

    Args:
        labels: true labels, 0 or 1.
        probs: predicted probability of class 1.
        threshold: the decision threshold for sensitivity and specificity.
        n_resamples: bootstrap resamples.
        seed: seeds the resampling, so the intervals are reproducible.
        confidence: the interval's coverage.

    Returns:
        ``metric -> (low, high)`` for each of :data:`CI_METRICS`.
    """
    rng = np.random.RandomState(seed)
    draws = {name: [] for name in CI_METRICS}
    for _ in range(n_resamples):
        y, p = resample(labels, probs, stratify=labels, random_state=rng)
        for name, value in _point_metrics(y, p, threshold).items():
            draws[name].append(value)
    tail = (1 - confidence) / 2 * 100
    return {name: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for name, v in draws.items()}


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


def by_group(
    labels: np.ndarray, probs: np.ndarray, groups: np.ndarray, threshold: float
) -> dict[str, dict[str, float | None]]:
    """Metrics per group (e.g. body part): images, fractured, ROC AUC, sensitivity, specificity.

    A metric a group cannot define (AUC with one class only, sensitivity without fractures)
    is ``None`` rather than a misleading number.
    """
    out: dict[str, dict[str, float | None]] = {}
    for group in sorted(set(groups)):
        mask = groups == group
        y, p = labels[mask], probs[mask]
        pred = (p >= threshold).astype(int)
        both = 0 < y.sum() < len(y)
        out[str(group)] = {
            "n_images": int(mask.sum()),
            "n_fractured": int(y.sum()),
            "roc_auc": float(roc_auc_score(y, p)) if both else None,
            "recall": float(recall_score(y, pred, zero_division=0)) if y.sum() else None,
            "specificity": float(recall_score(y, pred, pos_label=0, zero_division=0)) if (y == 0).any() else None,
        }
    return out
