"""Scheduled retraining against a real Prefect server on 127.0.0.1.

The server runs as ``prefect server start`` with its own temporary home and database; the
deployment is created by ``python -m flows.deploy serve`` (or ``deploy`` for a work pool) from
the project's params.yaml and read back through the Prefect client. The slow test lets the served
deployment retrain on a small real FracAtlas subset three times: a first run, a run with nothing
changed, and a run after the dataset changed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import ConcurrencyLimitStrategy, StateType
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.workers.process import ProcessWorker

from flows.deploy import build_deployment, deploy, main
from flows.report import REPORT_KEY
from fracture.config import ConfigError, load_params, parse_params, tracking_uri
from tests.conftest import REPO
from tests.servers import free_port, stop

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
STAGES = ("ingest", "validate", "split", "prepare", "train", "evaluate", "register")


#: Keeps the deployment's concurrency slots on the server's disk, so a restarted server does not
#: cancel a run that holds one (docs/operations.md).
LEASE_STORAGE = "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem"


def test_the_documented_prefect_server_keeps_concurrency_slots_across_a_restart():
    """Prefect 3 holds a deployment's concurrency slots in the server's memory by default: restarted
    while a run trains, the server forgets the run's slot and Prefect cancels the run at its next
    renewal. The documented commands start the server with the slots on disk, with a module Prefect has."""
    import importlib

    for page in (REPO / "docs" / "operations.md", REPO / "README.md"):
        (line,) = [ln for ln in page.read_text().splitlines() if "prefect server start" in ln or LEASE_STORAGE in ln][:1]
        assert LEASE_STORAGE in line, page
    module = importlib.import_module(LEASE_STORAGE.split("=")[1])
    assert hasattr(module, "ConcurrencyLeaseStorage")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``prefect server start`` on a free loopback port with its own home and sqlite database."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = os.environ | {
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        **dict([LEASE_STORAGE.split("=")]),  # as docs/operations.md starts the server
    }
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 240  # the first start migrates the database: slow on two cores
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server did not answer {url}/health in 240 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        stop(proc, signal.SIGINT, grace=30)


@pytest.fixture()
def api(prefect_server: str) -> Iterator[str]:
    """Points this process's Prefect client at the test server, with no deployment an earlier test
    made: each test's project is a checkout of its own, which `serve` refuses to take another's over."""
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        with get_client(sync_client=True) as client:
            for deployment in client.read_deployments():
                client.delete_deployment(deployment.id)
        yield prefect_server


def set_schedule(project: Path, **values: object) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["schedule"].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@contextmanager
def serving(project: Path, api_url: str, *args: str, stop_with: int = signal.SIGINT) -> Iterator[subprocess.Popen]:
    """``python -m flows.deploy serve`` for the project, stopped on exit by ``stop_with``: Ctrl-C's
    SIGINT, or the SIGTERM of a service manager (systemd, ``docker stop``)."""
    env = os.environ | {"PREFECT_API_URL": api_url, "PREFECT_HOME": str(project.parent / "prefect-runner")}
    log = project.parent / "serve.log"
    # As from a terminal: a test run started in the background of a script has SIGINT ignored, and a
    # child inherits that; a handler of this process's own is reset to the default in the child.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flows.deploy", "serve", "--project-dir", str(project), *args],
                cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        yield proc
    finally:
        stop(proc, stop_with, grace=30)
        print(f"--- serve log (end) ---\n{log.read_text()[-4000:]}")


def wait_for_deployment(name: str, proc: subprocess.Popen, timeout: float = 240, until=lambda dep: True):
    """The deployment, once it exists and ``until(deployment)`` holds."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            try:
                dep = client.read_deployment_by_name(name)
                if until(dep):
                    return dep
            except ObjectNotFound:
                pass
            assert proc.poll() is None, f"`flows.deploy serve` exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"deployment {name} was not as expected within {timeout} s"
            time.sleep(1)


def test_schedule_params_are_checked():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert parse_params(raw).schedule.concurrency_limit == 1
    for key, value, message in (
        ("cron", "weekly", "schedule.cron"),
        ("cron", "0 0 3 * * 1", "schedule.cron is '0 0 3 * * 1'; give a cron string of five fields"),  # seconds first
        ("timezone", "Mars/Olympus", "schedule.timezone"),
        ("concurrency_limit", 0, "schedule.concurrency_limit"),
        ("retries", -1, "schedule.retries"),
        ("job_variables", ["env"], "schedule.job_variables"),
        ("cron_string", "0 3 * * 1", "schedule.cron_string"),
    ):
        bad = yaml.safe_load((REPO / "params.yaml").read_text())
        bad["schedule"][key] = value
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_params(bad)
    # Five fields, but not a cron Prefect can schedule: refused with the field named.
    raw["schedule"]["cron"] = "61 3 * * 1"
    with pytest.raises(ConfigError, match=r"schedule\.cron '61 3 \* \* 1' is not a valid cron"):
        build_deployment(parse_params(raw), ".")


def test_a_schedule_whose_every_run_would_fail_is_refused_when_it_is_made(project, monkeypatch, tmp_path):
    """A profile params.yaml lacks, or a --source missing on the serving machine, failed each
    scheduled run at its hour; and a Prefect API that cannot be reached printed httpx's tracebacks."""
    monkeypatch.chdir(project)
    with pytest.raises(SystemExit, match=r"error: --profile 'nosuch': params.yaml has no such profile \(profiles: paper, cpu"):
        main(["serve", "--profile", "nosuch"])
    with pytest.raises(SystemExit, match=r"error: --profile 'nosuch'"):
        main(["deploy", "--profile", "nosuch", "--work-pool", "gpu-pool", "--project-dir", "/srv/fracture"])
    missing = tmp_path / "FracAtlas.zip"
    with pytest.raises(SystemExit, match=rf"error: --source {re.escape(str(missing))}: no such file or folder on this machine"):
        main(["serve", "--source", str(missing)])
    closed = f"http://127.0.0.1:{free_port()}/api"
    with temporary_settings({PREFECT_API_URL: closed}), \
            pytest.raises(SystemExit, match=rf"error: the Prefect API at {re.escape(closed)} cannot be reached "
                                            r"\(ConnectError: .*\): start it \(`prefect server start --host 127.0.0.1`\)"):
        main(["serve"])


def test_a_time_zone_prefect_refuses_is_named_when_the_deployment_is_built():
    """Prefect checks the time zone only when the deployment is made, against its own list; a
    name it refuses there (``posixrules``, which ZoneInfo loads) is one line naming the field,
    not pydantic's traceback, even when it got past the check of params.yaml."""
    params = parse_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    odd = dataclasses.replace(params, schedule=dataclasses.replace(params.schedule, timezone="posixrules"))
    with pytest.raises(ConfigError) as err:
        build_deployment(odd, ".")
    message = str(err.value)
    assert message.startswith("params.yaml: schedule.timezone 'posixrules' is not a time zone Prefect can schedule in")
    assert "Europe/Berlin" in message and "\n" not in message


def test_served_deployment_has_the_schedule_and_concurrency_limit(api, project):
    set_schedule(project, deployment="nightly-retrain", cron="30 2 * * *", timezone="Europe/London")
    source = project.parent / "FracAtlas.zip"  # serve checks it exists on this machine, where the runs copy it
    source.write_bytes(b"PK")
    with serving(project, api, "--source", str(source)) as proc:
        dep = wait_for_deployment("retrain/nightly-retrain", proc)
        assert not dep.paused
    assert proc.returncode is not None and proc.returncode != -signal.SIGKILL, "serve ignored Ctrl-C"
    # Stopped, the schedule is paused: no run falls due while nothing serves it. Served again, it
    # runs again; a service manager's SIGTERM pauses it as Ctrl-C does.
    with get_client(sync_client=True) as client:
        assert client.read_deployment_by_name("retrain/nightly-retrain").paused
    with serving(project, api, "--source", str(source), stop_with=signal.SIGTERM) as proc:
        wait_for_deployment("retrain/nightly-retrain", proc, until=lambda dep: not dep.paused)
    assert proc.returncode is not None and proc.returncode != -signal.SIGKILL, "serve ignored SIGTERM"
    with get_client(sync_client=True) as client:
        assert client.read_deployment_by_name("retrain/nightly-retrain").paused

    (schedule,) = dep.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("30 2 * * *", "Europe/London")
    assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
    assert dep.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    assert dep.parameters == {"project_dir": str(project), "source": str(source)}
    assert dep.entrypoint == "flows.retrain.retrain"
    assert dep.work_pool_name is None  # served by this machine's runner, no work pool


@pytest.mark.parametrize("stop_with", ["ctrl-c", "sigterm"])
def test_serving_stopped_while_prefect_registers_the_deployment_leaves_it_paused(api, project, monkeypatch, stop_with):
    """Prefect's runner pauses the schedule only once it has started; stopped between creating the
    deployment and starting (a Ctrl-C, or a service manager's SIGTERM, right after launch), serve
    pauses it on the way out, so no run falls due with nothing serving it."""
    import flows.deploy

    set_schedule(project, deployment="nightly-retrain")
    params = load_params(project)

    def registered_then_stopped(deployment, limit):
        deployment.apply()  # what the runner does first: the deployment exists, live
        if stop_with == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)  # before any handler of Prefect's own
        time.sleep(5)
        pytest.fail("SIGTERM did not stop serving")

    def unhandled(signum, frame):  # serve should have put its own handler in front of this one
        pytest.fail("serve left SIGTERM to the handler it found")

    monkeypatch.setattr(flows.deploy.prefect, "serve", registered_then_stopped)
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        with pytest.raises(KeyboardInterrupt):
            flows.deploy.serve(params, project)
        assert signal.getsignal(signal.SIGTERM) is unhandled  # serve put back the handler it found
    finally:
        signal.signal(signal.SIGTERM, previous)
    with get_client(sync_client=True) as client:
        assert client.read_deployment_by_name("retrain/nightly-retrain").paused


def test_deploy_to_a_work_pool(api, project, monkeypatch, capsys):
    set_schedule(project, work_pool="gpu-pool", job_variables={"env": {"FRACATLAS_SOURCE": "/data/FracAtlas.zip"}})
    params = load_params(project)
    with pytest.raises(ValueError, match="gpu-pool"):  # Prefect refuses a pool that does not exist
        deploy(params, ".")
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="gpu-pool", type="process"))
    deploy(params, "/srv/fracture")
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("retrain/weekly-retrain")
    assert dep.work_pool_name == "gpu-pool"
    assert dep.job_variables == {"env": {"FRACATLAS_SOURCE": "/data/FracAtlas.zip"}}
    assert dep.parameters == {"project_dir": "/srv/fracture"}
    assert dep.schedules[0].schedule.cron == params.schedule.cron
    assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
    # A worker starts each run in a temporary folder: relative paths are made absolute here.
    monkeypatch.chdir(project.parent)
    deploy(params, project.name, source="FracAtlas.zip")
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("retrain/weekly-retrain")
    here = project.parent.resolve()
    assert dep.parameters == {"project_dir": str(here / project.name), "source": str(here / "FracAtlas.zip")}
    # Deployed from this checkout to where the workers see the project (an image's folder, absent here).
    monkeypatch.chdir(project)
    capsys.readouterr()
    main(["deploy", "--project-dir", "/opt/fracture"])
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("retrain/weekly-retrain")
    assert dep.parameters == {"project_dir": "/opt/fracture"}
    # The deployer is told where the runs will read their data from.
    assert "each run reads its worker's FRACATLAS_SOURCE (the pool's env job variable), else figshare" in capsys.readouterr().out
    main(["deploy", "--project-dir", "/opt/fracture", "--source", "/data/FracAtlas.zip"])
    assert "; every run copies /data/FracAtlas.zip." in capsys.readouterr().out

    set_schedule(project, work_pool=None)
    with pytest.raises(SystemExit, match=r"schedule\.work_pool is null"):
        main(["deploy", "--project-dir", str(project)])


def test_redeploying_keeps_a_paused_schedule_paused(api, project, monkeypatch, capsys):
    """Paused in the Prefect UI (or its schedule paused) during a PACS outage, then deployed again with
    new code or a new cron: Prefect's update resumed it, and runs fell due that someone had stopped.
    Each switch stays as it was, so the one its user turns back on resumes the schedule."""
    set_schedule(project, work_pool="paused-pool")
    monkeypatch.chdir(project)
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="paused-pool", type="process"))
    name = "retrain/weekly-retrain"

    def read():
        with get_client(sync_client=True) as client:
            return client.read_deployment_by_name(name)

    main(["deploy", "--project-dir", "/srv/fracture"])
    assert "stays paused" not in capsys.readouterr().out
    with get_client(sync_client=True) as client:
        client.pause_deployment(read().id)  # what the UI's toggle does
    set_schedule(project, cron="0 4 * * 2")
    main(["deploy", "--project-dir", "/srv/fracture"])
    dep = read()
    assert dep.paused and dep.schedules[0].schedule.cron == "0 4 * * 2" and dep.schedules[0].active
    assert f"{name} was paused before and stays paused: no run falls due until it is resumed (the deployment's " \
           "toggle in the Prefect UI)" in capsys.readouterr().out
    with get_client(sync_client=True) as client:
        client.resume_deployment(dep.id)
        client.update_deployment_schedule(dep.id, dep.schedules[0].id, active=False)  # `prefect deployment schedule pause`
    main(["deploy", "--project-dir", "/srv/fracture"])
    dep = read()
    assert not dep.paused and [sc.active for sc in dep.schedules] == [False]
    assert f"(`prefect deployment schedule resume {name} {dep.schedules[0].id}`)" in capsys.readouterr().out
    with get_client(sync_client=True) as client:
        client.update_deployment_schedule(dep.id, dep.schedules[0].id, active=True)
    main(["deploy", "--project-dir", "/srv/fracture"])
    dep = read()
    assert not dep.paused and [sc.active for sc in dep.schedules] == [True]
    assert "stays paused" not in capsys.readouterr().out


def test_deploying_to_an_unknown_work_pool_says_where_its_name_came_from(api, project, monkeypatch):
    """`make deploy-schedule WORK_POOL=no-such-pool`: Prefect's refusal, and the setting to change."""
    monkeypatch.chdir(project)
    with pytest.raises(SystemExit, match=r"^error: cannot deploy to work pool 'no-such-pool', named by --work-pool "
                       r"\(make deploy-schedule WORK_POOL=NAME\): Could not find work pool 'no-such-pool'"):
        main(["deploy", "--work-pool", "no-such-pool", "--project-dir", "/srv/fracture"])
    set_schedule(project, work_pool="no-such-pool")
    with pytest.raises(SystemExit, match=r"^error: cannot deploy to work pool 'no-such-pool', named by "
                       r"params\.yaml: schedule\.work_pool: Could not find work pool"):
        main(["deploy", "--project-dir", "/srv/fracture"])


def test_deploying_an_image_needs_the_project_folder_the_image_holds(api, project, monkeypatch):
    """Without PROJECT_DIR a deployment names this checkout, which is not in the image: every run
    would fail on it. So `deploy` with schedule.image set needs the image's folder named."""
    image = "registry.example.org/fracture:abc123"
    set_schedule(project, deployment="image-retrain", work_pool="image-pool", image=image)
    # A pool whose jobs take an image, as a docker or kubernetes pool's template has it.
    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["image"] = {"type": "string", "title": "Image"}
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="image-pool", type="docker", base_job_template=template))
    monkeypatch.chdir(project)
    with pytest.raises(SystemExit, match=r"schedule\.image is 'registry\.example\.org/fracture:abc123'.*"
                       r"`make deploy-schedule PROJECT_DIR=/opt/fracture`"):
        main(["deploy"])  # `make deploy-schedule` without PROJECT_DIR
    with get_client(sync_client=True) as client, pytest.raises(ObjectNotFound):
        client.read_deployment_by_name("retrain/image-retrain")

    main(["deploy", "--project-dir", "/opt/fracture"])
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("retrain/image-retrain")
    assert dep.parameters == {"project_dir": "/opt/fracture"}
    assert dep.job_variables == {"image": image}


def test_serving_refuses_a_deployment_a_work_pool_runs(api, project, monkeypatch):
    """`serve` and `deploy` name the same retrain/<schedule.deployment>: served from another checkout,
    a pool's deployment would send its runs there, and be paused when serving stops."""
    import flows.deploy

    set_schedule(project, deployment="pool-retrain", work_pool="shared-pool")
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="shared-pool", type="process"))
    monkeypatch.chdir(project)
    main(["deploy", "--project-dir", "/srv/fracture"])

    served = []

    def registered_then_stopped(deployment, limit):
        served.append(deployment.name)
        deployment.apply()  # what the runner does first: the deployment made anew, from this checkout
        raise KeyboardInterrupt

    monkeypatch.setattr(flows.deploy.prefect, "serve", registered_then_stopped)
    with pytest.raises(SystemExit, match=r"^error: params\.yaml: schedule\.deployment 'pool-retrain' names "
                       r"retrain/pool-retrain, which is deployed to work pool 'shared-pool'.*Set schedule\.deployment "
                       r"to another name"):
        main(["serve", "--project-dir", str(project)])
    assert served == []
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("retrain/pool-retrain")
    assert (dep.work_pool_name, dep.parameters, dep.paused) == ("shared-pool", {"project_dir": "/srv/fracture"}, False)

    # Under a name of its own, this machine's schedule is served beside the pool's.
    set_schedule(project, deployment="laptop-retrain")
    with pytest.raises(SystemExit, match="stopped before serving retrain/laptop-retrain"):
        main(["serve", "--project-dir", str(project)])
    assert served == ["laptop-retrain"]
    with get_client(sync_client=True) as client:
        assert not client.read_deployment_by_name("retrain/pool-retrain").paused


def test_serving_refuses_a_deployment_another_checkout_serves(api, project, monkeypatch, tmp_path):
    """Two `serve` processes under one deployment name (two machines sharing the server, or a second
    terminal): Prefect let the second take the runs over, and stopping the first paused both."""
    import flows.deploy

    set_schedule(project, deployment="weekly-retrain")
    build_deployment(load_params(project), str(tmp_path / "other-checkout")).apply()  # what another `serve` registered
    served: list[str] = []
    monkeypatch.setattr(flows.deploy.prefect, "serve", lambda deployment, **kwargs: served.append(deployment.name))
    with pytest.raises(SystemExit, match=r"^error: params\.yaml: schedule\.deployment 'weekly-retrain' names "
                       r"retrain/weekly-retrain, which `serve` runs for another checkout, .*other-checkout: "
                       r".*Give this checkout's schedule a name of its own"):
        main(["serve", "--project-dir", str(project)])
    assert served == []
    with get_client(sync_client=True) as client:
        assert not client.read_deployment_by_name("retrain/weekly-retrain").paused
    # The same checkout serving it again (after a restart) is no other checkout.
    build_deployment(load_params(project), str(project.resolve())).apply()
    main(["serve", "--project-dir", str(project)])
    assert served == ["weekly-retrain"]


def test_deploying_refuses_a_deployment_serve_runs(api, project, monkeypatch):
    """The mirror of serve's refusal: deployed to a pool, a served deployment's runs would still go
    to the serving process's checkout, and its schedule be paused when serving stops."""
    set_schedule(project, deployment="served-retrain")
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="review-pool", type="process"))
    build_deployment(load_params(project), str(project)).apply()  # what `serve` registers first
    monkeypatch.chdir(project)
    with pytest.raises(SystemExit, match=r"^error: params\.yaml: schedule\.deployment 'served-retrain' names "
                       r"retrain/served-retrain, which `python -m flows\.deploy serve` serves with no work pool: "
                       r"deploying it to 'review-pool'.*Stop that `serve` process and delete its deployment "
                       r"\(`prefect deployment delete retrain/served-retrain`\), then deploy again; or set "
                       r"schedule\.deployment to another name$"):
        main(["deploy", "--work-pool", "review-pool", "--project-dir", "/srv/fracture"])
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("retrain/served-retrain")
    assert (dep.work_pool_name, dep.parameters) == (None, {"project_dir": str(project)})

    # Under a name of its own, the pool's deployment is made beside the served one.
    set_schedule(project, deployment="pool-retrain-2")
    main(["deploy", "--work-pool", "review-pool", "--project-dir", "/srv/fracture"])
    with get_client(sync_client=True) as client:
        assert client.read_deployment_by_name("retrain/pool-retrain-2").work_pool_name == "review-pool"
        assert client.read_deployment_by_name("retrain/served-retrain").work_pool_name is None


@pytest.mark.slow  # over a minute on two cores beside another test process: a whole run through a worker
def test_a_process_workers_run_retrains_and_registers(api, project, subset_source, monkeypatch):
    """The work-pool commands of docs/operations.md: a process pool, the deployment on it, a worker that runs it."""
    set_schedule(project, work_pool="cpu-pool")
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["register"]["floors"] = {}  # a one-epoch 64 px model is to become champion, not to meet clinical floors
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = os.environ | {"PREFECT_API_URL": api, "PREFECT_HOME": str(project.parent / "prefect-worker")}
    created = subprocess.run(
        [str(BIN / "prefect"), "work-pool", "create", "cpu-pool", "--type", "process"],
        env=env, capture_output=True, text=True, check=False,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    monkeypatch.chdir(project)
    main(["deploy", "--project-dir", str(project), "--source", str(subset_source)])
    elsewhere = project.parent / "worker-cwd"  # a worker starts each run in a folder of its own, not the project
    elsewhere.mkdir()
    log = project.parent / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "cpu-pool"],
            cwd=elsewhere, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        flow_run, tasks, artifacts, _ = _trigger("retrain/weekly-retrain")
    finally:
        stop(worker, signal.SIGINT, grace=30)
        print(f"--- worker log (end) ---\n{log.read_text()[-4000:]}")
    assert flow_run.state.type == StateType.COMPLETED, flow_run.state
    assert _task_states(tasks) == {s: StateType.COMPLETED for s in STAGES}
    assert [a.key for a in artifacts] == [REPORT_KEY]
    champion = MlflowClient(tracking_uri(project)).get_model_version_by_alias(
        load_params(project).register.model_name, "champion"
    )
    assert str(champion.version) == "1"
    assert (project / "dvc.lock").is_file() and not list(elsewhere.iterdir())  # the run worked in the project


def _trigger(name: str) -> tuple:
    """Runs the deployment now; returns the finished flow run, its task runs, its report and the wall time."""
    started = time.perf_counter()
    flow_run = run_deployment(name, timeout=1500, poll_interval=2)
    wall = time.perf_counter() - started
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
    return flow_run, {t.name.rsplit("-", 1)[0]: t for t in tasks}, artifacts, wall


def _task_states(tasks: dict) -> dict[str, StateType]:
    return {name: tasks[name].state.type for name in STAGES if name in tasks}


@pytest.mark.slow
def test_scheduled_retraining_end_to_end(api, project, subset_source):
    # A one-epoch 64 px model cannot reach clinical floors; the gate's rules are tested with the
    # registry. Here the first version must become champion so that the later runs have one.
    raw = yaml.safe_load((project / "params.yaml").read_text())
    if "floors" in raw["register"]:
        raw["register"]["floors"] = {}
        (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(project)
    name = f"retrain/{params.schedule.deployment}"
    source = project.parent / "served-source"
    shutil.copytree(subset_source, source)
    mlflow = MlflowClient(tracking_uri(project))
    model = params.register.model_name

    with serving(project, api, "--source", str(source)) as proc:
        dep = wait_for_deployment(name, proc)
        assert dep.schedules[0].schedule.cron == params.schedule.cron
        assert dep.global_concurrency_limit.limit == 1

        # 1. First run: everything trains and the first version becomes champion.
        first, tasks, artifacts, first_wall = _trigger(name)
        assert first.state.type == StateType.COMPLETED, first.state
        assert _task_states(tasks) == {s: StateType.COMPLETED for s in STAGES}
        (report,) = [a for a in artifacts if a.key == REPORT_KEY]
        assert report.type == "markdown" and "**Retrained**" in report.data
        assert "ROC AUC" in report.data and "## Promotion decision" in report.data
        champion = mlflow.get_model_version_by_alias(model, "champion")
        assert str(champion.version) == "1"
        data_version = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
        assert f"`{data_version}`" in report.data

        # 2. Nothing changed: DVC is up to date, nothing is registered, the report says so.
        noop, tasks, artifacts, noop_wall = _trigger(name)
        assert noop.state.type == StateType.COMPLETED, noop.state
        assert _task_states(tasks) == {s: StateType.COMPLETED for s in STAGES}
        (report,) = [a for a in artifacts if a.key == REPORT_KEY]
        assert "**Nothing changed**" in report.data
        assert report.data.count("| up to date |") == 5
        assert [str(v.version) for v in mlflow.search_model_versions(f"name = '{model}'")] == ["1"]
        assert str(mlflow.get_model_version_by_alias(model, "champion").version) == "1"
        print(
            f"\nscheduled run with nothing changed: {noop.total_run_time.total_seconds():.1f} s flow run time "
            f"({noop_wall:.1f} s from trigger to completion); first run {first.total_run_time.total_seconds():.1f} s "
            f"({first_wall:.1f} s)"
        )

        # 3. A new dataset version (one fractured image fewer, so the fractured share stays within
        # validate.fractured_share): everything reruns and goes through the gate.
        csv = pd.read_csv(source / "dataset.csv")
        dropped = sorted((source / "images" / "Fractured").iterdir())[0]
        dropped.unlink()
        csv[csv["image_id"] != dropped.name].to_csv(source / "dataset.csv", index=False)
        changed, tasks, artifacts, _ = _trigger(name)
        assert changed.state.type == StateType.COMPLETED, changed.state
        (report,) = [a for a in artifacts if a.key == REPORT_KEY]
        new_version = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
        assert new_version != data_version
        assert f"new data version `{new_version}` (was `{data_version}`)" in report.data
        assert "DVC ran validate, split, prepare, train, evaluate" in report.data
        versions = {str(v.version): v for v in mlflow.search_model_versions(f"name = '{model}'")}
        assert sorted(versions) == ["1", "2"]
        assert "| Registered by this run | yes |" in report.data
        # The champion was evaluated on the old split: the gate scores it through the registry on the
        # new test images, and compares the two there, whatever it decides.
        n_test = len(pd.read_csv(project / "outputs" / "split" / "test.csv"))
        assert re.search(rf"\| beats champion \| (pass|\*\*fail\*\*) \| ROC AUC [0-9.]+ vs champion v1's [0-9.]+ "
                         rf"on the same {n_test} images: ", report.data), report.data
        assert re.search(r"\| sensitivity held \| (pass|\*\*fail\*\*) \| sensitivity [0-9.]+ vs champion v1's ",
                         report.data), report.data
        # Whatever the gate decided, the report tells what the registry holds.
        champion = str(mlflow.get_model_version_by_alias(model, "champion").version)
        assert f"| Holds `champion` | {'yes' if champion == '2' else 'no'} |" in report.data
