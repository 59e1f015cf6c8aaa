"""Evaluation figures as PNG, drawn by scikit-learn's display classes.

The same curves are written as CSV for ``dvc plots``; these PNGs are what MLflow stores with
the run, so a reviewer sees them without DVC.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines

import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
from sklearn.calibration import CalibrationDisplay  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    ConfusionMatrixDisplay,
    PrecisionRecallDisplay,
    RocCurveDisplay,
)

from fracture.vocabulary import CLASSES  # noqa: E402


def save_evaluation_plots(
    labels: np.ndarray, probs: np.ndarray, threshold: float, n_bins: int, out_dir: Path
) -> list[Path]:
    """ROC, precision-recall, reliability and confusion-matrix figures of the test split.

    Args:
        labels: true labels, 0 or 1.
        probs: predicted fracture probabilities.
        threshold: the decision threshold (marked in the confusion matrix's title).
        n_bins: the reliability diagram's equal-width bins.
        out_dir: where ``roc.png``, ``pr.png``, ``calibration.png`` and ``confusion.png`` go.

    Returns:
        The written paths.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    pred = (probs >= threshold).astype(int)
    figures = {
        "roc.png": lambda ax: RocCurveDisplay.from_predictions(labels, probs, ax=ax, name="test", plot_chance_level=True),
        "pr.png": lambda ax: PrecisionRecallDisplay.from_predictions(
            labels, probs, ax=ax, name="test", plot_chance_level=True
        ),
        "calibration.png": lambda ax: CalibrationDisplay.from_predictions(
            labels, probs, n_bins=n_bins, strategy="uniform", ax=ax, name="test"
        ),
        "confusion.png": lambda ax: ConfusionMatrixDisplay.from_predictions(
            labels, pred, labels=[0, 1], display_labels=list(CLASSES), ax=ax, colorbar=False
        ),
    }
    paths = []
    for name, draw in figures.items():
        fig, ax = plt.subplots(figsize=(5, 5))
        draw(ax)
        if name == "confusion.png":
            ax.set_title(f"threshold {threshold:.4g}")
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
