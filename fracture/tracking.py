"""The MLflow tracking store a stage logs to (the URI and the experiment), and the machine a training run ran on."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path, PurePosixPath

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from fracture.config import ConfigError, Params, artifact_location, tracking_uri

#: MLflow's error codes for a registered model, version or alias that is not there (an alias the
#: model lacks is INVALID_PARAMETER_VALUE), as against a store that cannot be reached or read (MLflow
#: reports a server that does not answer as INTERNAL_ERROR, after its retries).
NOT_FOUND = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})


def bound_registry_waits() -> None:
    """Two retries and 30 s a reply for a tracking server that does not answer, unless the operator
    set ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` otherwise: MLflow's
    own 7 retries, backing off to 2 minutes, waited about 4 minutes before a word. For what a person
    waits on: the page, and ``fracture predict``."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def sqlite_store(uri: str) -> Path | None:
    """The file a ``sqlite:`` store URI names, as MLflow's database layer reads it (SQLAlchemy: a
    query such as ``?timeout=60`` left out, ``%20`` escapes decoded); ``None`` for another kind of
    store, or an in-memory one.

    SQLite's own URI form, ``sqlite:///file:/path/mlflow.db?uri=true``, is refused: SQLAlchemy hands
    it to SQLite, which opens the file, but MLflow first makes the parent folders of what follows
    ``sqlite:///`` as a path, a ``file:`` folder tree (``file:/path``) under the working folder of
    whatever opened the store (a stage, ``fracture predict`` in the folder of images, the page).

    Raises:
        ValueError: ``uri`` is no sqlite URI SQLAlchemy reads (``sqlite:mlflow.db``), or is SQLite's
            ``file:`` URI form; the message names it and the form to give instead.
    """
    if not uri.startswith("sqlite:"):
        return None
    from urllib.parse import unquote, urlsplit  # noqa: PLC0415

    from sqlalchemy.engine import make_url  # noqa: PLC0415 - MLflow's own dependency, imported only when needed
    from sqlalchemy.exc import ArgumentError  # noqa: PLC0415

    try:
        url = make_url(uri)
    except ArgumentError as exc:
        raise ValueError(f"{uri} is no sqlite store URI: give sqlite:///<path to mlflow.db>") from exc
    database = url.database
    if database and database.startswith("file:"):
        path = unquote(urlsplit(database).path) or "<path to mlflow.db>"  # file:/abs/path or file:rel?mode=ro
        folders = PurePosixPath(database.split("?", 1)[0]).parent  # file:/abs, or . for file:mlflow.db
        raise ValueError(
            f"{uri} is SQLite's file: URI form, which MLflow reads as a path in the working folder"
            + (f", making the folders {folders} there" if str(folders) != "." else "")
            + f": give the file's path instead, sqlite:///{path}"
        )
    return None if database in (None, "", ":memory:") or database.startswith(":memory:") else Path(database)


class TrainingRunMissing(RuntimeError):
    """The MLflow run that trained the model (``outputs/train/run.json``) is not in the tracking store."""


def training_run(run_id: str, client: MlflowClient | None = None) -> Run:
    """The training run ``run_id`` from the current tracking store (or ``client``'s).

    Raises:
        TrainingRunMissing: the store does not hold it; the message says which store and what to do.
    """
    client = client or MlflowClient()
    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise TrainingRunMissing(
            f"run {run_id}, which trained the model (outputs/train/run.json), is not in the tracking store "
            f"{client.tracking_uri}: it was logged to another store (MLFLOW_TRACKING_URI set otherwise, or "
            "another copy's mlflow.db). Set MLFLOW_TRACKING_URI to that store, or train again here: "
            "dvc repro --force --single-item train, then dvc repro"
        ) from exc


def setup_mlflow(params: Params, root: Path = Path(".")) -> None:
    """Points MLflow at the tracking URI and makes sure the experiment exists.

    Args:
        params: names the experiment.
        root: the project directory, where the default sqlite store and artifacts live.

    Raises:
        ConfigError: ``MLFLOW_TRACKING_URI`` is a sqlite URI MLflow cannot open cleanly (:func:`sqlite_store`).
    """
    uri = tracking_uri(root)
    try:
        sqlite_store(uri)
    except ValueError as exc:  # before MLflow opens it: SQLite's file: form leaves a file: folder tree
        raise ConfigError(f"MLFLOW_TRACKING_URI: {exc}") from exc
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(params.register.experiment) is None:
        location = artifact_location(root) if uri.startswith("sqlite:") else None
        mlflow.create_experiment(params.register.experiment, artifact_location=location)
    mlflow.set_experiment(params.register.experiment)


def hardware_tags(device: str) -> dict[str, str]:
    """What a training run ran on, as MLflow tags: the device, the CPU and the kernels torch chose.

    PyTorch's CPU kernels (oneDNN, MKL) take another code path on another instruction set
    (``cpu_capability``: AVX2, AVX512, ...) or thread count, and their floating-point sums come
    out in another order: ``dvc repro`` trains the same model bit for bit on the same kind of
    machine, and a close but not identical one elsewhere. These tags say which kind a model came from.
    """
    import torch  # noqa: PLC0415 - the tracking module is imported by stages that never train

    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), flags=re.MULTILINE)
    except OSError:
        found = None
    return {
        "device": device,
        "cpu_model": found.group(1).strip() if found else (platform.processor() or platform.machine()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": str(torch.get_num_threads()),
        "torch_version": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "",
    }
