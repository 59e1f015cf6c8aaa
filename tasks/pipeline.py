"""Prefect tasks for the retraining flow.

Each data or model stage is run through DVC (``dvc repro <stage>``), so a flow run leaves
``dvc.lock`` and the DVC cache exactly as ``dvc repro`` would and skips what did not change;
the task then reads the stage's outputs back as a typed result. Registration changes the
MLflow registry rather than producing files, so it runs in the flow's last task.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
import yaml
from mlflow.exceptions import MlflowException
from prefect import get_run_logger, task

from fracture.config import load_params
from fracture.ingest import EX_TEMPFAIL
from fracture.registry import Registration
from fracture.stages.register import run_register
from fracture.workspace import Workspace

#: The DVC stages of dvc.yaml in pipeline order, each with the workspace reader of its outputs.
READERS: dict[str, Callable[[Workspace], Any]] = {
    "validate": Workspace.read_validate,
    "split": Workspace.read_split,
    "prepare": Workspace.read_prepare,
    "train": Workspace.read_train,
    "evaluate": Workspace.read_evaluate,
}
DVC_STAGES = tuple(READERS)

# MLflow error codes a later try may not meet: the tracking server or its database was down,
# overloaded or timed out (MLflow reports an unreachable server as INTERNAL_ERROR).
TRANSIENT_MLFLOW_ERRORS = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED", "ABORTED"}
)

if TYPE_CHECKING:
    from prefect import Task
    from prefect.client.schemas.objects import TaskRun
    from prefect.states import State


class StageFailed(RuntimeError):
    """A command of the pipeline exited with an error; the message holds its output's end.

    Attributes:
        returncode: the command's exit status, for retry decisions (``None`` when unknown).
    """

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


@dataclass(frozen=True)
class StageRun:
    """Whether ``dvc repro`` ran a stage or found it up to date, and how long the call took."""

    stage: str
    ran: bool
    seconds: float


@dataclass(frozen=True)
class IngestSummary:
    """The dataset version (DVC's md5 of ``data``) after ingest, and the one before it."""

    data_version: str | None
    seconds: float
    previous_version: str | None = None

    @property
    def changed(self) -> bool:
        """Whether this ingest brought in a dataset other than the one the project had."""
        return self.data_version != self.previous_version


def _env() -> dict[str, str]:
    # DVC runs `fracture <stage>` through the shell: put this interpreter's scripts first on PATH.
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"  # so the stage's output reaches the log as it happens
    return env


def _run(cmd: list[str], project: Path) -> str:
    """Runs a command in the project, streaming its output into the Prefect log."""
    logger = get_run_logger()
    logger.info("$ %s", " ".join(cmd))
    lines: list[str] = []
    with subprocess.Popen(
        cmd, cwd=project, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            lines.append(line)
            logger.info(line)
    output = "\n".join(lines)
    if proc.returncode != 0:
        raise StageFailed(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{output[-4000:]}", proc.returncode)
    return output


def dvc(project: Path, *args: str) -> str:
    """Runs a DVC command in the project with this environment's DVC."""
    return _run([sys.executable, "-m", "dvc", *args], project)


def _locked(project: Path, stage: str) -> Any:
    """The stage's entry in ``dvc.lock`` (``None`` before it first ran): DVC's record of what it ran on."""
    lock = project / "dvc.lock"
    if not lock.is_file():
        return None
    return (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(stage)


def repro(project: Path, stage: str) -> StageRun:
    """``dvc repro <stage>``; the stage ran when DVC's lock entry for it changed.

    An unchanged entry means DVC found the stage's dependencies, params and outputs as recorded
    (or restored the outputs from its run cache) and did not run the command.
    """
    started = time.perf_counter()
    before = _locked(project, stage)
    dvc(project, "repro", stage)
    after = _locked(project, stage)
    return StageRun(stage, after is not None and after != before, time.perf_counter() - started)


def _failure(state: State[Any]) -> BaseException | None:
    """The exception a Failed state holds (its result re-raises it), or ``None``."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - whatever the task raised is what the caller judges
        return exc
    return None


def retry_transient_ingest(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect ``retry_condition_fn``: retries the ingest task only after a transient failure.

    ``fracture ingest`` exits with ``EX_TEMPFAIL`` (75) for network errors, cut-short
    transfers and HTTP 5xx, which a later try may not meet. A wrong local path, a bad layout,
    a checksum mismatch or a zip-slip member fail the same way every time, so they are
    reported at once instead of after the retry delays. ``task`` and ``task_run`` are part of
    Prefect's signature; ``state`` is the Failed state.
    """
    exc = _failure(state)
    return isinstance(exc, StageFailed) and exc.returncode == EX_TEMPFAIL


def retry_transient_registry(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect ``retry_condition_fn``: retries the register task only after a transient failure.

    An unreachable or overloaded tracking server, a timeout or a locked database may be gone on
    the next try; a missing metric, an unknown run or a permission error stays, so it is
    reported at once. ``task`` and ``task_run`` are part of Prefect's signature; ``state`` is
    the Failed state.
    """
    exc = _failure(state)
    if isinstance(exc, MlflowException):
        return exc.error_code in TRANSIENT_MLFLOW_ERRORS
    return isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError))


@task(name="ingest", retries=2, retry_delay_seconds=30, retry_condition_fn=retry_transient_ingest)
def ingest_task(project: Path, source: str | None) -> IngestSummary:
    """Brings FracAtlas in (local copy, zip or figshare) and versions it with ``dvc add``.

    The flow sets the retries and their delay from ``schedule`` in params.yaml.
    """
    started = time.perf_counter()
    workspace = Workspace(project)
    previous = workspace.data_version()
    _run([sys.executable, "-m", "fracture.cli", "ingest", *(["--source", source] if source else [])], project)
    dvc(project, "add", "data")
    return IngestSummary(workspace.data_version(), time.perf_counter() - started, previous)


@task(name="stage", task_run_name="{stage}")
def stage_task(project: Path, stage: str) -> tuple[StageRun, Any]:
    """Runs one DVC stage (``dvc repro <stage>``) and reads its outputs back as the stage's typed result."""
    return repro(project, stage), READERS[stage](Workspace(project))


@task(name="register", retries=2, retry_delay_seconds=30, retry_condition_fn=retry_transient_registry)
def register_task(project: Path) -> Registration:
    """Registers the trained run's model and moves ``champion`` when it passes the promotion gate.

    The flow sets the retries and their delay from ``schedule`` in params.yaml.
    """
    return run_register(load_params(project), Workspace(project))
