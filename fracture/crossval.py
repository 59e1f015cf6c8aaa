"""Cross-validation of a training recipe on the train and val splits pooled, never the test split.

The folds are drawn by scikit-learn's ``StratifiedGroupKFold``: stratified by label, and each
group of byte-identical files and near-duplicate X-rays (:func:`fracture.split.group_key`, the
unit the split draws) in one fold, so no copy of a held-out radiograph is trained on. The
figures are those of :mod:`fracture.evaluation`; the stage that trains the folds is
:mod:`fracture.stages.crossval`.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from fracture.config import EvaluateParams, Profile, TrainParams
from fracture.data_config import DataConfig
from fracture.evaluation import (
    PairedAUC,
    confidence_intervals,
    delong_mean_difference,
    evaluate_probabilities,
    operating_threshold,
    rechosen_rate_intervals,
)
from fracture.prepare import PreparedImages
from fracture.split import group_key
from fracture.training import EpochCallback, FitResult, fit_members
from fracture.workspace import CrossvalFold, Workspace, read_table

#: Columns of the out-of-fold predictions, those every run's must hold. The crossval stage writes
#: each image's ``group`` of linked images (:func:`oof_groups`) after them; predictions written
#: before it did lack it, and are compared image by image (:func:`compare_oof`).
OOF_COLUMNS = ["image_id", "fold", "label", "probability"]

#: The out-of-fold predictions' column of each image's group of linked images (:func:`oof_groups`),
#: as the split tables name theirs.
GROUP_COLUMN = "group"


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
        pooled: the images (``image_id``, ``label`` and the ``sha256``,
            ``near_duplicate_group`` and ``patient_id`` columns that link a group), e.g.
            :func:`pool_splits`.
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
        with warnings.catch_warnings():
            # A class with fewer images than folds leaves a fold without it, which is refused below
            # naming crossval.folds: scikit-learn's warning only printed above that one-line error.
            warnings.filterwarnings("ignore", message="The least populated class in y", category=UserWarning)
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


def oof_groups(pooled: pd.DataFrame, oof: pd.DataFrame) -> np.ndarray:
    """Each out-of-fold row's group: :func:`fracture.split.group_key` of ``pooled``, as :func:`draw_folds` uses it.

    Args:
        pooled: the train and val images the folds were drawn from (:func:`pool_splits`).
        oof: their out-of-fold predictions (``image_id``), in any order.

    Raises:
        CrossvalError: an out-of-fold image that ``pooled`` lacks.
    """
    key = pd.Series(group_key(pooled).to_numpy(), index=pooled["image_id"].to_numpy())
    missing = sorted(set(oof["image_id"]) - set(key.index))
    if missing:
        raise CrossvalError(f"{len(missing)} out-of-fold image(s) are not in train + val (e.g. {missing[:5]})")
    return oof["image_id"].map(key).to_numpy()


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
        The fold's record, its held-out predictions (:data:`OOF_COLUMNS`, the last epoch's; an
        ensemble's with each member's own, ``probability_member_<k>``: a seed's, or under
        ``snapshots`` the k-th snapshot's) and
        the fit.
    """
    fit_frame, held_out = pooled[fold_of != number], pooled[fold_of == number]
    fit = fit_members(cache.reader(fit_frame), cache.dataset(held_out), config, profile, params, on_epoch=on_epoch)
    assert fit.final_val_probabilities is not None  # no checkpoint: every epoch ran in this call
    record = CrossvalFold(
        fold=number,
        n_train=len(fit_frame),
        n_val=len(held_out),
        n_fractured_val=int(held_out["label"].astype(int).sum()),
        # The last epoch's scores: one network's, or the mean of an ensemble's members'.
        roc_auc=float(roc_auc_score(held_out["label"].astype(int), fit.final_val_probabilities)),
        best_roc_auc=float(fit.best_val_roc_auc),
        best_epoch=fit.best_epoch,
    )
    oof = held_out.assign(fold=number, probability=fit.final_val_probabilities)[OOF_COLUMNS]
    # An ensemble's members each hold the fold out too: their own probabilities, to compare with one network.
    for member, probs in enumerate(fit.member_final_val_probabilities, start=1):
        oof[f"probability_member_{member}"] = probs
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


def _operating_point(labels: np.ndarray, probs: np.ndarray, ev: EvaluateParams) -> tuple[float, dict[str, float]]:
    """The threshold ``ev``'s rule picks on these same predictions, and the metrics at it."""
    threshold = operating_threshold(ev, lambda: (labels, probs))
    return threshold, evaluate_probabilities(labels, probs, threshold).metrics


def summarise(
    folds: list[CrossvalFold], oof: pd.DataFrame, ev: EvaluateParams, groups: np.ndarray | None = None
) -> dict[str, float | int]:
    """The summary of ``metrics.json``: the spread over the folds and the pooled out-of-fold figures.

    ``mean_roc_auc`` and ``std_roc_auc`` (sample standard deviation, ddof 1) are over the folds'
    last-epoch AUCs, the primary figures; ``*_best_roc_auc`` the same for the epochs the train
    stage would have selected on each held-out fold (optimistic). ``oof_roc_auc`` pools every
    image's last-epoch out-of-fold probability, with a stratified bootstrap 95% interval
    (``evaluate.bootstrap_resamples``, ``evaluate.seed``) over whole groups of linked images
    (``groups``, as the folds keep them together; :func:`fracture.evaluation.group_resamples`).
    ``oof_recall`` (sensitivity) and ``oof_specificity`` are at ``evaluate.threshold``, with
    Wilson intervals, or, with ``evaluate.target_sensitivity``, at the highest threshold
    reaching it on these same predictions (so the sensitivity meets the target by construction;
    the specificity is the figure to compare). That threshold is not fixed in advance, so their
    intervals bootstrap the choice too: the threshold chosen again in every resample
    (:func:`fracture.evaluation.rechosen_rate_intervals`, the same groups and seed).

    Args:
        folds: the per-fold records.
        oof: the out-of-fold predictions (``label``, ``probability``).
        ev: the threshold rule and the bootstrap settings.
        groups: each ``oof`` row's group (:func:`fracture.split.group_key` of the pooled train
            and val images, as :func:`draw_folds` draws them), e.g. :func:`oof_groups`; ``None``:
            every image independent.

    Returns:
        Flat keys, for DVC metrics.
    """
    final = np.array([f.roc_auc for f in folds])
    best = np.array([f.best_roc_auc for f in folds])
    labels = oof["label"].astype(int).to_numpy()
    probs = oof["probability"].astype(float).to_numpy()
    threshold, point = _operating_point(labels, probs, ev)
    intervals = confidence_intervals(labels, probs, threshold, ev.bootstrap_resamples, ev.seed, groups=groups)
    if ev.target_sensitivity is not None:
        intervals |= rechosen_rate_intervals(
            labels, probs, ev.target_sensitivity, ev.bootstrap_resamples, ev.seed, groups=groups
        )
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


@dataclass(frozen=True)
class OofComparison:
    """One recipe's out-of-fold figures and, beside the reference's, their paired difference.

    A recipe is one cross-validation run, or several of the same recipe under other training
    seeds; then each figure is the mean over its runs.

    Attributes:
        name: the recipe (its runs' names, comma-joined), or :data:`ENSEMBLE`.
        runs: how many runs it holds.
        roc_auc: the out-of-fold ROC AUC (the mean over its runs).
        roc_auc_sd: the standard deviation of its runs' out-of-fold ROC AUCs (ddof 1);
            ``None`` for one run.
        threshold: the operating threshold on these predictions (:func:`summarise`'s rule;
            the mean over the runs of each run's own).
        recall: sensitivity at it.
        specificity: specificity at it (the figure to compare when the threshold meets a
            target sensitivity by construction).
        versus_reference: this recipe's AUC minus the reference's on the same images
            (``auc_a`` is this recipe's; :func:`fracture.evaluation.delong_mean_difference`);
            ``None`` for the reference itself.
    """

    name: str
    runs: int
    roc_auc: float
    roc_auc_sd: float | None
    threshold: float
    recall: float
    specificity: float
    versus_reference: PairedAUC | None


@dataclass(frozen=True)
class OofComparisons:
    """Recipes compared on the same out-of-fold images, the reference first.

    Attributes:
        rows: one per recipe, then :data:`ENSEMBLE` when asked for.
        run_sd: how far one run's out-of-fold ROC AUC moves between training seeds: the
            standard deviation pooled over the recipes given with several runs, each around its
            own mean; ``None`` when every recipe has one run (each difference then holds the runs'
            predictions fixed).
        run_sd_df: the degrees of freedom of ``run_sd`` (runs less recipes, over those recipes).
        ungrouped: the runs whose predictions name no ``group`` (written before the crossval stage
            wrote it): then each difference counts every image as independent evidence. Empty when
            every run's name them, and each difference is over those groups
            (:attr:`fracture.evaluation.PairedAUC.n_groups`).
    """

    rows: list[OofComparison]
    run_sd: float | None
    run_sd_df: int
    ungrouped: tuple[str, ...] = ()


#: The name of the row that averages every compared run's probabilities.
ENSEMBLE = "mean of the runs"

#: A recipe's runs: one run's out-of-fold predictions, or several runs' by run name.
Recipe = pd.DataFrame | Mapping[str, pd.DataFrame]


def _aligned(
    runs: Mapping[str, pd.DataFrame],
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None, tuple[str, ...]]:
    """The runs' labels, probabilities and groups in one image order, checked to be the same folds.

    The groups are ``None`` when some run's predictions name none; the last item names those runs.
    """
    names = list(runs)
    frames = {}
    for name, frame in runs.items():
        missing = [c for c in OOF_COLUMNS if c not in frame.columns]
        if missing:
            raise CrossvalError(
                f"{name}: the out-of-fold predictions lack the column(s) {missing}; expected {OOF_COLUMNS}, as "
                "`fracture crossval` writes outputs/crossval/oof.csv"
            )
        if frame["image_id"].duplicated().any():
            raise CrossvalError(f"{name}: image_id {frame['image_id'][frame['image_id'].duplicated()].iloc[0]} "
                                "is listed twice in the out-of-fold predictions")
        frames[name] = _checked_values(name, frame.set_index("image_id").sort_index())
    reference = frames[names[0]]
    for name in names[1:]:
        frame = frames[name]
        only_here = frame.index.difference(reference.index)
        only_there = reference.index.difference(frame.index)
        if len(only_here) or len(only_there):
            raise CrossvalError(
                f"{name} held out {len(only_here)} image(s) {names[0]} did not and missed {len(only_there)} it held "
                f"out (first: {[*only_here[:1], *only_there[:1]]}): a paired comparison needs the same train + val "
                "images; run both on the same split"
            )
        for column, setting in (("label", "validate's label policies"), ("fold", "crossval.folds and crossval.seed")):
            differ = frame[column].to_numpy() != reference[column].to_numpy()
            if differ.any():
                raise CrossvalError(
                    f"{name} and {names[0]} differ in `{column}` for {int(differ.sum())} image(s) (first: "
                    f"{frame.index[differ][0]}): a paired comparison needs the same folds; run both with the "
                    f"same split and {setting}"
                )
    groups, ungrouped = _shared_groups(frames)
    # Already int and float: _checked_values made them so.
    probabilities = {name: frames[name]["probability"].to_numpy() for name in names}
    return reference["label"].to_numpy(), probabilities, groups, ungrouped


def _shared_groups(frames: Mapping[str, pd.DataFrame]) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """Each image's group of linked images, as every run's predictions name it; ``None`` and the
    runs whose predictions name none, when some do not.

    Args:
        frames: each run's predictions, indexed by ``image_id`` in one order (:func:`_aligned`).

    Raises:
        CrossvalError: two runs link the images into other groups. The keys themselves may differ
            (a group is named by one of its images); the partition of the images may not.
    """
    ungrouped = tuple(name for name, frame in frames.items() if GROUP_COLUMN not in frame.columns)
    if ungrouped:
        return None, ungrouped
    names = list(frames)
    reference = pd.Series(pd.factorize(frames[names[0]][GROUP_COLUMN].astype(str))[0])
    for name in names[1:]:
        other = pd.Series(pd.factorize(frames[name][GROUP_COLUMN].astype(str))[0])
        # An image is grouped otherwise when its group in one run is split, or joined with others, in the other.
        differ = ((reference.map(other.groupby(reference).nunique()) > 1)
                  | (other.map(reference.groupby(other).nunique()) > 1)).to_numpy()
        if differ.any():
            raise CrossvalError(
                f"{name} and {names[0]} link the images into other groups in `{GROUP_COLUMN}` ({int(differ.sum())} "
                f"image(s) grouped otherwise, first: {frames[name].index[differ][0]}): a paired comparison counts "
                "each group of linked images once and needs one grouping; cross-validate both on the same split "
                "(the same validate settings that link copies, near-duplicates and one patient's X-rays)"
            )
    return frames[names[0]][GROUP_COLUMN].astype(str).to_numpy(), ()


def _checked_values(name: str, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with numeric ``label`` and ``probability``, refused where a value cannot be scored.

    An empty or non-numeric cell, or a file of one class, would otherwise stop scikit-learn or
    DeLong's test with a message that names neither the run nor the image.

    Args:
        name: the run, for the messages.
        frame: its out-of-fold predictions, indexed by ``image_id`` (sorted, so "first" is by id).

    Raises:
        CrossvalError: a label other than 0 or 1, a probability empty, not finite or outside
            [0, 1], an empty ``group`` (where the column is given), or labels of one class only.
    """
    fix = "give the oof.csv `fracture crossval` wrote (outputs/crossval/oof.csv), or cross-validate the run again"
    labels = pd.to_numeric(frame["label"], errors="coerce")
    probabilities = pd.to_numeric(frame["probability"], errors="coerce")
    for column, values, bad, expected in (
        ("label", labels, ~labels.isin([0, 1]), "0 (not fractured) or 1 (fractured)"),
        ("probability", probabilities, ~probabilities.between(0, 1), "a probability in [0, 1]"),
    ):
        if bad.any():
            first = values.index[bad.to_numpy()][0]
            raw = frame.at[first, column]
            shown = "empty" if pd.isna(raw) else repr(raw) if isinstance(raw, str) else str(raw)
            raise CrossvalError(
                f"{name}: `{column}` of {first} is {shown}, not {expected} ({int(bad.sum())} image(s) in all); {fix}"
            )
    if GROUP_COLUMN in frame.columns and frame[GROUP_COLUMN].isna().any():
        empty = frame[GROUP_COLUMN].isna().to_numpy()
        raise CrossvalError(
            f"{name}: `{GROUP_COLUMN}` of {frame.index[empty][0]} is empty, not the image's group of linked images "
            f"({int(empty.sum())} image(s) in all); {fix}"
        )
    fractured = int((labels == 1).sum())
    if fractured in (0, len(labels)):
        raise CrossvalError(
            f"{name}: `label` holds {fractured} fractured and {len(labels) - fractured} not fractured images: ROC AUC "
            f"and DeLong's test need both classes (cross-validation holds out every train + val image, so its "
            f"predictions hold both); {fix}"
        )
    return frame.assign(label=labels.astype(int), probability=probabilities.astype(float))


def _runs_of(recipes: Mapping[str, Recipe]) -> dict[str, dict[str, pd.DataFrame]]:
    """Each recipe's runs by run name; a recipe given as one table is one run of its own name."""
    out: dict[str, dict[str, pd.DataFrame]] = {}
    seen: dict[str, str] = {}
    for recipe, runs in recipes.items():
        named = {recipe: runs} if isinstance(runs, pd.DataFrame) else dict(runs)
        if not named:
            raise CrossvalError(f"{recipe}: a recipe needs one run at least")
        for run in named:
            if run in seen:
                raise CrossvalError(
                    f"{run} is a run of both {seen[run]} and {recipe}: give each run to one recipe only"
                )
            seen[run] = recipe
        out[recipe] = named
    return out


def compare_oof(
    recipes: Mapping[str, Recipe], ev: EvaluateParams, ensemble: bool = False, confidence: float = 0.95
) -> OofComparisons:
    """Recipes compared on their out-of-fold predictions: the same folds, the first recipe as reference.

    Every run is scored as :func:`summarise` scores it (pooled ROC AUC; sensitivity and
    specificity at ``ev``'s threshold rule on the same predictions), a recipe by the mean over
    its runs, and each other recipe against the reference on the same images
    (:func:`fracture.evaluation.delong_mean_difference`), which a difference of the two runs'
    bootstrap intervals would not be: the images are shared, so most of their noise cancels.

    DeLong's test holds each run's predictions fixed, yet one recipe trained again under another
    seed moves too. When some recipe is given with several runs (the same recipe, other
    ``train.seed``), the spread of a run's AUC around its recipe's mean is pooled over those
    recipes (:attr:`OofComparisons.run_sd`, assumed alike for every recipe) and each difference
    adds its share, ``run_sd² (1/k_a + 1/k_b)`` for recipes of ``k_a`` and ``k_b`` runs, with
    Student's t for the few runs it was estimated from.

    With ``ensemble``, one more row (:data:`ENSEMBLE`) is the mean of all runs' probabilities of
    each image. Each image's probabilities come from models whose fold held it out, so the row
    is an honest estimate of what averaging those runs' models would score. Its own spread
    between seeds is counted as one run's (an average of runs varies less, so its interval is
    conservative).

    Linked images (copies, near-duplicates, one patient's X-rays) are one piece of evidence, not
    several: when every run's predictions name each image's ``group`` (:func:`oof_groups`, as the
    crossval stage writes it), each difference's variance is over those groups (Obuchowski's
    clustered DeLong, ``groups`` of :func:`fracture.evaluation.delong_mean_difference`), as the
    promotion gate counts them. Predictions written before the stage named them are compared
    image by image, and :attr:`OofComparisons.ungrouped` names their runs.

    Args:
        recipes: by name, the reference first: one run's out-of-fold predictions
            (:data:`OOF_COLUMNS`, and ``group``), or several runs' by run name.
        ev: the threshold rule (``threshold``, ``target_sensitivity``).
        ensemble: add the mean of all runs.
        confidence: coverage of the differences' intervals.

    Raises:
        CrossvalError: fewer than two recipes, a recipe without runs or a run in two recipes, a
            column missing, a label other than 0 or 1, a probability empty, not finite or outside
            [0, 1], an empty group, a run of one class only, or runs that held out other images,
            other labels or other folds, or that link the images into other groups (no paired
            comparison is possible).
    """
    if len(recipes) < 2:
        raise CrossvalError(f"comparing needs two runs or more, the reference first; got {len(recipes)}")
    runs = _runs_of(recipes)
    labels, probabilities, groups, ungrouped = _aligned(
        {run: frame for named in runs.values() for run, frame in named.items()}
    )
    by_recipe = {recipe: [probabilities[run] for run in named] for recipe, named in runs.items()}
    if ensemble:
        by_recipe[ENSEMBLE] = [np.mean(list(probabilities.values()), axis=0)]
    scored = {recipe: [_operating_point(labels, p, ev) for p in members] for recipe, members in by_recipe.items()}
    aucs = {recipe: np.array([point["roc_auc"] for _, point in points]) for recipe, points in scored.items()}
    several = [a for recipe, a in aucs.items() if recipe != ENSEMBLE and len(a) > 1]
    df = sum(len(a) - 1 for a in several)
    run_variance = sum(float(((a - a.mean()) ** 2).sum()) for a in several) / df if df else None
    reference_name = next(iter(by_recipe))
    rows = []
    for recipe, members in by_recipe.items():
        points = scored[recipe]
        paired = None
        if recipe != reference_name:
            k_b = len(by_recipe[reference_name])
            paired = delong_mean_difference(
                labels,
                members,
                by_recipe[reference_name],
                confidence,
                between_run_variance=0.0 if run_variance is None else run_variance * (1 / len(members) + 1 / k_b),
                between_run_df=df or None,
                groups=groups,
            )
        rows.append(
            OofComparison(
                recipe,
                len(members),
                float(aucs[recipe].mean()),
                float(aucs[recipe].std(ddof=1)) if len(members) > 1 else None,
                float(np.mean([threshold for threshold, _ in points])),
                float(np.mean([point["recall"] for _, point in points])),
                float(np.mean([point["specificity"] for _, point in points])),
                paired,
            )
        )
    return OofComparisons(rows, None if run_variance is None else run_variance**0.5, df, ungrouped)


def read_oof(run: str, root: Path) -> pd.DataFrame:
    """A cross-validation run's out-of-fold predictions, from a file or from where DVC keeps them.

    Args:
        run: a CSV file of :data:`OOF_COLUMNS`; else a ``dvc exp`` name or git revision of the
            project at ``root``, whose ``outputs/crossval/oof.csv`` DVC reads from its cache (or
            its remote, when the cache lacks it). Either followed by ``#member_<k>`` reads an
            ensemble's member k (a seed's or a snapshot's network, ``probability_member_<k>``) as
            the run's ``probability``, so one run's members are compared as runs of their own.
        root: the project root.

    Raises:
        CrossvalError: neither a file nor a revision holding the predictions, a file that is not a
            CSV, or a member the predictions do not hold.
    """
    name, member = run, ""
    if not Path(run).is_file() and "#" in run:
        name, _, member = run.rpartition("#")
    frame = _read_oof_file(name, root)
    if not member:
        return frame
    column = f"probability_{member}"
    if not re.fullmatch(r"member_[1-9][0-9]*", member) or column not in frame.columns:
        held = sorted((c.removeprefix("probability_") for c in frame.columns
                       if re.fullmatch(r"probability_member_\d+", c)), key=lambda m: int(m.rpartition("_")[2]))
        raise CrossvalError(
            f"{run}: {name}'s predictions hold no {member!r}; "
            + (f"it holds {', '.join(f'#{m}' for m in held)}" if held else "it is one network's, with no members")
        )
    return frame.assign(probability=frame[column])


def _declared_in(run: str, path: str, root: Path) -> bool:
    """Whether revision ``run`` of the project records ``path`` (in a dvc.lock or .dvc file), whatever its cache holds.

    DVC's read says the same "does not exist … neither as a DVC output nor as a Git-tracked file"
    for an output whose content is missing from the cache as for a revision without it.
    """
    from dvc.api import DVCFileSystem  # noqa: PLC0415 - DVC's API loads slowly
    from dvc.exceptions import DvcException  # noqa: PLC0415

    try:
        return DVCFileSystem(str(root), rev=run).exists(path)
    except (DvcException, OSError):
        return False


def _read_oof_file(run: str, root: Path) -> pd.DataFrame:
    workspace = Workspace(root)
    ours = Path(run).is_file() and Path(run).resolve() == workspace.crossval_oof.resolve()
    if ours and not workspace.crossval_metrics.is_file():  # written after the predictions: the run stopped between
        raise CrossvalError(
            f"{run}: the cross-validation that wrote it did not finish ({workspace.crossval_metrics} is written "
            "last and is missing), so its predictions may be an earlier run's; run `dvc repro crossval/dvc.yaml` "
            "again"
        )
    if Path(run).is_file():
        try:
            return read_table(Path(run))
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise CrossvalError(
                f"{run}: not a CSV of out-of-fold predictions ({exc}); give the oof.csv `fracture crossval` wrote"
            ) from exc
    import dvc.api  # noqa: PLC0415 - DVC's API loads slowly
    from dvc.exceptions import DvcException  # noqa: PLC0415

    path = workspace.crossval_oof.relative_to(root).as_posix()
    try:
        return read_table(io.StringIO(dvc.api.read(path, repo=str(root), rev=run)))
    except (DvcException, FileNotFoundError) as exc:
        if _declared_in(run, path, root):
            raise CrossvalError(
                f"{run}: this revision of the project has {path}, but neither DVC's cache nor its remote holds the "
                f"file's content ({exc}); `dvc exp pull <remote> {run}` or `dvc pull` fetches it, else run "
                "`dvc exp apply` and `dvc repro crossval/dvc.yaml` again"
            ) from exc
        raise CrossvalError(
            f"{run}: no file of that name, and no revision or `dvc exp` name of this project with {path} ({exc}); "
            "`dvc exp list` names the experiments, `dvc exp pull` fetches a colleague's"
        ) from exc
