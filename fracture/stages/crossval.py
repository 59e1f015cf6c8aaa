"""The crossval stage: the active profile's recipe, k-fold cross-validated on train + val.

Not part of the main pipeline (it lives in ``crossval/dvc.yaml``): it compares training recipes
without the test split, which it never reads. Each fold trains exactly as the train stage does
(:func:`fracture.training.train` on the prepared cache, the same profile and ``train`` settings)
on the other folds and is scored on the held-out one; one MLflow run (tag ``kind=crossval``, and
the machine it ran on, as the train stage's runs have it) records the recipe and the figures.
A run stopped part-way ends ``KILLED`` (Ctrl-C, or a scheduler's SIGTERM) or ``FAILED`` (an error),
never left ``RUNNING``.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import RunStatus

from fracture.config import Params
from fracture.crossval import (
    GROUP_COLUMN,
    draw_folds,
    fit_fold,
    oof_groups,
    pool_splits,
    summarise,
)
from fracture.data_config import DataConfig
from fracture.devices import select_device
from fracture.model import check_profile_frozen, require_versioned_weights
from fracture.prepare import PreparedImages
from fracture.stages.prepare import active_cache, open_cache
from fracture.stages.train import log_dataset_inputs, recipe_params
from fracture.tracking import hardware_tags, setup_mlflow
from fracture.workspace import CrossvalFold, CrossvalResult, Workspace

log = logging.getLogger(__name__)

#: Per-epoch training metrics logged to the run for each fold, as ``fold_<n>_<name>``.
EPOCH_METRICS = ("train_loss", "val_loss", "val_roc_auc")


def _fit_fold(
    params: Params, cache: PreparedImages, config: DataConfig, pooled: pd.DataFrame, fold_of: np.ndarray, number: int
) -> tuple[CrossvalFold, pd.DataFrame]:
    """Trains on every fold but ``number`` and scores ``number``, logging each epoch to the run."""

    def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics({f"fold_{number}_{name}": metrics[name] for name in EPOCH_METRICS}, step=epoch + 1)

    record, oof, _ = fit_fold(cache, config, params.profile, params.train, pooled, fold_of, number, log_epoch)
    log.info(
        "fold %d: held-out ROC AUC %.4f after the last epoch (best %.4f at epoch %d)",
        number, record.roc_auc, record.best_roc_auc, record.best_epoch,
    )
    return record, oof


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Within it, SIGTERM (a batch scheduler's time limit, ``kill``, ``docker stop``) raises
    ``KeyboardInterrupt`` as Ctrl-C does, so the run is ended as stopped; by default the process died
    on the spot and left it ``RUNNING`` for good. The handler before is put back after; off the main
    thread, where Python cannot set one, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def run_crossval(params: Params, workspace: Workspace) -> CrossvalResult:
    """Cross-validates the active profile's recipe (``crossval`` in params) on train + val.

    Pools ``outputs/split/train.csv`` and ``val.csv`` (never ``test.csv``), draws the folds
    (:func:`fracture.crossval.draw_folds`), trains one model per fold on the prepared cache and
    keeps each held-out image's last-epoch probability. Writes ``outputs/crossval/metrics.json``
    and ``oof.csv`` (with each image's ``group`` of linked images, :func:`fracture.crossval.oof_groups`:
    the unit ``fracture crossval-compare`` counts as one piece of evidence) and logs one MLflow
    run (experiment ``register.experiment``, tag ``kind=crossval``) with the recipe's params, each
    fold's per-epoch curves and the figures.

    Returns:
        The per-fold records and the summary, as written to ``metrics.json``.

    Raises:
        CrossvalError: the folds cannot be drawn with both classes in each.
        StaleCacheError: the prepared cache does not fit the active profile.
        PretrainedWeightsError: a ``weights_file`` DVC does not version in ``pretrained/``.
        ConfigError: the profile's ``frozen`` names a module the model lacks (before any data is
            read, as the train stage checks it, not once the first fold starts training).
        KeyboardInterrupt: Ctrl-C or SIGTERM; the MLflow run is ended ``KILLED`` first (an error
            ends it ``FAILED``).
    """
    require_versioned_weights(params.profile, params.train.profile, workspace.root)
    check_profile_frozen(params.profile, params.train.profile)
    frames = {name: workspace.read_split_table(name) for name in ("train", "val")}
    pooled = pool_splits(frames["train"], frames["val"])
    cv = params.crossval
    fold_of = draw_folds(pooled, cv.folds, cv.seed)
    config, _ = active_cache(params)
    cache = open_cache(params, workspace, config)
    setup_mlflow(params, workspace.root)
    tags = {
        "kind": "crossval",
        "profile": params.train.profile,
        "data_version": workspace.data_version() or "",
        # ``<sha>-dirty`` and the files, when the code that ran is not the commit's.
        "git_commit": "",
        **workspace.git_tags(),
    } | hardware_tags(str(select_device(params.train.device)))
    # MLflow's run ends FAILED on any exception, Ctrl-C's too; a stopped run is KILLED instead.
    with _sigterm_interrupts(), mlflow.start_run(tags=tags) as run:
        try:
            log_dataset_inputs(params, workspace, frames)
            mlflow.log_params(recipe_params(params) | {"crossval.folds": cv.folds, "crossval.seed": cv.seed})
            fitted = [_fit_fold(params, cache, config, pooled, fold_of, n) for n in range(1, cv.folds + 1)]
            oof = pd.concat([predictions for _, predictions in fitted])
            oof[GROUP_COLUMN] = oof_groups(pooled, oof)
            records = [record for record, _ in fitted]
            result = CrossvalResult(records, summarise(records, oof, params.evaluate, oof[GROUP_COLUMN].to_numpy()))
            workspace.write_crossval(result, oof)
            mlflow.log_metrics(
                {k: float(v) for k, v in result.to_dict().items() if k != "folds"}
                | {f"fold_{f.fold}_best_epoch": f.best_epoch for f in result.folds}
            )
            for path in (workspace.crossval_metrics, workspace.crossval_oof):
                mlflow.log_artifact(str(path), artifact_path="crossval")
        except KeyboardInterrupt:
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
            raise
    print(f"MLflow run {run.info.run_id} (kind=crossval)")
    return workspace.read_crossval()
