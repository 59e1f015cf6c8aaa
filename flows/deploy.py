"""Scheduled retraining: serve the retrain flow on this machine, or deploy it to a work pool.

The schedule, the concurrency limit, the retries and the work pool come from the ``schedule``
section of params.yaml, so pointing the job at another machine (a Docker or Kubernetes work
pool, a GPU node) is a change of parameters, not of code::

    python -m flows.deploy serve                        # runs the schedule in this process
    python -m flows.deploy deploy [--work-pool NAME] [--project-dir DIR]
                                                        # registers it with a work pool's workers

Both talk to the Prefect API in ``PREFECT_API_URL`` (start one with ``prefect server start``).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import httpx
import prefect
from prefect import get_client
from prefect.client.schemas.objects import (
    ConcurrencyLimitConfig,
    ConcurrencyLimitStrategy,
)
from prefect.exceptions import ObjectNotFound
from prefect.flows import EntrypointType
from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL
from pydantic import ValidationError

from flows.retrain import retrain
from fracture.config import ConfigError, Params, ScheduleParams, load_params

if TYPE_CHECKING:
    from prefect.client.schemas.responses import DeploymentResponse
    from prefect.deployments.runner import RunnerDeployment

TAGS = ["fracture", "retrain"]


def build_deployment(
    params: Params,
    project_dir: str,
    source: str | None = None,
    profile: str | None = None,
    work_pool: str | None = None,
    paused: bool = False,
    schedule_active: bool = True,
) -> RunnerDeployment:
    """The retrain flow's deployment: cron schedule, concurrency limit and default parameters.

    The flow is referenced by module path (``flows.retrain.retrain``), so whatever runs it
    (this machine's runner, a process worker, a container) imports it from the installed project
    rather than from a file path of this machine.

    Args:
        params: the project's parameters (their ``schedule`` section).
        project_dir: the project root the runs work in, as seen by the machine that runs them.
        source: a FracAtlas folder or zip for the runs; ``None`` leaves it to $FRACATLAS_SOURCE,
            else figshare, on that machine.
        profile: a training profile; ``None`` picks by the hardware the run lands on.
        work_pool: the work pool for ``deploy``; ``None`` for ``serve``.
        paused: the deployment is created (or updated) paused (the Prefect UI's toggle).
        schedule_active: ``False``: its cron schedule is created inactive
            (``prefect deployment schedule pause``).

    Returns:
        The deployment, not yet sent to the Prefect API.

    Raises:
        ConfigError: Prefect refuses the cron string, the time zone or another setting of the
            schedule section; the message names the field.
    """
    s = params.schedule
    try:
        schedule = Cron(s.cron, timezone=s.timezone, active=schedule_active)
    except ValidationError as exc:
        raise _schedule_error(s, exc) from None
    except ValueError as exc:
        raise ConfigError(f"params.yaml: schedule.cron {s.cron!r} is not a valid cron string: {exc}") from None
    parameters: dict[str, Any] = {"project_dir": project_dir}
    if source:
        parameters["source"] = source
    if profile:
        parameters["profile"] = profile
    try:
        return retrain.to_deployment(
            name=s.deployment,
            schedule=schedule,
            # A run that falls due while one is going waits for it instead of retraining in parallel
            # on the same DVC workspace.
            concurrency_limit=ConcurrencyLimitConfig(
                limit=s.concurrency_limit, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
            ),
            parameters=parameters,
            description=f"Scheduled retraining ({s.cron}, {s.timezone}): reproduces the DVC pipeline and "
            "registers the model; promotes it to champion only when it beats the current one.",
            tags=TAGS,
            work_pool_name=work_pool,
            job_variables=dict(s.job_variables) if work_pool else None,
            entrypoint_type=EntrypointType.MODULE_PATH,
            paused=paused,
        )
    except ValidationError as exc:  # Prefect validates the schedule only here (the time zone among others)
        raise _schedule_error(s, exc) from None


def _schedule_error(s: ScheduleParams, exc: ValidationError) -> ConfigError:
    """Prefect's refusal of the schedule as one line naming the field of params.yaml to fix."""
    errors = exc.errors()
    fields = {str(loc) for error in errors for loc in error.get("loc", ())}
    # Pydantic's "Value error, <validator's message>" reads as the validator's message.
    why = " ".join(
        "; ".join(str(error.get("msg", "")).removeprefix("Value error, ") for error in errors).split()
    ) or " ".join(str(exc).split())
    if "timezone" in fields:
        return ConfigError(
            f"params.yaml: schedule.timezone {s.timezone!r} is not a time zone Prefect can schedule in ({why}); "
            "set an IANA name such as Europe/Berlin or UTC"
        )
    if "cron" in fields:
        return ConfigError(f"params.yaml: schedule.cron {s.cron!r} is not a valid cron string: {why}")
    where = ", ".join(".".join(map(str, error.get("loc", ()))) for error in errors)
    return ConfigError(
        f"params.yaml: Prefect refused the deployment made from the schedule section ({where}: {why}); check "
        f"schedule.cron {s.cron!r}, schedule.timezone {s.timezone!r}, schedule.deployment {s.deployment!r} and "
        "schedule.job_variables"
    )


def serve(params: Params, project_dir: Path, source: str | None = None, profile: str | None = None) -> None:
    """Runs the schedule in this process until interrupted (Prefect's ``serve``).

    Args:
        params: the project's parameters.
        project_dir: the project root.
        source: a FracAtlas folder or zip for the runs (default: $FRACATLAS_SOURCE, else figshare).
        profile: a training profile (default: by hardware).

    Raises:
        ConfigError: ``schedule.deployment`` names a deployment of a work pool, which serving
            here would take over.
    """
    s = params.schedule
    name = f"{retrain.name}/{s.deployment}"
    # Serving registers the deployment under its name, whoever made it: a work pool's would then
    # send its runs to this checkout, and be paused when serving stops.
    found = existing_deployment(name)
    if found is not None and found.work_pool_name:
        raise ConfigError(
            f"params.yaml: schedule.deployment {s.deployment!r} names {name}, which is deployed to work pool "
            f"{found.work_pool_name!r}: serving it here would send that pool's runs to this checkout, and pause its "
            "schedule when serving stops. Set schedule.deployment to another name to serve a schedule of this machine's own, "
            f"or delete the pool's deployment first (`prefect deployment delete {name}`)"
        )
    here = str(project_dir.resolve())
    # Nor one that `serve` runs for another checkout (a second machine sharing the server, or a second
    # terminal): Prefect lets the last `serve` take its runs over, and stopping either pauses both.
    there = None if found is None else (found.parameters or {}).get("project_dir")
    if there not in (None, here):
        raise ConfigError(
            f"params.yaml: schedule.deployment {s.deployment!r} names {name}, which `serve` runs for another "
            f"checkout, {there}: serving it here too would send its runs here, and stopping either would pause "
            "both. Give this checkout's schedule a name of its own (schedule.deployment: laptop-retrain), or stop "
            f"that `serve` and delete its deployment (`prefect deployment delete {name}`)"
        )
    deployment = build_deployment(params, here, _absolute(source) if source else None, profile)
    # Prefect's runner pauses the schedule when it stops, but only once it has started: stopped
    # while Prefect is still registering the deployment (a Ctrl-C right after starting, or a
    # service manager's SIGTERM, which kills outright until the runner installs its own handler),
    # the schedule would stay live with nothing serving it. So it is paused here on the way out,
    # however serving ends (pausing twice is harmless).
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        # `limit` caps this runner too, so even a deployment edited in the UI never overlaps here.
        prefect.serve(deployment, limit=s.concurrency_limit)
    finally:
        signal.signal(signal.SIGTERM, previous)
        try:
            if PREFECT_API_URL.value():  # else the schedule lived in a temporary server, gone with it
                pause_schedule(name)
        except Exception as exc:  # noqa: BLE001 - the API gone, say: whatever stopped serving is the error to see
            print(f"could not pause {name} ({type(exc).__name__}: {exc}): pause it in the Prefect UI, or its "
                  "runs fall due with nothing to run them", file=sys.stderr)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def existing_deployment(name: str) -> DeploymentResponse | None:
    """The deployment ``flow/deployment`` on the Prefect API, or ``None`` when there is none (or no
    API: a temporary server holds no one else's deployment)."""
    if not PREFECT_API_URL.value():
        return None
    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


def still_paused(name: str) -> str | None:
    """What keeps the deployment ``flow/deployment`` from running, and how to resume it; ``None``
    when its schedule is live."""
    found = existing_deployment(name)
    if found is None:
        return None
    how = ["the deployment's toggle in the Prefect UI"] if found.paused else []
    how += [f"`prefect deployment schedule resume {name} {sc.id}`" for sc in found.schedules if not sc.active]
    if not how:
        return None
    return f"{name} was paused before and stays paused: no run falls due until it is resumed ({'; '.join(how)})"


def pause_schedule(name: str) -> None:
    """Pauses the deployment ``flow/deployment`` if it exists (no run falls due while nothing serves it)."""
    with get_client(sync_client=True) as client:
        try:
            client.pause_deployment(client.read_deployment_by_name(name).id)
        except ObjectNotFound:
            pass  # stopped before Prefect created it: nothing is scheduled


def deploy(
    params: Params,
    project_dir: str | None,
    work_pool: str | None = None,
    source: str | None = None,
    profile: str | None = None,
) -> UUID:
    """Creates or updates the deployment on a work pool; the pool's workers run it. A deployment
    paused before (in the Prefect UI, or its schedule paused) stays paused: redeploying new code
    or a new cron does not resume a schedule someone stopped on purpose.

    Args:
        params: the project's parameters.
        project_dir: the project root on the worker's machine or in the image (``/opt/fracture``
            in the Dockerfile's image). A relative path is resolved here, where the deployment is
            made: a worker starts each run in a temporary folder of Prefect's, never in the
            project, so the deployment names the project by its absolute path. ``None``: this
            directory, unless ``schedule.image`` is set: then it must be given.
        work_pool: overrides ``schedule.work_pool``.
        source: a FracAtlas folder or zip, as the worker sees it (a relative path is resolved here too).
        profile: a training profile (default: by the worker's hardware).

    Returns:
        The deployment's id.

    Raises:
        ConfigError: no work pool is named; ``schedule.image`` is set and ``project_dir`` is
            not; ``schedule.deployment`` names a deployment ``serve`` runs, which deploying would
            take over; Prefect refuses the pool (none of that name, or one whose jobs take no image).
    """
    s = params.schedule
    pool = work_pool or s.work_pool
    if not pool:
        raise ConfigError(
            "params.yaml: schedule.work_pool is null, so there is no work pool to deploy to; set it (or pass "
            "--work-pool NAME) after `prefect work-pool create NAME --type process|docker|kubernetes`, "
            "or run the schedule on this machine with `python -m flows.deploy serve`"
        )
    if project_dir is None:
        if s.image:
            # This checkout's path is not in the image, where every run would fail on it. Refused
            # rather than guessed: the image is used as is and may be a build other than the
            # Dockerfile's, with the project elsewhere than its /opt/fracture.
            raise ConfigError(
                f"params.yaml: schedule.image is {s.image!r}, so the runs work in that image, where this checkout "
                f"({Path.cwd()}) does not exist. Name the project folder as the image holds it: "
                "`make deploy-schedule PROJECT_DIR=/opt/fracture` (`--project-dir /opt/fracture`; the Dockerfile's "
                "WORKDIR), or your image's folder"
            )
        project_dir = "."
    name = f"{retrain.name}/{s.deployment}"
    # The mirror of serve's check: deployed over a served deployment, the serving process would
    # still pick up its runs in its own checkout, and pause the pool's schedule when it stops.
    if (found := existing_deployment(name)) is not None and found.work_pool_name is None:
        raise ConfigError(
            f"params.yaml: schedule.deployment {s.deployment!r} names {name}, which `python -m flows.deploy serve` "
            f"serves with no work pool: deploying it to {pool!r} would leave that process running its runs in its own "
            f"checkout, and it would pause the pool's schedule when it stops. Stop that `serve` process and delete its "
            f"deployment (`prefect deployment delete {name}`), then deploy again; or set schedule.deployment to "
            "another name"
        )
    project_dir = _absolute(project_dir)
    source = _absolute(source) if source else None
    # Prefect updates a deployment unpaused unless told otherwise, and replaces its schedules with
    # active ones: an update would resume a schedule paused during a PACS outage or a data audit.
    # Each of the two switches is kept as it was, so the one its user turns back on resumes it.
    paused = found is not None and found.paused
    schedule_active = found is None or not found.schedules or any(sc.active for sc in found.schedules)
    deployment = build_deployment(
        params, project_dir, source, profile, work_pool=pool, paused=paused, schedule_active=schedule_active
    )
    try:
        # The image is the team's own build of this project: used as is, never built or pushed here.
        (deployment_id,) = prefect.deploy(
            deployment, work_pool_name=pool, image=s.image, build=False, push=False, print_next_steps_message=False
        )
    except ValueError as exc:  # Prefect's: no pool of that name, or a pool whose jobs take no image
        named = "--work-pool (make deploy-schedule WORK_POOL=NAME)" if work_pool else "params.yaml: schedule.work_pool"
        raise ConfigError(
            f"cannot deploy to work pool {pool!r}, named by {named}: {exc} `prefect work-pool ls` lists the pools "
            "there are; create one with `prefect work-pool create NAME --type process|docker|kubernetes` "
            "(schedule.image needs a docker or kubernetes one)"
        ) from None
    return deployment_id


def _absolute(path: str) -> str:
    """``path`` as given when absolute (it may name a folder of another machine or an image), else
    resolved against this directory."""
    given = Path(path).expanduser()
    return str(given if given.is_absolute() else given.resolve())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Scheduled retraining with Prefect (see `schedule` in params.yaml).")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("serve", "run the schedule on this machine until interrupted"),
        ("deploy", "create or update the deployment on a work pool"),
    ):
        cmd = sub.add_parser(name, help=text)
        if name == "serve":
            cmd.add_argument("--project-dir", default=".", help="the project root (default: .)")
        else:
            cmd.add_argument(
                "--project-dir", default=None, help="the project root as the workers see it; params.yaml is read from "
                ". (default: .; required with schedule.image: /opt/fracture in the Dockerfile's image)"
            )
        cmd.add_argument("--source", default=None, help="FracAtlas folder or zip (default: $FRACATLAS_SOURCE, else figshare)")
        cmd.add_argument("--profile", default=None, help="a profile in params.yaml (default: by hardware)")
    sub.choices["deploy"].add_argument("--work-pool", default=None, help="overrides schedule.work_pool")
    args = parser.parse_args(argv)

    try:
        # A deployment names the project where its workers see it (/opt/fracture in an image),
        # which need not exist here: its schedule is read from this checkout.
        params = load_params(args.project_dir if args.command == "serve" else ".")
        # What every run of the schedule would fail on, at 3 in the morning: said now instead.
        if args.profile is not None and args.profile not in params.profiles:
            raise ConfigError(f"--profile {args.profile!r}: params.yaml has no such profile "
                              f"(profiles: {', '.join(params.profiles)})")
        if args.command == "serve" and args.source and not Path(args.source).expanduser().exists():
            raise ConfigError(f"--source {args.source}: no such file or folder on this machine, whose runs would "
                              "copy it; give a FracAtlas folder or zip, or leave it out for $FRACATLAS_SOURCE")
        if not PREFECT_API_URL.value():
            print(
                "PREFECT_API_URL is not set: the schedule lives only as long as a temporary local server. "
                "Start `prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api to keep it.",
                file=sys.stderr,
            )
        s = params.schedule
        if args.command == "serve":
            print(f"serving retrain/{s.deployment}: cron {s.cron!r} ({s.timezone}), at most {s.concurrency_limit} run(s) at once")
            try:
                serve(params, Path(args.project_dir), args.source, args.profile)
            except KeyboardInterrupt:  # stopped before Prefect's runner had started (serve paused the schedule)
                raise SystemExit(f"stopped before serving retrain/{s.deployment} had begun") from None
        else:
            deployment_id = deploy(params, args.project_dir, args.work_pool, args.source, args.profile)
            pool = args.work_pool or s.work_pool
            # Where the runs read the data from: a source fixed here overrides the workers' own.
            source = (f"every run copies {_absolute(args.source)}" if args.source
                      else "each run reads its worker's FRACATLAS_SOURCE (the pool's env job variable), else figshare")
            print(
                f"deployed retrain/{s.deployment} ({deployment_id}) to work pool {pool!r}: cron {s.cron!r} "
                f"({s.timezone}); {source}. Start a worker where it should run: prefect worker start --pool {pool}"
            )
            if (paused := still_paused(f"{retrain.name}/{s.deployment}")) is not None:
                print(paused)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    except httpx.RequestError as exc:
        raise SystemExit(
            f"error: the Prefect API at {PREFECT_API_URL.value()} cannot be reached ({type(exc).__name__}: {exc}): "
            "start it (`prefect server start --host 127.0.0.1`), or set PREFECT_API_URL to the server's address"
        ) from None


if __name__ == "__main__":
    main()
