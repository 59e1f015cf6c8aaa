"""Prefect tasks for the retraining flow.

Each data or model stage is run through DVC (``dvc repro <stage>``), so a flow run leaves
``dvc.lock`` and the DVC cache exactly as ``dvc repro`` would and skips what did not change;
the task then reads the stage's outputs back as a typed result. Registration changes the
MLflow registry rather than producing files, so it runs in the flow's last task.

A scheduled run on unchanged data finishes in seconds: ingest compares the source's listing
(paths, sizes, modification times) with the last ingest's instead of copying and re-hashing
it, and when DVC's status finds every stage up to date, no ``dvc repro`` process is started.
"""

from __future__ import annotations

import json
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

from fracture.config import Params, load_params
from fracture.ingest import EX_TEMPFAIL, source_listing
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
#: The .dvc file that versions the data directory (``dvc add data``).
DATA_DVC = "data.dvc"

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
    unchanged: str | None = None  # why nothing was copied (the source as at the last ingest), or None

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


def _locked(project: Path, stage: str, lock_file: str = "dvc.lock") -> Any:
    """The stage's entry in ``lock_file`` (``None`` before it first ran): DVC's record of what it ran on."""
    lock = project / lock_file
    if not lock.is_file():
        return None
    return (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(stage)


def dvc_status(project: Path, targets: list[str]) -> dict[str, Any]:
    """DVC's status of ``targets`` in this process: ``{}`` when up to date.

    DVC compares each dependency, parameter and output with ``dvc.lock`` (or the ``.dvc``
    file), re-hashing only files whose size or modification time changed since it last hashed
    them (its state database), as ``dvc repro`` decides what to run.

    Args:
        project: the project root.
        targets: stage names of ``dvc.yaml``, or ``.dvc`` files relative to ``project``.
    """
    from dvc.repo import Repo  # noqa: PLC0415 - DVC's API loads slowly

    root = project.resolve()
    # Absolute targets: DVC resolves relative ones against the working directory, not the repo.
    paths = [str(root / t) if t.endswith(".dvc") else f"{root / 'dvc.yaml'}:{t}" for t in targets]
    with Repo(str(root)) as repo:
        return repo.status(targets=paths)


def _unchanged_source(
    workspace: Workspace, params: Params, source: str | None
) -> tuple[str | None, dict[str, object] | None]:
    """Why ingesting ``source`` again would change nothing (``None``: it must run), and its listing.

    Nothing to do when the source's listing equals the last ingest's, the project still holds
    the data version that ingest made (``data.dvc``), and ``data/`` matches ``data.dvc``. A
    download (no local source) is always made.
    """
    if source is None or not Path(source).expanduser().exists():
        return None, None  # figshare, or a wrong path the ingest command reports
    listing = source_listing(source)
    try:
        record = json.loads(workspace.ingest_record.read_text())
    except (OSError, ValueError):
        return None, listing
    version = workspace.data_version()
    same = (
        record.get("listing") == listing
        and record.get("layout") == params.ingest.layout
        and record.get("dest") == params.ingest.dest
        and version is not None
        and record.get("data_version") == version
    )
    if not same or dvc_status(workspace.root, [DATA_DVC]):
        return None, listing
    return (
        f"{listing['source']} holds the same {listing['files']} files (paths, sizes and modification times) "
        f"as at the last ingest, and {params.ingest.dest}/ still matches {DATA_DVC} ({version}): nothing copied"
    ), listing


def repro(project: Path, stage: str, dvc_file: str = "dvc.yaml") -> StageRun:
    """``dvc repro <dvc_file>:<stage>``; the stage ran when DVC's lock entry for it changed.

    An unchanged entry means DVC found the stage's dependencies, params and outputs as recorded
    (or restored the outputs from its run cache) and did not run the command.
    """
    started = time.perf_counter()
    lock_file = str(Path(dvc_file).with_suffix(".lock"))
    before = _locked(project, stage, lock_file)
    dvc(project, "repro", stage if dvc_file == "dvc.yaml" else f"{dvc_file}:{stage}")
    after = _locked(project, stage, lock_file)
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
    workspace, params = Workspace(project), load_params(project)
    previous = workspace.data_version()
    unchanged, listing = _unchanged_source(workspace, params, source)
    if unchanged is not None:
        get_run_logger().info(unchanged)
        return IngestSummary(previous, time.perf_counter() - started, previous, unchanged=unchanged)
    _run([sys.executable, "-m", "fracture.cli", "ingest", *(["--source", source] if source else [])], project)
    dvc(project, "add", "data")
    version = workspace.data_version()
    if listing is not None:
        # Listed before copying: a file changed during the copy makes the next run copy again.
        record = {"listing": listing, "layout": params.ingest.layout, "dest": params.ingest.dest,
                  "data_version": version}
        workspace.ingest_record.parent.mkdir(parents=True, exist_ok=True)
        workspace.ingest_record.write_text(json.dumps(record, indent=2) + "\n")
    return IngestSummary(version, time.perf_counter() - started, previous)


@task(name="stage", task_run_name="{stage}")
def stage_task(project: Path, stage: str, up_to_date: bool = False) -> tuple[StageRun, Any]:
    """Runs one DVC stage (``dvc repro <stage>``) and reads its outputs back as the stage's typed result.

    With ``up_to_date`` (DVC's status found the whole pipeline as ``dvc.lock`` records it), no
    ``dvc repro`` process is started: it would run nothing.
    """
    if up_to_date:
        started = time.perf_counter()
        result = READERS[stage](Workspace(project))
        return StageRun(stage, False, time.perf_counter() - started), result
    return repro(project, stage), READERS[stage](Workspace(project))


#: The detector's DVC stages (``detect/dvc.yaml``), run after the classifier's when ``detect.enabled``.
DETECT_DVC = "detect/dvc.yaml"
DETECT_STAGES = ("detect_train", "detect_evaluate")


@task(name="detect")
def detect_task(project: Path) -> tuple[dict[str, StageRun], dict[str, float]]:
    """Runs the detector's stages through DVC (``dvc repro detect/dvc.yaml:<stage>``).

    Returns:
        Whether DVC ran each stage, and the test metrics ``detect_evaluate`` wrote.
    """
    runs = {stage: repro(project, stage, DETECT_DVC) for stage in DETECT_STAGES}
    return runs, json.loads(Workspace(project).detect_metrics.read_text())


@task(name="detect-register", retries=2, retry_delay_seconds=30, retry_condition_fn=retry_transient_registry)
def detect_register_task(project: Path) -> Registration:
    """Registers the detector (``detect.model_name``) and moves its ``champion`` when it passes its gate."""
    from fracture.stages.detect import run_detect_register  # noqa: PLC0415 - torchvision's detection loads slowly

    return run_detect_register(load_params(project), Workspace(project))


@task(name="register", retries=2, retry_delay_seconds=30, retry_condition_fn=retry_transient_registry)
def register_task(project: Path) -> Registration:
    """Registers the trained run's model and moves ``champion`` when it passes the promotion gate.

    The flow sets the retries and their delay from ``schedule`` in params.yaml.
    """
    return run_register(load_params(project), Workspace(project))
