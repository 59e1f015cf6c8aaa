"""Prefect tasks for the retraining flow.

Each data or model stage is reproduced by DVC (its Python API's ``reproduce``, as ``dvc repro
-s <stage>``), so a flow run leaves ``dvc.lock`` and the DVC cache exactly as ``dvc repro``
would and skips what did not change; the task then reads the stage's outputs back as a typed
result. DVC decides whether a stage runs, removes its old outputs, tries its run cache, and
hashes, caches and locks what the stage wrote, all in the flow's process. Only the stage's
command differs: when it is a ``fracture`` command, as every stage of ``dvc.yaml`` is, it runs
in this process too (``fracture.cli.main``) instead of a new Python interpreter that imports
torch, timm and MLflow again for every stage. Any other command runs as DVC runs it, in a
shell. Registration changes the MLflow registry rather than producing files, so it runs in the
flow's last task.

A scheduled run on unchanged data finishes in seconds: ingest compares the source's listing
(paths, sizes, modification times) with the last ingest's instead of copying and re-hashing
it, and when DVC's status finds every stage up to date, no stage is reproduced.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
from mlflow.exceptions import MlflowException
from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError
from prefect.logging import get_logger

from fracture import cli
from fracture.config import Params, load_params
from fracture.ingest import EX_TEMPFAIL, source_listing
from fracture.registry import Registration
from fracture.stages.register import run_register
from fracture.workspace import Workspace, status_paths

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
# overloaded or timed out (MLflow reports an unreachable server as INTERNAL_ERROR, which is also its
# code for any other error: retry_transient_registry reads those apart).
TRANSIENT_MLFLOW_ERRORS = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED", "ABORTED"}
)

if TYPE_CHECKING:
    from dvc.repo import Repo
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
    """Whether ``dvc repro`` ran a stage or found it up to date, and how long the call took.

    Attributes:
        stage: the stage's name.
        ran: DVC ran its command or restored its outputs from the run cache.
        seconds: the whole call: DVC's checks, the command, and DVC's hashing, caching and locking.
        command_seconds: how long the stage's command itself ran; ``None`` when DVC ran none.
    """

    stage: str
    ran: bool
    seconds: float
    command_seconds: float | None = None

    @property
    def restored(self) -> bool:
        """DVC restored the stage's outputs from its run cache (an earlier run with these
        dependencies and params): its command did not run."""
        return self.ran and self.command_seconds is None

    @property
    def outcome(self) -> str:
        """``ran``, ``restored`` (from DVC's run cache) or ``up to date``, as DVC's run reports are worded."""
        return "restored" if self.restored else "ran" if self.ran else "up to date"

    @property
    def dvc_seconds(self) -> float | None:
        """DVC's work around the command (status, run cache, removing, hashing, caching and locking
        outputs, ``dvc.lock``): what reproducing through DVC costs over calling the stage; ``None``
        when DVC ran no command."""
        return None if self.command_seconds is None else self.seconds - self.command_seconds

    def describe(self) -> str:
        """The outcome and the seconds: of the call, and of the command and DVC's work when it ran one."""
        line = f"{self.outcome:<10} {self.seconds:7.1f} s"
        if self.command_seconds is not None:
            line += f" (command {self.command_seconds:.1f} s, DVC {self.dvc_seconds:.1f} s)"
        return line


@dataclass(frozen=True)
class IngestSummary:
    """The dataset version (DVC's md5 of ``data``) after ingest, and the one the last completed run
    ended with (before any run completed: the one before this ingest)."""

    data_version: str | None
    seconds: float
    previous_version: str | None = None
    unchanged: str | None = None  # why nothing was copied (the source as at the last ingest), or None

    @property
    def changed(self) -> bool:
        """Whether the run has a dataset other than the one the last completed run ended with."""
        return self.data_version != self.previous_version


#: A stage command run in the flow's own process: ``fracture`` and its arguments, nothing for a shell.
IN_PROCESS_COMMAND = re.compile(r"fracture(?:[ \t]+[\w./=-]+)*")


def run_logger(name: str = __name__) -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The Prefect run's logger inside a flow or task run; outside one, Prefect's logger ``name``.

    Outside a run (a flow's or task's function called as ``retrain.fn(...)`` from a notebook or a
    test, a stage reproduced from a script) ``get_run_logger`` raises ``MissingContextError``;
    Prefect's ``get_logger`` then prints with the same console format and sends nothing to the API.

    Args:
        name: the logger's name outside a run (under Prefect's ``prefect.`` logger).
    """
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger(name)


def _exit_status(exc: SystemExit) -> tuple[int, str]:
    """A failed command's exit status and message, as its process would have ended with them.

    A status the command chose for a cause (``fracture ingest``'s 75 for a transient failure:
    a download cut short, an export still being copied) carries the cause's message, which the
    command printed: a run that fails after its retries says why, not only "exit 75".
    """
    if isinstance(exc.code, int):
        return exc.code, f"exit {exc.code}" + (f": {exc.__cause__}" if exc.__cause__ is not None else "")
    return 1, str(exc.code)  # sys.exit("message"): the message on stderr, exit status 1


def run_command(project: Path, argv: list[str]) -> None:
    """Runs ``fracture <argv>`` in this process, from the project root, as the console script would.

    Raises:
        StageFailed: the command exited with an error; the message is the one it printed.
    """
    run_logger().info("$ fracture %s", " ".join(argv))
    with contextlib.chdir(project):
        try:
            cli.main(argv)
        except SystemExit as exc:
            status, message = _exit_status(exc)
            raise StageFailed(f"`fracture {' '.join(argv)}` failed: {message}", status) from None


def _command_in_process(shell_run: Callable[..., None], timings: list[float]) -> Callable[..., None]:
    """DVC's ``cmd_run`` for a stage, running a ``fracture`` command in this process.

    DVC calls it with the repository unlocked, after removing the stage's outputs and missing
    its run cache, and saves, caches and locks the outputs after it returns, as for any command.
    A command of another kind, several commands, or a dry run go to DVC's own ``shell_run``.
    Each call's seconds are appended to ``timings``, whether the command succeeds or fails.
    """

    def cmd_run(stage: Any, dry: bool = False, run_env: dict[str, str] | None = None) -> None:
        started = time.perf_counter()
        try:
            commands = stage.cmd if isinstance(stage.cmd, list) else stage.cmd.splitlines()
            if dry or len(commands) != 1 or not IN_PROCESS_COMMAND.fullmatch(commands[0].strip()):
                return shell_run(stage, dry=dry, run_env=run_env)
            # A failure raises StageFailed, which DVC wraps as the cause of its ReproductionError.
            return run_command(Path(stage.wdir), commands[0].split()[1:])
        finally:
            timings.append(time.perf_counter() - started)

    return cmd_run


@contextlib.contextmanager
def _fracture_commands_in_process(timings: list[float]) -> Iterator[None]:
    """While open, DVC runs a stage's ``fracture`` command in this process (see the module's doc),
    and each command's seconds are appended to ``timings``.

    DVC has no option for this: its ``run_stage`` calls the module's ``cmd_run``, which is
    swapped for the time of one ``reproduce`` call and put back after it. The flow's run is the
    only work in its process (``fracture.project_lock``).
    """
    import dvc.stage.run as dvc_run  # noqa: PLC0415 - DVC's API loads slowly

    shell_run = dvc_run.cmd_run
    dvc_run.cmd_run = _command_in_process(shell_run, timings)
    try:
        yield
    finally:
        dvc_run.cmd_run = shell_run


@contextlib.contextmanager
def _params_unchanged_while_commands_run() -> Iterator[None]:
    """While open, a stage whose params change while its command runs fails before DVC records it.

    DVC reads a stage's params for ``dvc.lock`` and its run cache only once the command has
    returned: params.yaml edited during a long stage (the next run's learning rate, say) would be
    recorded as what the outputs were made with, and the next run would find nothing to do. So
    the stage's params are read as its command starts and compared with what DVC reads after it
    (``Stage.save_deps``, before it hashes the outputs, fills the run cache or writes
    ``dvc.lock``); on a difference StageFailed is raised there, and DVC records nothing of the run:
    ``dvc.lock`` keeps the stage's previous record, which the outputs no longer match, so the next
    run reproduces the stage. Costs one read of the params file per command. Patched like
    :func:`_fracture_commands_in_process`, for the time of one ``reproduce`` call.
    """
    import dvc.stage.run as dvc_run  # noqa: PLC0415 - DVC's API loads slowly
    from dvc.dependency.param import ParamsDependency  # noqa: PLC0415
    from dvc.stage import Stage  # noqa: PLC0415

    def params_of(stage: Any, read: Callable[[Any], dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {str(dep): read(dep) for dep in stage.deps if isinstance(dep, ParamsDependency)}

    started: dict[str, dict[str, dict[str, Any]]] = {}
    command_run, save_deps = dvc_run.cmd_run, Stage.save_deps

    def cmd_run(stage: Any, dry: bool = False, run_env: dict[str, str] | None = None) -> None:
        if not dry:
            started[stage.addressing] = params_of(stage, lambda dep: dep.read_params())
        return command_run(stage, dry=dry, run_env=run_env)

    def checked_save_deps(stage: Any, *args: Any, **kwargs: Any) -> None:
        save_deps(stage, *args, **kwargs)
        before = started.pop(stage.addressing, None)
        if before is None:  # DVC's own read before the command, or outputs restored from its run cache
            return
        # What DVC just read is what it would record: each params dependency's hash_info.
        changes = _changed_params(before, params_of(stage, lambda dep: dep.hash_info.value or {}))
        if changes:
            files = ", ".join(sorted({change.partition(": ")[0] for change in changes}))
            raise StageFailed(
                f"{files} changed while the stage ran ({'; '.join(changes[:5])}"
                f"{f'; and {len(changes) - 5} more' if len(changes) > 5 else ''}). Its outputs were made with the "
                "values as the stage started, so nothing of this run was recorded in dvc.lock or DVC's run cache. "
                f"Rerun the stage with the params as they are now: run the flow again, or `dvc repro -s {stage.addressing}`"
            )

    dvc_run.cmd_run = cmd_run
    Stage.save_deps = checked_save_deps  # type: ignore[method-assign]
    try:
        yield
    finally:
        dvc_run.cmd_run = command_run
        Stage.save_deps = save_deps  # type: ignore[method-assign]


def _changed_params(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> list[str]:
    """``<file>: <key> <old> -> <new>`` for each param, nested sections' keys spelled out, that differs."""
    changes = []
    for path in sorted(before.keys() | after.keys()):
        old, new = _flat(before.get(path, {})), _flat(after.get(path, {}))
        for key in dict.fromkeys([*old, *new]):
            if key not in old or key not in new or old[key] != new[key]:
                shown = [repr(side[key])[:40] if key in side else "(absent)" for side in (old, new)]
                changes.append(f"{path}: {key} {shown[0]} -> {shown[1]}")
    return changes


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``values`` with nested mappings' keys joined by dots (``train.lr``), as dvc.yaml names params."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


#: The loggers DVC prints its messages through, each with its own console handlers (``dvc.logger.setup``).
DVC_LOGGERS = ("dvc", "dvc_data", "dvc_objects")

@contextlib.contextmanager
def open_repo(root: Path) -> Iterator[Repo]:
    """DVC's ``Repo`` at ``root``, opened from the root as the command line runs, each message printed once.

    DVC prints its messages (``Running stage``, ``Updating lock file``) with handlers of its own,
    and they also reach the root logger, which in a flow run has Prefect's console handler: each
    line came out twice. While the repository is open, DVC's handlers stand aside when the root
    logger has any, so each message is printed once, with the flow's time stamps; with none (a
    plain script) DVC prints as on the command line. DVC's reminder to ``git add`` the files it
    wrote, which it would give after every call, is left to the flow, which gives it once
    (:func:`uncommitted`).
    """
    from dvc.repo import Repo  # noqa: PLC0415 - DVC's API loads slowly

    loggers = [logging.getLogger(name) for name in DVC_LOGGERS]
    own = [list(logger.handlers) for logger in loggers]
    if logging.getLogger().handlers:
        for logger, handlers in zip(loggers, own, strict=True):
            for handler in handlers:
                logger.removeHandler(handler)
    try:
        with contextlib.chdir(root), Repo(str(root)) as repo:
            repo.scm_context.quiet = True
            yield repo
    finally:
        for logger, handlers in zip(loggers, own, strict=True):
            for handler in handlers:
                if handler not in logger.handlers:
                    logger.addHandler(handler)


def uncommitted(project: Path, paths: tuple[str, ...] = (DATA_DVC, "dvc.lock")) -> list[str]:
    """Which of ``paths`` (and any ``.gitignore`` DVC wrote) git shows as new or changed; ``[]`` outside git.

    The paths are relative to ``project``, as ``git add`` typed there takes them, also when the
    project is a folder inside its git repository.
    """
    return status_paths(project, "--untracked-files=all", "--", *paths, ":(glob)**/.gitignore")


def dvc_status(project: Path, targets: list[str]) -> dict[str, Any]:
    """DVC's status of ``targets`` in this process: ``{}`` when up to date.

    DVC compares each dependency, parameter and output with ``dvc.lock`` (or the ``.dvc``
    file), re-hashing only files whose size or modification time changed since it last hashed
    them (its state database), as ``dvc repro`` decides what to run.

    Args:
        project: the project root.
        targets: stage names of ``dvc.yaml``, or ``.dvc`` files relative to ``project``.
    """
    root = project.resolve()
    # Absolute targets: DVC resolves relative ones against the working directory, not the repo.
    paths = [str(root / t) if t.endswith(".dvc") else f"{root / 'dvc.yaml'}:{t}" for t in targets]
    with open_repo(root) as repo:
        return repo.status(targets=paths)


def dvc_add_data(project: Path) -> None:
    """``dvc add data`` in this process: hashes the data directory, caches it and writes ``data.dvc``."""
    root, data = project.resolve(), DATA_DVC.removesuffix(".dvc")
    run_logger().info("dvc add %s", data)
    with open_repo(root) as repo:
        repo.add(data)


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
    """``dvc repro --single-item <dvc_file>:<stage>`` in this process; its ``fracture`` command too.

    The flow reproduces the stages in ``dvc.yaml``'s order, so each one's upstream stages are
    already reproduced and only the stage itself is checked. The stage ran when DVC ran its
    command or restored its outputs from the run cache; otherwise DVC found its dependencies,
    params and outputs as ``dvc.lock`` records them.

    Raises:
        StageFailed: the stage's command failed (its message and exit status), its params changed
            while it ran, or DVC could not reproduce it; DVC recorded nothing of the failed run in
            ``dvc.lock``.
    """
    from dvc.exceptions import DvcException  # noqa: PLC0415 - DVC's API loads slowly

    started = time.perf_counter()
    root = project.resolve()
    target = f"{dvc_file}:{stage}"
    run_logger().info("dvc repro -s %s", target)
    commands: list[float] = []
    try:
        # From the project root, as the command line runs: DVC reads some paths against it.
        with open_repo(root) as repo, _fracture_commands_in_process(commands), _params_unchanged_while_commands_run():
            reproduced = repo.reproduce(target, single_item=True)
    except DvcException as exc:
        cause = exc.__cause__
        if isinstance(cause, StageFailed):  # the command's own message and exit status
            raise StageFailed(f"stage {stage}: {cause}", cause.returncode) from exc
        raise StageFailed(f"stage {stage}: {exc}" + (f": {cause}" if cause else "")) from exc
    return StageRun(stage, bool(reproduced), time.perf_counter() - started, sum(commands) if commands else None)


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
    transfers, HTTP 5xx and a local source that changed while it was copied (an export still
    being written), which a later try may not meet. A wrong local path, a bad layout,
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
        if exc.error_code == "INTERNAL_ERROR":
            # MLflow's code for any error raised without one of its own (an out-of-date database
            # schema, say): transient only where the request itself failed (MLflow's REST client
            # words those "API request to ...") or the database was busy.
            text = str(exc.message)
            return text.startswith("API request to") or "database is locked" in text
        return exc.error_code in TRANSIENT_MLFLOW_ERRORS
    if isinstance(exc, requests.exceptions.SSLError):
        return False  # a certificate the client does not trust stays untrusted
    return isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError))


def evaluated_on(project: Path, version: str | None) -> bool:
    """Whether dvc.lock records the evaluate stage, the pipeline's last, run on data version ``version``."""
    import yaml  # noqa: PLC0415

    if version is None:
        return False
    try:
        deps = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["evaluate"]["deps"]
        return any(dep.get("path") == "data" and dep.get("md5") == version for dep in deps)
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return False


# Every task returns what the flow reads at once and keeps nothing of it in Prefect
# (persist_result=False): DVC caches the stages' outputs and MLflow the models, and without a
# persisted result Prefect neither writes one (a profile or server may set
# PREFECT_RESULTS_PERSIST_BY_DEFAULT) nor hashes each call's inputs and source for a cache key.
@task(
    name="ingest", retries=2, retry_delay_seconds=30, retry_condition_fn=retry_transient_ingest,
    persist_result=False,
)
def ingest_task(project: Path, source: str | None) -> IngestSummary:
    """Brings FracAtlas in (local copy, zip or figshare) and versions it with ``dvc add``.

    The flow sets the retries and their delay from ``schedule`` in params.yaml.
    """
    started = time.perf_counter()
    workspace, params = Workspace(project), load_params(project)
    current = workspace.data_version()
    # The data the last completed run ended with: after a run that failed past its ingest, data.dvc
    # already holds the new version, which no model was trained on yet. A project with no completed
    # run on record (its runs made before the record existed) counts data.dvc's version only when
    # dvc.lock has the pipeline evaluated on it: after a first run that failed, the data is new.
    previous = workspace.completed_data_version() or (current if evaluated_on(project, current) else None)
    unchanged, listing = _unchanged_source(workspace, params, source)
    if unchanged is not None:
        run_logger().info(unchanged)
        return IngestSummary(current, time.perf_counter() - started, previous, unchanged=unchanged)
    run_command(project, ["ingest", *(["--source", source] if source else [])])
    dvc_add_data(project)
    version = workspace.data_version()
    if listing is not None:
        # Listed before copying: a file changed during the copy makes the next run copy again.
        record = {"listing": listing, "layout": params.ingest.layout, "dest": params.ingest.dest,
                  "data_version": version}
        workspace.ingest_record.parent.mkdir(parents=True, exist_ok=True)
        workspace.ingest_record.write_text(json.dumps(record, indent=2) + "\n")
    return IngestSummary(version, time.perf_counter() - started, previous)


@task(name="stage", task_run_name="{stage}", persist_result=False)
def stage_task(project: Path, stage: str, up_to_date: bool = False) -> tuple[StageRun, Any]:
    """Reproduces one DVC stage (:func:`repro`) and reads its outputs back as the stage's typed result.

    With ``up_to_date`` (DVC's status found the whole pipeline as ``dvc.lock`` records it), DVC
    is not asked again: it would run nothing.
    """
    if up_to_date:
        started = time.perf_counter()
        result = READERS[stage](Workspace(project))
        return StageRun(stage, False, time.perf_counter() - started), result
    return repro(project, stage), READERS[stage](Workspace(project))


#: The detector's DVC stages (``detect/dvc.yaml``), run after the classifier's when ``detect.enabled``.
DETECT_DVC = "detect/dvc.yaml"
DETECT_STAGES = ("detect_train", "detect_evaluate")


@task(name="detect", persist_result=False)
def detect_task(project: Path) -> tuple[dict[str, StageRun], dict[str, float]]:
    """Reproduces the detector's stages through DVC (``dvc repro -s detect/dvc.yaml:<stage>``, :func:`repro`).

    Returns:
        Whether DVC ran each stage, and the test metrics ``detect_evaluate`` wrote.
    """
    runs = {stage: repro(project, stage, DETECT_DVC) for stage in DETECT_STAGES}
    return runs, json.loads(Workspace(project).detect_metrics.read_text())


@task(
    name="detect-register", retries=2, retry_delay_seconds=30, retry_condition_fn=retry_transient_registry,
    persist_result=False,
)
def detect_register_task(project: Path) -> Registration:
    """Registers the detector (``detect.model_name``) and moves its ``champion`` when it passes its gate."""
    from fracture.stages.detect import run_detect_register  # noqa: PLC0415 - torchvision's detection loads slowly

    return run_detect_register(load_params(project), Workspace(project))


@task(
    name="register", retries=2, retry_delay_seconds=30, retry_condition_fn=retry_transient_registry,
    persist_result=False,
)
def register_task(project: Path) -> Registration:
    """Registers the trained run's model and moves ``champion`` when it passes the promotion gate.

    The flow sets the retries and their delay from ``schedule`` in params.yaml.
    """
    return run_register(load_params(project), Workspace(project))
