"""Prefect tasks for the retraining flow.

Each data or model stage is run through DVC (``dvc repro <stage>``), so a flow run leaves
``dvc.lock`` and the DVC cache exactly as ``dvc repro`` would and skips what did not change;
the task then reads the stage's outputs back as a typed result. Registration changes the
MLflow registry rather than producing files, so it runs in the flow's last task.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import requests
from mlflow.exceptions import MlflowException
from prefect import get_run_logger, task

from fracture.cli import EVAL_DIR, PREP_DIR, REPORT, SPLIT_DIR, TRAIN_DIR, data_version, serving_config, setup_mlflow
from fracture.config import load_params
from fracture.ingest import EX_TEMPFAIL
from fracture.registry import EvaluatedSplit, Registration, register

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


@dataclass(frozen=True)
class ValidationSummary:
    run: StageRun
    counts: dict[str, Any]
    soft_findings: dict[str, int]
    excluded: int
    duplicate_groups: int


@dataclass(frozen=True)
class SplitSummary:
    run: StageRun
    sizes: dict[str, int]
    fractured: dict[str, int]


@dataclass(frozen=True)
class PrepareSummary:
    run: StageRun
    images: int
    input_size: list[int]
    aspect: str
    images_per_s: float


@dataclass(frozen=True)
class TrainSummary:
    run: StageRun
    run_id: str
    profile: str
    architecture: str
    best_epoch: int
    best_val_roc_auc: float


@dataclass(frozen=True)
class EvaluationSummary:
    run: StageRun
    metrics: dict[str, Any]


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


def repro(project: Path, stage: str) -> StageRun:
    """``dvc repro <stage>``; tells whether DVC ran the stage or found it up to date."""
    started = time.perf_counter()
    output = dvc(project, "repro", stage)
    ran = f"Stage '{stage}' didn't change, skipping" not in output
    return StageRun(stage, ran, time.perf_counter() - started)


def retry_transient_ingest(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect ``retry_condition_fn``: retries the ingest task only after a transient failure.

    ``fracture ingest`` exits with ``EX_TEMPFAIL`` (75) for network errors, cut-short
    transfers and HTTP 5xx, which a later try may not meet. A wrong local path, a bad layout,
    a checksum mismatch or a zip-slip member fail the same way every time, so they are
    reported at once instead of after the retry delays.

    Args:
        task: the task (unused; part of Prefect's signature).
        task_run: the failed run (unused; part of Prefect's signature).
        state: the Failed state; its result re-raises the task's exception.

    Returns:
        Whether Prefect should apply the task's retry policy.
    """
    try:
        state.result()
    except StageFailed as exc:
        return exc.returncode == EX_TEMPFAIL
    except Exception:  # noqa: BLE001 - anything else is no known transient failure
        return False
    return False


def retry_transient_registry(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect ``retry_condition_fn``: retries the register task only after a transient failure.

    An unreachable or overloaded tracking server, a timeout or a locked database may be gone on
    the next try; a missing metric, an unknown run or a permission error stays, so it is
    reported at once.

    Args:
        task: the task (unused; part of Prefect's signature).
        task_run: the failed run (unused; part of Prefect's signature).
        state: the Failed state; its result re-raises the task's exception.

    Returns:
        Whether Prefect should apply the task's retry policy.
    """
    try:
        state.result()
    except MlflowException as exc:
        return exc.error_code in TRANSIENT_MLFLOW_ERRORS
    except (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError):
        return True
    except Exception:  # noqa: BLE001 - anything else is no known transient failure
        return False
    return False


@task(name="ingest", retries=2, retry_delay_seconds=30, retry_condition_fn=retry_transient_ingest)
def ingest_task(project: Path, source: str | None) -> IngestSummary:
    """Brings FracAtlas in (local copy, zip or figshare) and versions it with ``dvc add``.

    The flow sets the retries and their delay from ``schedule`` in params.yaml.
    """
    started = time.perf_counter()
    previous = data_version(project)
    _run([sys.executable, "-m", "fracture.cli", "ingest", *(["--source", source] if source else [])], project)
    dvc(project, "add", "data")
    return IngestSummary(data_version(project), time.perf_counter() - started, previous)


@task(name="validate")
def validate_task(project: Path) -> ValidationSummary:
    run = repro(project, "validate")
    report = json.loads((project / REPORT).read_text())
    soft = {f["rule"]: f["unexpected_count"] for f in report["findings"] if not f["success"]}
    return ValidationSummary(run, report["counts"], soft, len(report["excluded"]), len(report["duplicate_groups"]))


@task(name="split")
def split_task(project: Path) -> SplitSummary:
    run = repro(project, "split")
    sizes, fractured = {}, {}
    for name in ("train", "val", "test"):
        frame = pd.read_csv(project / SPLIT_DIR / f"{name}.csv", usecols=["label"])
        sizes[name], fractured[name] = len(frame), int(frame["label"].sum())
    return SplitSummary(run, sizes, fractured)


@task(name="prepare")
def prepare_task(project: Path) -> PrepareSummary:
    run = repro(project, "prepare")
    meta = json.loads((project / PREP_DIR / "meta.json").read_text())
    timing = json.loads((project / PREP_DIR / "timing.json").read_text())
    return PrepareSummary(run, meta["images"], meta["input_size"], meta["aspect"], timing["images_per_s"])


@task(name="train")
def train_task(project: Path) -> TrainSummary:
    run = repro(project, "train")
    model = json.loads((project / TRAIN_DIR / "model.json").read_text())
    run_id = json.loads((project / TRAIN_DIR / "run.json").read_text())["run_id"]
    return TrainSummary(
        run, run_id, model["profile"], model["architecture"], model["best_epoch"], model["best_val_roc_auc"]
    )


@task(name="evaluate")
def evaluate_task(project: Path) -> EvaluationSummary:
    run = repro(project, "evaluate")
    return EvaluationSummary(run, json.loads((project / EVAL_DIR / "metrics.json").read_text()))


@task(name="register", retries=2, retry_delay_seconds=30, retry_condition_fn=retry_transient_registry)
def register_task(project: Path, trained: TrainSummary) -> Registration:
    """Registers the trained run's model and moves ``champion`` when it passes the promotion gate.

    The flow sets the retries and their delay from ``schedule`` in params.yaml.
    """
    params = load_params(project)
    setup_mlflow(params, project)
    return register(
        params.register,
        trained.run_id,
        project / TRAIN_DIR / "model.safetensors",
        serving_config(project),
        EvaluatedSplit.from_csv(
            project / SPLIT_DIR / "test.csv", project / params.ingest.dest, params.validate.on_truncated == "keep"
        ),
    )
