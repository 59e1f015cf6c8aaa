"""Test-set metrics from predicted probabilities, all computed by scikit-learn."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    confusion: dict[str, int]
    roc: pd.DataFrame


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
    return Evaluation(
        metrics={k: float(v) for k, v in metrics.items()},
        confusion={"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
        roc=roc,
    )
