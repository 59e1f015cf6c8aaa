"""Cross-validation of a training recipe on the train and val splits pooled, never the test split.

The folds are drawn by scikit-learn's ``StratifiedGroupKFold``: stratified by label, and each
group of byte-identical files and near-duplicate X-rays (:func:`fracture.split.group_key`, the
unit the split draws) in one fold, so no copy of a held-out radiograph is trained on. The
figures are those of :mod:`fracture.evaluation`; the stage that trains the folds is
:mod:`fracture.stages.crossval`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from fracture.config import EvaluateParams, Profile, TrainParams
from fracture.data_config import DataConfig
from fracture.evaluation import (
    bootstrap_intervals,
    evaluate_probabilities,
    operating_threshold,
)
from fracture.prepare import PreparedImages
from fracture.split import group_key
from fracture.training import EpochCallback, FitResult, train
from fracture.workspace import CrossvalFold

#: Columns of the out-of-fold predictions.
OOF_COLUMNS = ["image_id", "fold", "label", "probability"]


class CrossvalError(ValueError):
    """The pooled train and val images cannot be cross-validated as asked."""


def pool_splits(train: pd.DataFrame, val: pd.DataFrame) -> pd.DataFrame:
    """The train and val tables as one, sorted by ``image_id`` (the order the folds are drawn in).

    Raises:
        CrossvalError: an image id sits in both tables (the split tables are stale or edited).
    """
    both = sorted(set(train["image_id"]) & set(val["image_id"]))
    if both:
        raise CrossvalError(
            f"outputs/split/train.csv and val.csv share {len(both)} image ids (e.g. {both[:5]}): "
            "rebuild them with `dvc repro split`"
        )
    return pd.concat([train, val]).sort_values("image_id").reset_index(drop=True)


def draw_folds(pooled: pd.DataFrame, folds: int, seed: int) -> np.ndarray:
    """The fold (1 to ``folds``) of each row of ``pooled``, whole groups at a time.

    ``StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)`` with the labels
    as ``y`` and :func:`fracture.split.group_key` as ``groups``.

    Args:
        pooled: the images (``image_id``, ``label`` and the ``sha256`` and
            ``near_duplicate_group`` columns that link a group), e.g. :func:`pool_splits`.
        folds: k, at least 2.
        seed: seeds the shuffle of the groups.

    Returns:
        One fold number per row, in ``pooled``'s order.

    Raises:
        CrossvalError: there are fewer groups than folds, or a fold lacks a class (its ROC AUC
            would be undefined).
    """
    labels = pooled["label"].astype(int).to_numpy()
    groups = group_key(pooled).to_numpy()
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    try:
        held_out = [rows for _, rows in splitter.split(np.zeros(len(pooled)), labels, groups)]
    except ValueError as exc:
        raise CrossvalError(
            f"cannot draw crossval.folds={folds} folds from {len(set(groups))} groups of train + val: {exc}; "
            "lower crossval.folds"
        ) from exc
    fold_of = np.zeros(len(pooled), dtype=int)
    for number, rows in enumerate(held_out, start=1):
        fold_of[rows] = number
    _check_both_classes(labels, fold_of, folds)
    return fold_of


def fit_fold(
    cache: PreparedImages,
    config: DataConfig,
    profile: Profile,
    params: TrainParams,
    pooled: pd.DataFrame,
    fold_of: np.ndarray,
    number: int,
    on_epoch: EpochCallback | None = None,
) -> tuple[CrossvalFold, pd.DataFrame, FitResult]:
    """Trains on every fold but ``number`` exactly as the train stage does, and scores ``number``.

    Args:
        cache: the prepared images of ``pooled``.
        config: the data config the cache was prepared with.
        profile: the recipe's profile (model, input size, epochs, ...).
        params: the ``train`` settings (optimiser, schedule, seed, device).
        pooled: the train and val images (:func:`pool_splits`).
        fold_of: each row's fold (:func:`draw_folds`).
        number: the fold held out.
        on_epoch: called after each epoch with its metrics.

    Returns:
        The fold's record, its held-out predictions (:data:`OOF_COLUMNS`, the last epoch's) and
        the fit.
    """
    fit_frame, held_out = pooled[fold_of != number], pooled[fold_of == number]
    fit = train(cache.reader(fit_frame), cache.dataset(held_out), config, profile, params, on_epoch=on_epoch)
    assert fit.final_val_probabilities is not None  # no checkpoint: every epoch ran in this call
    record = CrossvalFold(
        fold=number,
        n_train=len(fit_frame),
        n_val=len(held_out),
        n_fractured_val=int(held_out["label"].astype(int).sum()),
        roc_auc=float(fit.history[-1]["val_roc_auc"]),
        best_roc_auc=float(fit.best_val_roc_auc),
        best_epoch=fit.best_epoch,
    )
    oof = held_out.assign(fold=number, probability=fit.final_val_probabilities)[OOF_COLUMNS]
    return record, oof, fit


def _check_both_classes(labels: np.ndarray, fold_of: np.ndarray, folds: int) -> None:
    for number in range(1, folds + 1):
        fractured = int(labels[fold_of == number].sum())
        size = int((fold_of == number).sum())
        if fractured == 0 or fractured == size:
            raise CrossvalError(
                f"fold {number} of crossval.folds={folds} holds {fractured} fractured images of {size}; "
                "its ROC AUC needs both classes: lower crossval.folds"
            )


def summarise(folds: list[CrossvalFold], oof: pd.DataFrame, ev: EvaluateParams) -> dict[str, float | int]:
    """The summary of ``metrics.json``: the spread over the folds and the pooled out-of-fold figures.

    ``mean_roc_auc`` and ``std_roc_auc`` (sample standard deviation, ddof 1) are over the folds'
    last-epoch AUCs, the primary figures; ``*_best_roc_auc`` the same for the epochs the train
    stage would have selected on each held-out fold (optimistic). ``oof_roc_auc`` pools every
    image's last-epoch out-of-fold probability, with a stratified bootstrap 95% interval
    (``evaluate.bootstrap_resamples``, ``evaluate.seed``). ``oof_recall`` (sensitivity) and
    ``oof_specificity`` are at ``evaluate.threshold``, or, with ``evaluate.target_sensitivity``,
    at the highest threshold reaching it on these same predictions (so the sensitivity meets the
    target by construction; the specificity is the figure to compare).

    Args:
        folds: the per-fold records.
        oof: the out-of-fold predictions (``label``, ``probability``).
        ev: the threshold rule and the bootstrap settings.

    Returns:
        Flat keys, for DVC metrics.
    """
    final = np.array([f.roc_auc for f in folds])
    best = np.array([f.best_roc_auc for f in folds])
    labels = oof["label"].astype(int).to_numpy()
    probs = oof["probability"].astype(float).to_numpy()
    threshold = operating_threshold(ev, lambda: (labels, probs))
    point = evaluate_probabilities(labels, probs, threshold).metrics
    intervals = bootstrap_intervals(labels, probs, threshold, ev.bootstrap_resamples, ev.seed)
    return (
        {
            "n_folds": len(folds),
            "n_images": len(labels),
            "n_fractured": int(labels.sum()),
            "mean_roc_auc": float(final.mean()),
            "std_roc_auc": float(final.std(ddof=1)),
            "mean_best_roc_auc": float(best.mean()),
            "std_best_roc_auc": float(best.std(ddof=1)),
            "oof_threshold": threshold,
        }
        | {f"oof_{name}": point[name] for name in intervals}
        | {f"oof_{name}_ci_low": low for name, (low, _) in intervals.items()}
        | {f"oof_{name}_ci_high": high for name, (_, high) in intervals.items()}
    )
