"""The retraining flow: ingest, validate, split, train, evaluate, register; then, when params.yaml
sets ``detect.enabled``, the fracture detector's stages and its registration.

Run it with ``python -m flows.retrain [--source PATH] [--profile NAME]`` from the project root.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import requests
import torch
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import get_default_host_creds
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import deployment, flow_run
from ruamel.yaml import YAML
from ruamel.yaml.representer import RoundTripRepresenter

from flows.report import (
    REPORT_KEY,
    no_champion_note,
    registry_summary,
    render_failure_report,
    render_report,
)
from flows.result import (
    DetectorResult,
    RegistryState,
    RetrainFailure,
    RetrainResult,
    SinceChampion,
    VersionOrigin,
    as_of_run,
)
from fracture.allocator import freed_memory_kept
from fracture.cli import known_errors, skip_exit_collection
from fracture.config import (
    PARAMS_FILE,
    Profile,
    load_params,
    parse_params,
    read_params_yaml,
    tracking_uri,
)
from fracture.ingest import SOURCE_ENV
from fracture.project_lock import project_lock as fracture_project_lock
from fracture.registry import (
    CHAMPION,
    READY,
    TAG_DATA,
    TAG_DECISION,
    TAG_ROLLED_BACK,
    Registration,
)
from fracture.tracking import TrainingRunMissing, training_run
from fracture.workspace import (
    ASSIGNMENTS_FILE,
    GIT_COMMIT_TAG,
    GIT_DIRTY_FILES_TAG,
    Workspace,
    replace_text,
)
from tasks.pipeline import (
    DVC_STAGES,
    IngestSummary,
    StageRun,
    detect_register_task,
    detect_task,
    dvc_status,
    ingest_task,
    register_task,
    run_logger,
    stage_task,
    uncommitted,
)

#: How long the check before a run waits for the MLflow tracking server to answer, in seconds.
TRACKING_CHECK_TIMEOUT_S = 5
#: How many times that check asks before the run fails: a server restarting or a proxy reloading
#: for a second or two does not fail the week's run (``schedule.retries`` does not repeat this check).
TRACKING_CHECK_ATTEMPTS = 3
#: Seconds between those attempts. With the timeout, a server that never answers fails the run
#: within 3 x 5 + 2 x 2 = 19 s, not after MLflow's own minutes of retries.
TRACKING_CHECK_PAUSE_S = 2
#: What a reverse proxy or load balancer answers for a tracking server behind it that is down.
GATEWAY_DOWN = frozenset({502, 503, 504})


class TrackingServerUnreachable(RuntimeError):
    """The MLflow tracking server ``MLFLOW_TRACKING_URI`` names does not answer; the run changed nothing."""


@contextmanager
def project_lock(project: Path, wait: float = 0) -> Iterator[None]:
    """One retrain run at a time per project (:func:`fracture.project_lock.project_lock`).

    Scheduled runs never get here twice: the deployment's ``schedule.concurrency_limit`` queues
    them. A ``fracture`` command typed meanwhile in the project is refused too, while the flow's
    own stage commands run under its hold.

    Args:
        project: the project root.
        wait: seconds to wait for another holder (a ``fracture`` command, a one-shot run) to
            finish, saying once whom the run waits for (:func:`busy_wait`); 0 refuses at once.

    Raises:
        ProjectBusy: another run or command holds the project (still, after ``wait``); the message says which.
    """
    holder = f"flow run {flow_run.get_name() or '(outside Prefect)'}"
    with fracture_project_lock(project, holder, wait, run_logger(__name__).warning):
        yield


def busy_wait(project: Path, from_deployment: bool) -> float:
    """Seconds a run waits for the project when another run or command holds it.

    A deployment's run (scheduled, or started from the UI or ``prefect deployment run``) has no
    one to start it again, so it waits ``schedule.busy_wait_seconds`` for a ``fracture`` command
    or a one-shot run to finish. A one-shot run (``python -m flows.retrain``, ``make main``) is
    refused at once, as a command typed by hand is: whoever started it is there to run it again.
    """
    return load_params(project).schedule.busy_wait_seconds if from_deployment else 0


def choose_profile(requested: str | None, cuda: bool) -> tuple[str, str]:
    """The profile to train with and why.

    Args:
        requested: a profile named by the caller, or ``None`` to choose by hardware.
        cuda: whether a CUDA device is visible.

    Returns:
        The profile name and a sentence saying why it was chosen.
    """
    if requested:
        return requested, f"profile '{requested}' was requested"
    if cuda:
        return "paper", "a CUDA device is present: using the paper profile (EfficientNet-B6)"
    return "cpu", (
        "no CUDA device found: using the CPU profile (EfficientNet-Lite0, small images, few epochs); "
        "the paper profile (EfficientNet-B6 at 528 px) needs a GPU"
    )


def set_profile(project: Path, profile: str) -> bool:
    """Writes ``train.profile`` into params.yaml, keeping its comments, so DVC tracks it.

    The profile is a DVC param on purpose: ``dvc.lock`` then records which recipe made the
    model, ``dvc repro`` alone rebuilds the same one, and a GPU machine's model is never taken
    for a CPU machine's. The file changes only when the hardware calls for another profile than
    it names (once per machine, not on every scheduled run); set ``train.profile`` in the
    checkout a machine runs, or pass ``--profile``, to keep it as committed.

    Returns:
        Whether the file changed.
    """
    path = project / PARAMS_FILE
    # Read with the C parser first: ruamel's comment-keeping parser, ten times slower, only to write.
    if read_params_yaml(path.read_text())["train"]["profile"] == profile:
        return False
    yaml = YAML()
    yaml.preserve_quotes = True  # e.g. schedule.cron stays "0 3 * * 1" as written
    # Write nulls as `null`, as the file spells them, rather than ruamel's empty value. On a class
    # of this YAML's own: ruamel's add_representer changes the class it is called on, and on
    # RoundTripRepresenter itself it changed every later dump in the process, dvc.lock's included.
    yaml.Representer = type("ParamsRepresenter", (RoundTripRepresenter,), {})
    yaml.Representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    data = yaml.load(path)
    if profile not in data["profiles"]:
        raise ValueError(f"{path}: no profile named '{profile}' (profiles: {list(data['profiles'])})")
    data["train"]["profile"] = profile
    replace_text(path, lambda out: yaml.dump(data, out))
    return True


def require_tracking_server(project: Path, say: Callable[[str], None] | None = None) -> None:
    """Fails before a run changes anything when the tracking server it registers with does not answer.

    Without this check a run whose ``MLFLOW_TRACKING_URI`` names a server that is down or mistyped
    would work until its first registry read, then spend minutes in MLflow's own retries. Each
    attempt is one request with a short timeout (:data:`TRACKING_CHECK_TIMEOUT_S`); any HTTP answer,
    an error status included, counts: MLflow's own calls report what the server says; but a proxy's
    502, 503 or 504 (:data:`GATEWAY_DOWN`) says the server behind it does not answer. Only an
    http(s) URI is checked: the project's ``mlflow.db`` or another local store needs no server.
    A server that does not answer is asked again, :data:`TRACKING_CHECK_ATTEMPTS` times in all,
    :data:`TRACKING_CHECK_PAUSE_S` apart, so a server restarting or a proxy reloading for a second
    or two does not fail the run; the run itself does not repeat this check (``schedule.retries``):
    the next run checks again, and the register tasks still retry a server that goes away in the
    middle of a run.

    Args:
        project: the project root (its ``MLFLOW_TRACKING_URI``, or its own ``mlflow.db``).
        say: told of each attempt that got no answer and is tried again; ``None`` says nothing
            (``python -m flows.retrain``'s check, whose error is one line).

    Raises:
        TrackingServerUnreachable: no attempt got an answer; the message names the URI, what to do and
            how many attempts were made.
    """
    uri = tracking_uri(project)
    if urlparse(uri).scheme not in ("http", "https"):
        return
    creds = get_default_host_creds(uri)  # MLflow's TLS settings: MLFLOW_TRACKING_INSECURE_TLS and the like
    attempts = TRACKING_CHECK_ATTEMPTS
    for attempt in range(1, attempts + 1):
        try:
            answer = requests.get(
                f"{uri.rstrip('/')}/health", timeout=TRACKING_CHECK_TIMEOUT_S, verify=creds.verify,
                cert=creds.client_cert_path, allow_redirects=False,
            )
            if answer.status_code in GATEWAY_DOWN:  # a proxy in front answered for a server behind it that does not
                raise requests.ConnectionError(f"HTTP {answer.status_code} {answer.reason} from the proxy in front of it")
            return
        except requests.RequestException as exc:
            cause: BaseException = exc
            while (inner := cause.__cause__ or cause.__context__) is not None:
                cause = inner  # the socket's own error: connection refused, timed out, unknown host
            reason = str(cause) or type(cause).__name__
        if attempt < attempts:
            if say is not None:
                say(f"the MLflow tracking server at {uri} (MLFLOW_TRACKING_URI) does not answer ({reason}); "
                    f"asking again in {TRACKING_CHECK_PAUSE_S:g} s (attempt {attempt} of {attempts})")
            time.sleep(TRACKING_CHECK_PAUSE_S)
    raise TrackingServerUnreachable(
        f"the MLflow tracking server at {uri} (MLFLOW_TRACKING_URI) does not answer ({reason}) after {attempts} "
        f"attempts, {TRACKING_CHECK_PAUSE_S:g} s apart. "
        "Start that server, or set MLFLOW_TRACKING_URI to one that runs (unset it to use the project's own "
        "mlflow.db), then run again; nothing was changed"
    )


def require_project(project: Path, project_dir: str) -> None:
    """Fails when ``project`` holds no params.yaml, naming the ``project_dir`` to fix.

    Raises:
        FileNotFoundError: ``project_dir`` holds no params.yaml on the machine the run is on.
    """
    if not (project / PARAMS_FILE).is_file():
        raise FileNotFoundError(
            f"the retrain flow's project_dir parameter is {project_dir!r}, and {project / PARAMS_FILE} does not exist "
            "on the machine this run is on: project_dir must name the project folder as that machine sees it. A "
            "deployment names the folder `make deploy-schedule` ran in unless given PROJECT_DIR=/path: redeploy "
            "with it (`make deploy-schedule PROJECT_DIR=/opt/fracture` for the Dockerfile's image), or pass "
            "--project-dir to `python -m flows.retrain`"
        )


def check_before_run(project_dir: str, profile: str | None, source: str | None = None) -> None:
    """What ``python -m flows.retrain`` checks before it starts the flow run, so that an error the user
    can fix reads as one line rather than a failed run's tracebacks: the project and its params.yaml
    (with the profile the run would set), the tracking server, that no other run holds the project,
    and that the source given exists.

    The flow checks each again itself (a scheduled run comes without this check); this one leaves only
    the lock file (``outputs/retrain.lock``) the run takes anyway (its holder's note is written and removed).

    Raises:
        FileNotFoundError, ConfigError, TrackingServerUnreachable, ProjectBusy: the message says what to fix.
    """
    project = Path(project_dir).resolve()
    require_project(project, project_dir)
    data = read_params_yaml((project / PARAMS_FILE).read_text())
    if isinstance(data, dict) and isinstance(data.get("train"), dict):
        data["train"]["profile"] = choose_profile(profile, torch.cuda.is_available())[0]
    parse_params(data)
    require_tracking_server(project)
    with fracture_project_lock(project, "`python -m flows.retrain`"):
        pass
    given = resolved_source(source, project)
    if given is not None and not Path(given).exists():
        where = f"--source {source}" if source else f"{SOURCE_ENV}={os.environ.get(SOURCE_ENV)}"
        raise FileNotFoundError(
            f"{where}: {given} does not exist. Give a FracAtlas folder or zip with --source or {SOURCE_ENV}, "
            "or leave both unset to download from figshare"
        )


def resolved_source(source: str | None, project: Path) -> str | None:
    """The run's FracAtlas source as an absolute path, or ``None`` (figshare).

    Resolved once, so the listing that tells an unchanged source and the ingest command (which
    runs in the project) read the same files: ``source`` given to the run against the directory
    it started in, $FRACATLAS_SOURCE (a worker's environment, whose runs start in a temporary
    folder of Prefect's) against the project.
    """
    if source:
        return str(Path(source).expanduser().resolve())
    if os.environ.get(SOURCE_ENV):
        return str((project / Path(os.environ[SOURCE_ENV]).expanduser()).resolve())
    return None


@flow(name="retrain", log_prints=True)
def retrain(project_dir: str = ".", source: str | None = None, profile: str | None = None) -> RetrainResult:
    """Brings the data in, reproduces every DVC stage and registers the model.

    Publishes the run's report (metrics, data version, stages run, promotion decision) as the
    Markdown artifact ``retrain-report``; a run that fails publishes, under the same key, where it
    failed, why, and the registry as the failure left it (:func:`publish_failure_report`), then
    fails. Scheduled runs come from :mod:`flows.deploy`.

    Args:
        project_dir: the project root (holding dvc.yaml and params.yaml).
        source: a local FracAtlas folder or zip; ``None`` uses $FRACATLAS_SOURCE, else figshare.
        profile: a key of ``profiles`` in params.yaml; ``None`` picks by hardware.

    Returns:
        Every stage's typed result and the registry outcome.

    Raises:
        FileNotFoundError: ``project_dir`` holds no params.yaml on the machine the run is on.
        TrackingServerUnreachable: ``MLFLOW_TRACKING_URI`` names a server that does not answer.
    """
    project = Path(project_dir).resolve()
    with ExitStack() as stack:
        try:
            # Checked before the lock, which would make <project_dir>/outputs in a folder that is no project.
            require_project(project, project_dir)
            require_tracking_server(project, run_logger(__name__).warning)
            # Each stage reuses the memory the one before freed; the run hands it back when it ends.
            stack.enter_context(freed_memory_kept())
            stack.enter_context(project_lock(project, busy_wait(project, deployment.id is not None)))
        except Exception as exc:
            publish_failure_report(project, RunProgress(), exc)
            raise
        return _retrain(project, source, profile)


def pinned_files(profile: Profile) -> tuple[str, ...]:
    """The files a commit must hold for `dvc repro` at that commit to rebuild a run's model.

    params.yaml (the run may have set ``train.profile``, which dvc.lock already records), the
    data's and the stages' DVC files, the splits the split stage recorded (``split_assignments.csv``,
    a dependency of that stage), and a ``weights: file`` profile's ``.dvc`` file, without
    which that commit could not pull the pretrained weights.
    """
    weights = (f"{profile.weights_file}.dvc",) if profile.weights == "file" and profile.weights_file else ()
    return (PARAMS_FILE, "data.dvc", ASSIGNMENTS_FILE, "dvc.lock", "detect/dvc.lock", *weights)


def commit_advice(pending: list[str], code: list[str]) -> str | None:
    """The run's closing advice on what to commit, or ``None`` when nothing is left to commit.

    Args:
        pending: the pinned files (:func:`pinned_files`) git shows as new or changed.
        code: other tracked files that differ from the checked-out commit
            (:meth:`fracture.workspace.Workspace.git_dirty_files`): code no commit holds yet.
    """
    files = [*pending, *(path for path in code if path not in pending)]
    if not files:
        return None
    dirty = [path for path in code if path not in pending]
    warning = (
        f" The code differs from the checked-out commit ({', '.join(dirty)}): a model trained from it carries "
        "`git_commit` <commit>-dirty and those files in `git_dirty_files`, as no commit holds the code that "
        "trained it."
        if dirty
        else ""
    )
    return (
        f"not committed yet: {', '.join(files)}.{warning} `git add {' '.join(files)} && git commit` pins the data, "
        "code and stage outputs this model was built from, so that `dvc repro` at that commit rebuilds it"
    )


def registry_states(project: Path, models: tuple[str, ...]) -> dict[str, RegistryState]:
    """Each registered model's aliases and newest version (:func:`registry_state`), from the project's store.

    Two reads in the flow's own process, not a task of their own: a task's state round trips
    would cost more than the reads, and MLflow's client retries a request that fails in transit
    itself (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``).
    """
    client = MlflowClient(tracking_uri(project))
    return {model: registry_state(client, model) for model in models}


#: How many of a model's newest versions :func:`registry_state` looks through for versions the gate has not decided on.
UNDECIDED_LOOKBACK = 20


def registry_state(client: MlflowClient, model: str) -> RegistryState:
    """The registered model's aliases, its newest version and the versions among its newest
    (:data:`UNDECIDED_LOOKBACK`) the gate has not decided on and will (:func:`_awaits_gate`); empty
    when the registry has no such model.

    Args:
        client: the registry's client.
        model: the registered model's name.
    """
    try:
        aliases = client.get_registered_model(model).aliases
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return RegistryState({})
    newest = client.search_model_versions(
        f"name = '{model}'", max_results=UNDECIDED_LOOKBACK, order_by=["version_number DESC"]
    )
    undecided = sorted(int(v.version) for v in newest if _awaits_gate(v))
    return RegistryState(
        {alias: str(v) for alias, v in aliases.items()},
        max((int(v.version) for v in newest), default=0),
        tuple(str(v) for v in undecided),
    )


def _awaits_gate(mv: ModelVersion) -> bool:
    """Whether the next registration of the version's run puts it through the gate: it has no
    decision, or a promotion left "pending" (the champion moved under it), as a registration stopped
    before its gate leaves it. A version the gate holds back never gets a decision, and is not one:
    one that carries its run's rollback (``rolled_back_at``; chosen by hand, it is served again) and
    one whose registration failed or has not finished (not ``READY``: its run is registered anew)."""
    tags = mv.tags or {}
    return (tags.get(TAG_DECISION) in (None, "", "pending") and not tags.get(TAG_ROLLED_BACK)
            and mv.status in (None, "", READY))


def version_origin(client: MlflowClient, name: str, version: str) -> VersionOrigin:
    """What a registered version was built from: its version tags (data, code, profile), its training
    run's params, and the packages its model pins.

    A version whose run the tracking store no longer holds (deleted for good, or logged to a store
    since replaced) keeps what its version tags and model say; its params are then not known.

    Raises:
        MlflowException: the registry could not be read (the version itself, or a store that does not answer).
    """
    mv = client.get_model_version(name, version)
    tags = mv.tags or {}
    run_id = mv.run_id or tags.get("run_id") or None
    params = None
    if run_id:
        try:
            params = dict(training_run(run_id, client).data.params)
        except TrainingRunMissing:
            pass
    packages, unread = pinned_packages(client, name, version)
    return VersionOrigin(
        version=str(version), run_id=run_id, data_version=tags.get(TAG_DATA) or None,
        git_commit=tags.get(GIT_COMMIT_TAG) or None, dirty_files=tags.get(GIT_DIRTY_FILES_TAG) or None,
        profile=tags.get("profile") or None, params=params, packages=packages, packages_unread=unread,
    )


def pinned_packages(client: MlflowClient, name: str, version: str) -> tuple[dict[str, str] | None, str | None]:
    """The package versions a registered version's model pins (its ``requirements.txt``: torch,
    timm, mlflow, ... as installed where it was registered), or ``None`` and why they were not read."""
    try:
        uri = client.get_model_version_download_uri(name, version).rstrip("/") + "/requirements.txt"
        with tempfile.TemporaryDirectory() as folder:
            text = Path(download_artifacts(artifact_uri=uri, dst_path=folder, tracking_uri=client.tracking_uri)).read_text()
    except Exception as exc:  # noqa: BLE001 - the report says the versions were not read, and why
        return None, _first_line(exc)
    pins = (line.split(";")[0].strip().split("==", 1) for line in text.splitlines())
    return {pin[0].strip().lower(): pin[1].strip() for pin in pins if len(pin) == 2}, None


def since_champion(
    project: Path, registration: Registration, before: RegistryState, read: Callable[..., VersionOrigin] = version_origin,
) -> SinceChampion | None:
    """What the version this run registered was built from, against the champion it challenged.

    The morning after a run, the question is what changed since the model consumers were loading:
    its data version, code commit, profile, params and packages. ``None`` where there is nothing to
    compare: no version registered by this run, or no champion before it. Never raises: the
    registration is done, and a registry that cannot be read now is named in the report.

    Args:
        project: the project root (its tracking store).
        registration: the classifier's registration, over all of the register task's tries (:func:`as_of_run`).
        before: the registry read before the register task ran.
        read: reads one version (:func:`version_origin`).
    """
    compared = registration.comparison.champion_version if registration.comparison else None
    champion = compared or before.aliases.get(CHAMPION) or registration.champion_version
    if not registration.created or champion is None or champion == registration.version:
        return None
    try:
        client = MlflowClient(tracking_uri(project))
        return SinceChampion(read(client, registration.name, champion), read(client, registration.name, registration.version))
    except Exception as exc:  # noqa: BLE001 - see above
        return SinceChampion(VersionOrigin(champion), VersionOrigin(registration.version), error=_first_line(exc))


@dataclass
class RunProgress:
    """How far a flow run got, for the report of a run that fails (:func:`publish_failure_report`).

    Attributes:
        stage: the step under way (see :class:`flows.result.RetrainFailure`).
        profile: the training profile, once chosen.
        models: the registered models params.yaml names, once it was read.
        ingest: what ingest did, once it finished.
        runs: the DVC stages that finished, in order.
        registration: the classifier's registration, once the register task finished.
        before: the registry read before the register task ran.
    """

    stage: str = "checks before the run"
    profile: str | None = None
    models: tuple[str, ...] = ()
    ingest: IngestSummary | None = None
    runs: dict[str, StageRun] = field(default_factory=dict)
    registration: Registration | None = None
    before: dict[str, RegistryState] = field(default_factory=dict)


def _first_line(exc: BaseException) -> str:
    message = str(exc).strip()
    return f"{type(exc).__name__}: {message.splitlines()[0]}" if message else type(exc).__name__


def failure_of(project: Path, progress: RunProgress, exc: BaseException) -> RetrainFailure:
    """What a failed run did (``progress``), why it failed (``exc``), and the registry read after the failure.

    The registry is read only where params.yaml named the models, and only from a tracking
    server that answers its health check (:func:`require_tracking_server`): a run that failed
    because the server went away fails at once, not after MLflow's own minutes of retries.
    """
    registry: dict[str, RegistryState] = {}
    registry_error = None
    if not progress.models:
        registry_error = "the run failed before it read params.yaml, which names the registered models"
    else:
        try:
            require_tracking_server(project)
            registry = registry_states(project, progress.models)
        except Exception as read_exc:  # noqa: BLE001 - the report says why, and the run's own error follows
            registry_error = _first_line(read_exc)
    previous = progress.ingest.previous_version if progress.ingest else Workspace(project).completed_data_version()
    return RetrainFailure(
        stage=progress.stage, error=_first_line(exc), profile=progress.profile, ingest=progress.ingest,
        previous_version=previous, runs=dict(progress.runs), registration=progress.registration,
        registry=registry, registry_before=dict(progress.before), registry_error=registry_error,
    )


def publish_failure_report(project: Path, progress: RunProgress, exc: BaseException) -> None:
    """Publishes the report of a run that failed as ``retrain-report`` (:func:`flows.report.render_failure_report`).

    Without it the key would still show the last completed run's report, a promotion perhaps, the
    morning after a run that failed. Never raises: a report that cannot be made or published is
    logged, and the caller raises the run's own error, which this one must not hide.
    """
    logger = run_logger(__name__)
    try:
        failure = failure_of(project, progress, exc)
        report = render_failure_report(failure)
    except Exception as report_exc:  # noqa: BLE001 - the run's own error is what the run fails with
        logger.warning("the failed run's report could not be made (%s); the run's error follows", _first_line(report_exc))
        return
    try:
        create_markdown_artifact(key=REPORT_KEY, markdown=report,
                                 description=f"FAILED at stage {failure.stage}: {failure.error}"[:500])
    except Exception as publish_exc:  # noqa: BLE001 - as above
        logger.warning("the failed run's report could not be published to the Prefect API (%s); it follows here:\n%s",
                       _first_line(publish_exc), report)


def _retrain(project: Path, source: str | None, profile: str | None) -> RetrainResult:
    """The flow's work under the project's lock; a failure publishes the failed run's report, then fails the run."""
    progress = RunProgress()
    try:
        return _run(project, source, profile, progress)
    except Exception as exc:
        publish_failure_report(project, progress, exc)
        raise


def _run(project: Path, source: str | None, profile: str | None, progress: RunProgress) -> RetrainResult:
    logger = run_logger(__name__)  # the flow run's; a plain logger when called as retrain.fn(...)
    name, reason = choose_profile(profile, torch.cuda.is_available())
    print(reason)
    progress.profile = name
    if set_profile(project, name):
        logger.info("set train.profile: %s in %s", name, project / PARAMS_FILE)
    params = load_params(project)  # fail before any work on a broken params.yaml
    models = (params.register.model_name, *((params.detect.model_name,) if params.detect.enabled else ()))
    progress.models, progress.stage = models, "ingest"
    # The flaky tasks (download, registry) retry after transient errors as params.yaml says.
    retry = {"retries": params.schedule.retries, "retry_delay_seconds": params.schedule.retry_delay_seconds}

    ingested = progress.ingest = ingest_task.with_options(**retry)(project, resolved_source(source, project))
    progress.stage = "dvc status"
    runs, results = {}, {}
    # One status check for the whole pipeline: when DVC finds nothing changed, no stage is
    # reproduced. Otherwise DVC reproduces every stage in order, which reruns what an upstream
    # stage's new outputs change. New data changes the first stage's dependency, so DVC is not
    # asked then: each stage's reproduction checks the stage itself anyway.
    if ingested.changed:
        pending = True
        print(f"new data version {ingested.data_version}; reproducing the pipeline")
    elif pending := dvc_status(project, list(DVC_STAGES)):
        print(f"DVC status: {', '.join(sorted(pending))} changed; reproducing the pipeline")
    else:
        print("DVC status: every stage is as dvc.lock records it; nothing to reproduce")
    for stage in DVC_STAGES:
        progress.stage = stage
        runs[stage], results[stage] = stage_task(project, stage, up_to_date=not pending)
        progress.runs[stage] = runs[stage]
    # The registry as it was before this run registered, so that the report tells what the run
    # changed over all of the register tasks' tries, not what their last try found.
    progress.stage = "register"
    before = progress.before = registry_states(project, models)
    registration = progress.registration = register_task.with_options(**retry)(project)
    detector = None
    if params.detect.enabled:
        # After the classifier: the detector's backbone is the classifier this run trained.
        progress.stage = "detect"
        detect_runs, detect_metrics = detect_task(project)
        progress.runs.update(detect_runs)
        progress.stage = "detect-register"
        detector = DetectorResult(detect_runs, detect_metrics, detect_register_task.with_options(**retry)(project))
    progress.stage = "report"
    after = registry_states(project, models)
    registration, moves = as_of_run(registration, before[models[0]], after[models[0]])
    progress.registration = registration
    if detector is not None:
        detector = DetectorResult(
            detector.runs, detector.metrics, *as_of_run(detector.registration, before[models[1]], after[models[1]])
        )
        d, detect_metrics = detector.registration, detector.metrics
        print(
            f"detector: test mAP@0.5 {detect_metrics['map_50']:.4f} ({detect_metrics['map_50_ci_low']:.4f}-"
            f"{detect_metrics['map_50_ci_high']:.4f}); {d.name} version {d.version}, champion: {d.champion} ({d.reason})"
        )
        if note := no_champion_note(d, detector=True):
            logger.warning(note)
    result = RetrainResult(name, ingested, runs, registration=registration, detector=detector, moves=moves,
                           since_champion=since_champion(project, registration, before[models[0]]), **results)
    Workspace(project).record_completed_run(ingested.data_version)

    m = result.evaluate.metrics
    print(
        f"profile {name} ({result.train.model.architecture}); test ROC AUC {m['roc_auc']:.4f}, sensitivity "
        f"{m['recall']:.3f}, specificity {m['specificity']:.3f} at threshold {m['threshold']}; "
        f"{registration.name} version {registration.version} "
        f"({'new' if registration.created else 'already registered'}), champion: {registration.champion} "
        f"({registration.reason})"
    )
    if note := no_champion_note(registration):
        logger.warning(note)
    if result.nothing_changed:
        print("nothing changed: the data version of the last completed run, every DVC stage up to date (its code and "
              "params as dvc.lock records them; installed packages are no DVC dependency), the registry as it was")
    elif result.registry_changed:
        reproduced = ingested.changed or result.stages_ran or result.stages_restored
        same = "" if reproduced else "same data version and every DVC stage up to date, nothing retrained; "
        print(f"{same}registry: {registry_summary(result)}")
    # DVC's own reminder after each of its calls is left out (tasks.pipeline.open_repo); one suffices.
    if advice := commit_advice(
        uncommitted(project, pinned_files(params.profiles[name])), Workspace(project).git_dirty_files()
    ):
        print(advice)
    report = render_report(result)
    try:
        create_markdown_artifact(
            key=REPORT_KEY,
            markdown=report,
            description=f"data {ingested.data_version}; {registration.name} v{registration.version}: {registration.reason}",
        )
    except Exception as exc:  # noqa: BLE001 - the run's work is done: a report that cannot be published fails nothing
        # The Prefect API gone as the run ends (a server restarting): the retraining and its
        # registration are done and recorded, so the run is no failure; the report goes to its log.
        logger.warning("the run's report could not be published to the Prefect API (%s: %s); it follows here:\n%s",
                       type(exc).__name__, exc, report)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the retraining flow once.")
    parser.add_argument("--project-dir", default=".")
    parser.add_argument("--source", default=None, help=f"FracAtlas folder or zip (default: ${SOURCE_ENV}, else figshare)")
    parser.add_argument("--profile", default=None, help="a profile in params.yaml (default: by hardware)")
    args = parser.parse_args(argv)
    try:
        check_before_run(args.project_dir, args.profile, args.source)
        result = retrain(project_dir=args.project_dir, source=args.source, profile=args.profile)
    except (*known_errors(), TrackingServerUnreachable) as exc:
        raise SystemExit(f"error: {exc}") from None
    for run in [*result.runs.values(), *(result.detector.runs.values() if result.detector else [])]:
        print(f"{run.stage:<9} {run.describe()}")


if __name__ == "__main__":
    try:
        main()
    finally:
        skip_exit_collection()  # the process ends here: no last garbage collections
