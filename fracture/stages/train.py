"""The train stage: fine-tune the active profile's model in one MLflow run, resumable per epoch."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import warnings
from pathlib import PurePosixPath
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from safetensors.torch import save_file

from fracture import checkpoint, distributed
from fracture.config import ConfigError, Params, Profile
from fracture.devices import select_device
from fracture.model import check_profile_frozen, require_versioned_weights
from fracture.seen import SEEN_ARTIFACT, SeenImages
from fracture.stages.prepare import (
    active_cache,
    open_cache,
    require_a_device_for_the_profile,
)
from fracture.tracking import hardware_tags, setup_mlflow
from fracture.training import FitResult, fit_members, member_checkpoint
from fracture.vocabulary import CLASSES
from fracture.workspace import TrainedModel, TrainResult, Workspace

log = logging.getLogger(__name__)


def log_dataset_inputs(params: Params, workspace: Workspace, frames: dict[str, pd.DataFrame]) -> None:
    """Records the dataset version and the split tables as MLflow dataset inputs of the active run.

    The whole dataset is one input named after its folder (``fracatlas`` for ``ingest.dest``
    ``data/fracatlas``; a hospital's export by its own) whose digest is DVC's md5 of ``data``
    (the version in ``data.dvc``); each split is an input ``<name>-<split>`` with its own content digest.
    """
    name = PurePosixPath(params.ingest.dest).name
    version = workspace.data_version() or "unversioned"
    source = (workspace.root / params.ingest.dest).resolve().as_uri()
    columns = ["image_id", "path", "label", "sha256"]
    everything = pd.concat(frames.values())[columns]
    with warnings.catch_warnings():
        # MLflow's schema inference warns that integer columns cannot hold missing values;
        # these tables describe the data, they are no model signature.
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        # MLflow registers its local artifact source for both "" and "file" URIs, so a file URI
        # matches two classes of the same kind and it warns that it picked one of them.
        warnings.filterwarnings(
            "ignore", message=".*multiple ways: LocalArtifactDatasetSource, LocalArtifactDatasetSource\\.", category=UserWarning
        )
        mlflow.log_input(
            # DVC's directory md5 ("<32 hex>.dir") fits MLflow's 36-character digest column.
            mlflow.data.from_pandas(everything, source=source, targets="label", name=name, digest=version),
            context="dataset",
            tags={"data_version": version},
        )
        for split, frame in frames.items():
            mlflow.log_input(
                mlflow.data.from_pandas(frame[columns], source=source, targets="label", name=f"{name}-{split}"),
                context=split,
                tags={"data_version": version},
            )


def recipe_params(params: Params) -> dict[str, object]:
    """MLflow params of the recipe: the profile and every setting that shapes the model.

    Shared with cross-validation (:mod:`fracture.stages.crossval`), so both runs name a recipe alike.
    """
    sections = {"train": params.train, "split": params.split, "prepare": params.prepare}
    return (
        {"profile": params.train.profile}
        | {f"profile.{k}": v for k, v in dataclasses.asdict(params.profile).items()}
        | {f"{name}.{k}": v for name, section in sections.items() for k, v in dataclasses.asdict(section).items()}
    )


def _run_params(params: Params, frames: dict[str, pd.DataFrame]) -> dict[str, object]:
    """The run's MLflow params: the recipe and the number of train and val images."""
    return recipe_params(params) | {"n_train": len(frames["train"]), "n_val": len(frames["val"])}


def run_train(params: Params, workspace: Workspace) -> TrainResult | None:
    """Fine-tunes the profile's ImageNet model on the train split, choosing the epoch on val.

    Every epoch is checkpointed; a run killed part-way resumes after its last completed epoch
    in the same MLflow run when nothing that shapes it changed (:mod:`fracture.checkpoint`).

    With ``train.processes`` above 1 it trains data-parallel in that many processes on this
    machine, started by torchrun's launcher; under ``torchrun`` itself (several machines) it
    joins torchrun's process group. Rank 0 logs to MLflow and writes the outputs
    (:mod:`fracture.distributed`).

    Returns:
        The model's description and its MLflow run; ``None`` in a process of rank above 0 that
        torchrun started itself: rank 0 writes the outputs, on its own machine.

    Raises:
        PretrainedWeightsError: a ``weights_file`` DVC does not version in ``pretrained/``
            (:func:`fracture.model.require_versioned_weights`).
        ConfigError: the paper's profile with ``train.device: auto`` on a machine without CUDA, or
            its ``frozen`` naming a module the model lacks (before any data is read).
    """
    require_versioned_weights(params.profile, params.train.profile, workspace.root)
    check_profile_frozen(params.profile, params.train.profile)
    require_a_device_for_the_profile(params)
    if params.train.processes > 1 and not distributed.launched():
        distributed.launch(_rank, params.train.processes, params, workspace)
        return workspace.read_train()
    try:
        wrote = _train(params, workspace)
    finally:
        distributed.teardown()
    return workspace.read_train() if wrote else None


def _rank(params: Params, workspace: Workspace) -> None:
    """One process of a data-parallel run (pickled into each process by the launcher)."""
    # A spawned process starts with logging unset: rank 0 logs progress (each epoch's loss, val ROC
    # AUC and images/s, a resumption) as the `fracture` command sets it up in a process of its own.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if os.environ.get("RANK", "0") == "0":
        logging.getLogger("fracture").setLevel(logging.INFO)
    try:
        _train(params, workspace)
    finally:
        distributed.teardown()


def run_key(params: Params, data_config: dict[str, Any], cache_meta: dict[str, Any], frames: dict[str, pd.DataFrame]) -> str:
    """Everything that makes the run what it is: a checkpoint of any other run is not resumed.

    The params, the data config and prepared cache, the train and val images (ids, labels and
    each file's sha256: a new export of the same ids is other pixels), the package's code, the
    torch and timm versions, the pretrained weights, and the kind of device it trains on.
    """
    return checkpoint.fingerprint(
        {
            "profile": dataclasses.asdict(params.profile),
            "train": dataclasses.asdict(params.train),
            "data_config": data_config,
            "cache": cache_meta,
            "train_images": _images(frames["train"]),
            "val_images": _images(frames["val"]),
            "code": checkpoint.code_digest(),
            "libraries": {name: importlib.metadata.version(name) for name in ("torch", "timm")},
            "weights": checkpoint.weights_identity(params.profile.weights, params.profile.weights_file),
            # The device it trains on, which train.device: auto leaves to the machine: a run killed on
            # a GPU is not resumed on the CPU, nor the other way round.
            "device": select_device(params.train.device).type,
        }
    )


def _can_continue(run_id: str, workspace: Workspace) -> bool:
    """Whether the killed run's MLflow run ``run_id`` can take the resumed epochs.

    Not when the tracking store lacks it (MLFLOW_TRACKING_URI points elsewhere, or mlflow.db was
    replaced) or it was deleted: MLflow refuses to reopen either, so the resumed training logs to
    a new run instead (warned here), rather than every rerun failing until the checkpoint is removed.
    """
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
        experiment = client.get_experiment(run.info.experiment_id)
        deleted = "deleted" in (run.info.lifecycle_stage, experiment.lifecycle_stage)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        why = f"is not in the tracking store {client.tracking_uri}"
    else:
        if not deleted:
            return True
        why = "was deleted (or its experiment was)"
    log.warning(
        "MLflow run %s, which the checkpoint in %s was logged to, %s: the training resumes from the checkpoint "
        "and logs to a new run, with the checkpoint's epochs logged again", run_id, workspace.checkpoint_dir, why,
    )
    return False


def _log_checkpointed_epochs(
    params: Params, workspace: Workspace, key: str, first: checkpoint.Checkpoint, run_id: str
) -> None:
    """Logs the epochs the checkpoints hold that MLflow run ``run_id`` lacks, numbered as training numbers them.

    A new run that continues a lost one lacks them all: its curves then start at epoch 1, as an
    uninterrupted run's do. The killed run itself, continued, lacks only an epoch it was killed
    after checkpointing but before logging (training logs an epoch once its checkpoint is written,
    :func:`fracture.training.train`): logged now, every epoch is in the run once, as in an
    uninterrupted run, and none twice or not at all. Each metric's steps are read from the run, so
    a row only partly logged is completed, not repeated.

    ``first`` is the (first member's) checkpoint already read; an ensemble's other members each
    have one of their own, and their epochs count on across them.
    """
    profile = params.profile
    rows: list[tuple[int, dict[str, float]]] = []
    for member in range(1, profile.members + 1):
        folder, member_key = member_checkpoint(workspace.checkpoint_dir, key, profile, member)
        saved = first if member == 1 else checkpoint.load(folder, member_key)
        if saved is None:  # this member had not started
            break
        for metrics in saved.history:
            numbered = metrics if profile.members == 1 else {**metrics, "member": member}
            rows.append((run_step(profile, member, int(metrics["epoch"])), numbered))
    client, names = MlflowClient(), {name for _, metrics in rows for name in metrics}
    logged = {name: {m.step for m in client.get_metric_history(run_id, name)} for name in names}
    for step, metrics in rows:
        missing = {name: value for name, value in metrics.items() if step not in logged[name]}
        if missing:
            mlflow.log_metrics(missing, step=step)


def run_step(profile: Profile, member: int, epoch: int) -> int:
    """Epoch ``epoch`` (from 1) of network ``member``'s as the run numbers it, MLflow's step and the
    history's ``step``: on across an ensemble's members, member 2's first epoch after member 1's last,
    as :func:`fracture.training.fit_members` hands them to ``on_epoch``."""
    return (member - 1) * profile.epochs + epoch


def _images(frame: pd.DataFrame) -> list[list[str]]:
    columns = [c for c in ("image_id", "label", "sha256") if c in frame.columns]
    return frame[columns].astype(str).values.tolist()


def _train(params: Params, workspace: Workspace) -> bool:
    """Trains this process's share; returns whether it wrote the stage's outputs (rank 0 does)."""
    frames = workspace.read_split_tables()
    config, _ = active_cache(params)
    cache = open_cache(params, workspace, config)
    train_data, val_data = cache.reader(frames["train"]), cache.dataset(frames["val"])
    key = run_key(params, config.to_dict(), cache.meta, frames)
    context = distributed.Context()
    if distributed.launched():
        context = distributed.setup(use_cuda=select_device(params.train.device).type == "cuda")
        # The key names each machine's split, prepared cache, params and code: a machine whose project
        # is not rank 0's would train on other images or labels without a word, or wait on the others
        # until the process group times out (30 minutes).
        unlike = distributed.ranks_unlike_main(key, context)
        if unlike:
            raise ConfigError(
                f"rank {context.rank}: the project on the machine(s) of rank(s) {', '.join(map(str, unlike))} is not "
                "rank 0's (its split tables, prepared cache, params.yaml or code differ): every machine of a run "
                "needs the same commit and data; run `git pull` and `dvc pull` there (dvc.lock's split and prepare "
                "outputs), then start the run again"
            )
        if not context.is_main:
            # Trains its share; rank 0 logs, checkpoints and writes the outputs.
            fit_members(train_data, val_data, config, params.profile, params.train)
            return False
    # run.json ties the weights to their MLflow run, which evaluate scores into and register registers:
    # it goes first and comes back last (as the prepared cache's meta.json), so a stage stopped after
    # saving new weights but before recording their run, which a command typed by hand can be (under
    # DVC its outputs are gone before it starts), leaves no earlier run's record beside them.
    workspace.run_json.unlink(missing_ok=True)
    # An ensemble's MLflow run is in its first member's checkpoint.
    resumable = checkpoint.load(*member_checkpoint(workspace.checkpoint_dir, key, params.profile, 1))
    setup_mlflow(params, workspace.root)
    earlier_run = resumable.run_id if resumable is not None else None
    continued = bool(earlier_run and _can_continue(earlier_run, workspace))
    if resumable is not None:
        where = f"MLflow run {earlier_run}" if continued else "a new MLflow run"
        print(f"resuming after epoch {resumable.epoch} of {params.profile.epochs} ({where})")
    if continued:
        run_context = mlflow.start_run(run_id=earlier_run, log_system_metrics=True)
    else:
        tags = {
            "profile": params.train.profile,
            "data_version": workspace.data_version() or "",
            # ``<sha>-dirty`` and the files, when the code that trains is not the commit's.
            "git_commit": "",
            **workspace.git_tags(),
        } | ({"resumed_from_run": earlier_run} if earlier_run else {})
        run_context = mlflow.start_run(tags=tags, log_system_metrics=True)
    with run_context as run:
        if not continued:
            log_dataset_inputs(params, workspace, frames)
            # What the model learnt from, for a later gate that scores it as champion on a new split.
            mlflow.log_text(SeenImages.table(frames), SEEN_ARTIFACT)
            mlflow.log_params(_run_params(params, frames))
        if resumable is not None:  # what the checkpoints hold and the run lacks, before training goes on
            _log_checkpointed_epochs(params, workspace, key, resumable, run.info.run_id)
        fit: FitResult = fit_members(
            train_data,
            val_data,
            config,
            params.profile,
            params.train,
            on_epoch=lambda epoch, metrics: mlflow.log_metrics(metrics, step=epoch + 1),
            checkpoint_dir=workspace.checkpoint_dir,
            checkpoint_key=key,
            run_id=run.info.run_id,
        )
        mlflow.log_metrics({"best_epoch": fit.best_epoch, "best_val_roc_auc": fit.best_val_roc_auc})
        if params.profile.snapshots > 1:
            mlflow.log_metrics({f"snapshot_{k}_epoch": e for k, e in enumerate(fit.member_best_epochs, start=1)})
        elif fit.member_best_epochs:
            mlflow.log_metrics({f"member_{k}_best_epoch": e for k, e in enumerate(fit.member_best_epochs, start=1)})
        mlflow.set_tags({
            **hardware_tags(fit.device),
            "resumed_from_epoch": fit.resumed_from,
            # How many processes trained it, on how many machines: a run that torchrun started on
            # several machines is not in train.processes, which counts one machine's processes.
            "world_size": context.world_size,
            "machines": context.machines,
        })
        workspace.train_dir.mkdir(parents=True, exist_ok=True)
        save_file(fit.model.state_dict(), str(workspace.weights))
        trained = TrainedModel(
            architecture=params.profile.model,
            profile=params.train.profile,
            classes=list(CLASSES),
            data_config=fit.data_config,
            best_epoch=fit.best_epoch,
            best_val_roc_auc=fit.best_val_roc_auc,
            tta=params.profile.tta,  # chose the epoch on val; evaluate and the served model apply it too
            members=params.profile.members * params.profile.snapshots,
            member_best_epochs=list(fit.member_best_epochs),
            snapshots=params.profile.snapshots,
        )
        # Each row's step is its MLflow step: with several networks, member after member, so a plot of
        # the history over it draws each network's epochs apart (over `epoch` they would interleave).
        history = [{**row, "step": run_step(params.profile, int(row.get("member", 1)), int(row["epoch"]))}
                   for row in fit.history]
        workspace.write_train(trained, run.info.run_id, run.info.experiment_id, history)
    checkpoint.clear(workspace.checkpoint_dir)
    members, resumed = params.profile.members, ""
    if fit.resumed_from and members == 1:
        resumed = f", resumed after epoch {fit.resumed_from}"
    elif fit.resumed_from:  # an ensemble's members train one after another: its epochs count on across them
        resumed = f", resumed after {fit.resumed_from} of its members' {members * params.profile.epochs} epochs"
    epochs = (f"snapshots after epochs {', '.join(map(str, fit.member_best_epochs))}" if params.profile.snapshots > 1
              else f"members' best epochs {', '.join(map(str, fit.member_best_epochs))}" if fit.member_best_epochs
              else f"best epoch {fit.best_epoch}")
    print(f"{epochs}: val ROC AUC {fit.best_val_roc_auc:.4f} (MLflow run {run.info.run_id}{resumed})")
    return True
