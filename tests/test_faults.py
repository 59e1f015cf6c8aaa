"""Faults a scheduled retrain meets, survived with nothing lost.

Two runs at once on one project, a stage that cannot write its outputs, and the MLflow
tracking server stopping in the middle of a registration.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from prefect import flow, task

import flows.retrain
from flows.retrain import retrain
from fracture.config import RegisterParams
from fracture.gate import EvaluatedSplit
from fracture.project_lock import (
    DVC_STAGE_ENV,
    HELD_ENV,
    LOCK_FILE,
    ProjectBusy,
    project_lock,
)
from fracture.registry import register
from tasks.pipeline import repro, retry_transient_registry
from tests.conftest import (
    REPO,
    SHRUNK_RESAMPLES,
    dvc,
    run,
    shrink_params,
    untrained_model_files,
)
from tests.servers import (
    child_env,
    free_port,
    mlflow_server_cmd,
    mlflow_server_env,
    start,
    stop,
)
from tests.test_serving import xray_paths

NAME = "fracture-classifier"

HOLDER = """
import sys, time
from pathlib import Path
from flows.retrain import project_lock
with project_lock(Path(sys.argv[1])):
    print("holding", flush=True)
    time.sleep(600)
"""

#: A command typed by hand (`fracture rollback`): holds the project until told on stdin that it is done.
TYPED = """
import sys
from pathlib import Path
from fracture.project_lock import project_lock
with project_lock(Path(sys.argv[1]), "`fracture rollback`"):
    print("holding", flush=True)
    sys.stdin.readline()
"""


def _typed_command(project: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", TYPED, str(project)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=child_env(), start_new_session=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
    return holder


def test_a_deployment_run_that_meets_a_typed_command_waits_for_it_and_then_takes_the_project(tmp_path):
    """A scheduled run falling due while `fracture rollback` works says once whom it waits for,
    and goes on when the command finishes, under a note of its own."""
    holder = _typed_command(tmp_path)
    said = []

    def waiting(message: str) -> None:
        said.append(message)
        assert holder.stdin is not None
        holder.stdin.write("done\n")  # the command finishes while the run waits
        holder.stdin.flush()

    try:
        with project_lock(tmp_path, "flow run normal-herring", wait=600, say=waiting):
            note = json.loads((tmp_path / LOCK_FILE).with_suffix(".json").read_text())
            assert (note["holder"], note["pid"]) == ("flow run normal-herring", os.getpid())
        assert holder.wait(timeout=60) == 0
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait()
    assert len(said) == 1, said
    assert said[0].startswith(f"another run is working in {tmp_path.resolve()} (`fracture rollback`, process "
                              f"{holder.pid} on "), said[0]
    assert said[0].endswith("; flow run normal-herring waits up to 600 s for it to finish (schedule.busy_wait_seconds)")


def test_a_deployment_run_that_waited_its_time_is_refused_naming_the_holder(tmp_path):
    holder = _typed_command(tmp_path)
    said = []
    try:
        refused = (rf"^another run is working in {tmp_path.resolve()} \(`fracture rollback`, process {holder.pid} on "
                   r".*\)\. flow run normal-herring stopped after waiting 0\.5 s \(schedule\.busy_wait_seconds\) "
                   r"without changing anything; run it again once that one has finished")
        with pytest.raises(ProjectBusy, match=refused), project_lock(tmp_path, "flow run normal-herring", wait=0.5,
                                                                     say=said.append):
            pytest.fail("the project was taken while the command held it")
        assert len(said) == 1
        # Without a wait (a one-shot run, a command typed by hand) it is refused at once, as before.
        with pytest.raises(ProjectBusy, match=r"\. `fracture ingest` stopped without changing anything"), \
                project_lock(tmp_path, "`fracture ingest`", say=said.append):
            pass
        assert len(said) == 1
        assert json.loads((tmp_path / LOCK_FILE).with_suffix(".json").read_text())["pid"] == holder.pid
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


#: A `dvc repro` typed by hand between two of its stages: DVC's repository lock held, the project's not.
DVC_BETWEEN_STAGES = """
import sys, time
from dvc.repo import Repo
repo = Repo(sys.argv[1])
with repo.lock:
    print("holding", flush=True)
    sys.stdin.readline()
    letting_go = time.time()
print(letting_go, flush=True)
"""


@contextmanager
def _dvc_between_stages(project: Path) -> Iterator[subprocess.Popen]:
    from dvc.repo import Repo  # noqa: PLC0415 - DVC's API loads slowly

    Repo.init(str(project), no_scm=True).close()
    holder = subprocess.Popen([sys.executable, "-c", DVC_BETWEEN_STAGES, str(project)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=child_env(), start_new_session=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        yield holder
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


def test_a_command_typed_while_a_dvc_repro_is_between_stages_is_refused_and_that_repros_own_stages_are_not(
    tmp_path, monkeypatch
):
    """A hand-typed `dvc repro` holds the project only while each stage's command runs, DVC's own lock
    throughout: a writer coming between two stages would take the project from its next stage."""
    monkeypatch.delenv(DVC_STAGE_ENV, raising=False)
    with _dvc_between_stages(tmp_path) as holder:
        dvc_lock = tmp_path.resolve() / ".dvc" / "tmp" / "lock"
        refused = "^" + re.escape(
            f"another run is working in {tmp_path.resolve()} (a DVC command is running in it (DVC's repository lock, "
            f"{dvc_lock}): a `dvc repro` or `dvc exp run` between two stages, or another DVC command). `fracture "
            "ingest` stopped without changing anything"
        )
        with pytest.raises(ProjectBusy, match=refused), project_lock(tmp_path, "`fracture ingest`"):
            pytest.fail("the project was taken while a DVC command ran in it")
        assert not (tmp_path / LOCK_FILE).with_suffix(".json").exists()  # nothing was written
        # That `dvc repro`'s own next stage: DVC runs its command with DVC_STAGE set.
        monkeypatch.setenv(DVC_STAGE_ENV, "train")
        with project_lock(tmp_path, "`fracture train`"):
            assert json.loads((tmp_path / LOCK_FILE).with_suffix(".json").read_text())["holder"] == "`fracture train`"
        assert holder.poll() is None
    monkeypatch.delenv(DVC_STAGE_ENV)
    with project_lock(tmp_path, "`fracture ingest`"):  # the DVC command has finished
        pass


def test_a_deployment_run_waits_for_a_dvc_repro_to_finish_not_for_its_stage_to_end(tmp_path, monkeypatch):
    monkeypatch.delenv(DVC_STAGE_ENV, raising=False)
    said = []
    with _dvc_between_stages(tmp_path) as holder:
        refused = (r"\(a DVC command is running in it \(DVC's repository lock, .*\)\. flow run normal-herring stopped after "
                   r"waiting 0\.5 s \(schedule\.busy_wait_seconds\) without changing anything")
        with pytest.raises(ProjectBusy, match=refused), project_lock(tmp_path, "flow run normal-herring", wait=0.5,
                                                                     say=said.append):
            pytest.fail("the project was taken while a DVC command ran in it")
        assert len(said) == 1 and "a DVC command is running in it (DVC's repository lock" in said[0]

        def finish(message: str) -> None:
            said.append(message)
            assert holder.stdin is not None
            holder.stdin.write("done\n")  # the `dvc repro` finishes while the run waits
            holder.stdin.flush()

        started = time.monotonic()
        with project_lock(tmp_path, "flow run normal-herring", wait=600, say=finish):
            taken = time.time()
            assert json.loads((tmp_path / LOCK_FILE).with_suffix(".json").read_text())["holder"] == "flow run normal-herring"
        assert holder.stdout is not None and taken >= float(holder.stdout.readline())  # once DVC's lock was let go
        assert len(said) == 2 and time.monotonic() - started < 60


#: A stage's `fracture` command as DVC runs it: it holds the project for its work, then its process
#: takes a while to end after letting the project go, as a Python with PyTorch loaded does.
STAGE = """
import sys, time
from pathlib import Path
from fracture.project_lock import project_lock
with project_lock(Path("."), f"`fracture {sys.argv[1]}`"):
    Path(sys.argv[1] + ".started").write_text(str(time.time()))
    time.sleep(1)
    Path(sys.argv[1] + ".out").write_text(sys.argv[1])
time.sleep(1.5)
"""


def test_a_deployment_run_waits_for_a_hand_typed_dvc_repro_to_end_not_only_its_stage(tmp_path, monkeypatch):
    """A real two-stage `dvc repro`: DVC lets its own lock go while each stage's command runs and takes it
    again once the command's process has ended, so for a moment neither lock is held. A run of the
    deployment waiting meanwhile takes the project only when the `dvc repro` has ended, and both stages run."""
    from dvc.repo import Repo  # noqa: PLC0415 - DVC's API loads slowly

    monkeypatch.delenv(DVC_STAGE_ENV, raising=False)
    Repo.init(str(tmp_path), no_scm=True).close()
    (tmp_path / "stage.py").write_text(STAGE)
    python = sys.executable
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "a": {"cmd": f"{python} stage.py a", "outs": ["a.out"]},
        "b": {"cmd": f"{python} stage.py b", "deps": ["a.out"], "outs": ["b.out"]},
    }}))
    repro = subprocess.Popen([python, "-m", "dvc", "repro"], cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "a.started").exists():
            assert repro.poll() is None and time.monotonic() < deadline, repro.stdout.read() if repro.stdout else ""
            time.sleep(0.05)
        said = []
        with project_lock(tmp_path, "flow run normal-herring", wait=120, say=said.append):
            # The whole `dvc repro` had done its work when the run took the project: its second stage
            # ran and DVC recorded it. (Its process may still be ending: once its memory is let go, the
            # system no longer shows its command line, and nothing of it writes any more.)
            ended = repro.poll()
            recorded = yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]
            done = (tmp_path / "b.out").is_file() and "b" in recorded
        output = repro.communicate(timeout=120)[0]
    finally:
        if repro.poll() is None:
            os.killpg(repro.pid, signal.SIGKILL)
            repro.wait()
    assert done and ended in (0, None), output
    assert repro.returncode == 0, output
    assert (tmp_path / "b.out").read_text() == "b" and len(said) == 1, said


@pytest.mark.parametrize("writable", [True, False])
def test_a_dvc_command_between_stages_is_seen_by_the_process_its_lock_file_names(tmp_path, monkeypatch, writable):
    """Between two stages DVC holds no lock: the process the lock file names tells, while it lives, is
    `dvc` and works in this project (a folder of it counts); also when this user cannot open the file to
    lock it (another user's DVC made it)."""
    import zc.lockfile  # noqa: PLC0415

    from fracture.project_lock import DVC_LOCK, dvc_running  # noqa: PLC0415

    monkeypatch.delenv(DVC_STAGE_ENV, raising=False)
    (tmp_path / DVC_LOCK).parent.mkdir(parents=True)
    if not writable:
        def not_writable(path: str) -> None:
            raise PermissionError(13, "Permission denied", path)

        monkeypatch.setattr(zc.lockfile, "SimpleLockFile", not_writable)
    (tmp_path / "dvc").write_text("import time\ntime.sleep(120)\n")  # a process whose program is `dvc`
    (tmp_path / "other").write_text("import time\ntime.sleep(120)\n")
    elsewhere = tmp_path.parent / f"{tmp_path.name}-another-checkout"
    elsewhere.mkdir()
    running = {name: subprocess.Popen([sys.executable, str(tmp_path / name)], cwd=tmp_path / (".dvc" if name == "dvc" else ""))
               for name in ("dvc", "other")}
    # A `dvc` command of another checkout that got the id the lock file kept from this project's last one.
    running["reused"] = subprocess.Popen([sys.executable, str(tmp_path / "dvc")], cwd=elsewhere)
    try:
        (tmp_path / DVC_LOCK).write_text(f" {running['reused'].pid}\n")
        assert not dvc_running(tmp_path)
        (tmp_path / DVC_LOCK).write_text(f" {running['dvc'].pid}\n")  # as zc.lockfile writes it
        assert dvc_running(tmp_path)
        monkeypatch.setenv(DVC_STAGE_ENV, "train")  # that command's own stage
        assert not dvc_running(tmp_path)
        monkeypatch.delenv(DVC_STAGE_ENV)
        (tmp_path / DVC_LOCK).write_text(f" {running['other'].pid}\n")  # the id now another program's
        assert not dvc_running(tmp_path)
        (tmp_path / DVC_LOCK).write_text(f" {running['dvc'].pid}\n")
        running["dvc"].kill()
        running["dvc"].wait()
        assert not dvc_running(tmp_path)  # that DVC command has ended
    finally:
        for proc in running.values():
            proc.kill()
            proc.wait()


def test_a_run_of_the_deployment_waits_as_params_say_and_a_one_shot_run_does_not(tmp_path, monkeypatch):
    from flows.retrain import busy_wait

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["schedule"]["busy_wait_seconds"] = 42
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert busy_wait(tmp_path, from_deployment=True) == 42
    assert busy_wait(tmp_path, from_deployment=False) == 0

    waits = []

    @contextmanager
    def recorded(project: Path, wait: float = 0) -> Iterator[None]:
        waits.append(wait)
        raise ProjectBusy("recorded")
        yield

    # The flow asks Prefect's runtime whether a deployment started it. The project's own mlflow.db,
    # whatever tracking server the shell names: the flow checks that server before it waits.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(flows.retrain, "project_lock", recorded)
    # The refused run's report says so, under the key that would otherwise show the last run's.
    reports = []
    monkeypatch.setattr(flows.retrain, "create_markdown_artifact", lambda **kw: reports.append(kw["markdown"]))
    for deployment_id in ("0b6e7d3c-8f3a-4b8e-9a53-1f0b2c7d9e11", None):
        if deployment_id:
            monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", deployment_id)
        else:
            monkeypatch.delenv("PREFECT__RUNTIME__DEPLOYMENT__ID")
        with pytest.raises(ProjectBusy, match="recorded"):
            retrain.fn(project_dir=str(tmp_path))
    assert waits == [42, 0]
    assert [r.splitlines()[2] for r in reports] == ["**Failed** at stage checks before the run: ProjectBusy: recorded"] * 2


def _wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} after {seconds:.0f} s"
        time.sleep(0.2)


def test_a_run_on_a_busy_project_is_refused_before_it_changes_anything(project, subset_source):
    params_before = (project / "params.yaml").read_text()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(project)], stdout=subprocess.PIPE, text=True,
                              env=child_env(), start_new_session=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        with pytest.raises(ProjectBusy, match=rf"another run is working in {project} \(flow run "
                                               rf"\(outside Prefect\), process {holder.pid} on .*\)\. flow run .* "
                                               r"stopped without changing anything"):
            retrain(project_dir=str(project), source=str(subset_source))
        # Nothing was touched: no data, no lock file of DVC's, params.yaml as it was.
        assert not (project / "data").exists() and not (project / "dvc.lock").exists()
        assert (project / "params.yaml").read_text() == params_before
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # killed, not stopped: the lock must still come free
        holder.wait()
    # A killed holder leaves no stale lock behind: the project is free again.
    from flows.retrain import project_lock

    with project_lock(project):
        pass


def test_a_command_typed_while_a_run_holds_the_project_is_refused_and_the_runs_own_commands_are_not(
    project, subset_source
):
    """`fracture ingest` by hand under a retrain run would replace the data its stages are reading;
    it is refused, naming the run. The run's own commands (in its process, or a child DVC starts)
    go ahead under its hold, and once it ends the same command works."""
    ingest = [sys.executable, "-m", "fracture.cli", "ingest", "--source", str(subset_source)]
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(project)], stdout=subprocess.PIPE, text=True,
                              env=child_env(), start_new_session=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        refused = subprocess.run(ingest, cwd=project, capture_output=True, text=True, env=child_env(), check=False)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert refused.stderr.startswith(f"fracture ingest: another run is working in {project} (flow run (outside Prefect), "
                                         f"process {holder.pid} on "), refused.stderr
        assert not (project / "data").exists()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()

    from flows.retrain import project_lock

    with project_lock(project):
        # A child of the holder, as DVC starts a stage's command, carries the hold in its environment.
        done = subprocess.run(ingest, cwd=project, capture_output=True, text=True, env=child_env(), check=False)
        assert done.returncode == 0, done.stderr
        assert (project / "data" / "fracatlas" / "images").is_dir()
        # A command of another process is still refused while this one holds the project.
        stranger = child_env()
        stranger.pop(HELD_ENV, None)
        refused = subprocess.run(ingest, cwd=project, capture_output=True, text=True, env=stranger, check=False)
        assert refused.returncode == 1 and "another run is working in" in refused.stderr
        # A forged or stale hold is not a hold.
        stranger[HELD_ENV] = f"{(project / LOCK_FILE).resolve()}\t{'0' * 32}"
        refused = subprocess.run(ingest, cwd=project, capture_output=True, text=True, env=stranger, check=False)
        assert refused.returncode == 1 and "another run is working in" in refused.stderr
    assert HELD_ENV not in os.environ
    again = subprocess.run(ingest, cwd=project, capture_output=True, text=True, env=child_env(), check=False)
    assert again.returncode == 0, again.stderr


def test_a_holder_killed_leaves_no_hold_to_its_children_and_torchrun_ranks_follow_rank_zero(project, monkeypatch):
    """A child still carrying a killed holder's token takes the lock itself (a new writer can no
    longer slip in beside it); ranks 1 and up of a torchrun'd command do not contend for the
    lock rank 0 holds for them."""
    from fracture import cli

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(project)], stdout=subprocess.PIPE, text=True,
                              env=child_env(), start_new_session=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
    note = (project / LOCK_FILE).with_suffix(".json")
    token = json.loads(note.read_text())["token"]
    monkeypatch.chdir(project)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "1")
        with cli._stage("train") as (params, _):  # rank 1 under a held project: no refusal
            assert params.train.profile == "cpu"
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(SystemExit, match="fracture train: another run is working in"), cli._stage("train"):
            pass
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    assert json.loads(note.read_text())["token"] == token  # the killed holder's note is still there
    monkeypatch.setenv(HELD_ENV, f"{(project / LOCK_FILE).resolve()}\t{token}")
    with cli._stage("ingest"):
        # Not a pass on the old token: this command holds the lock now, under a note of its own.
        mine = json.loads(note.read_text())
        assert mine["holder"] == "`fracture ingest`" and mine["pid"] == os.getpid() and mine["token"] != token
        stranger = child_env()
        stranger.pop(HELD_ENV, None)
        busy = subprocess.run([sys.executable, "-m", "fracture.cli", "ingest"], cwd=project, capture_output=True,
                              text=True, env=stranger, check=False)
        assert busy.returncode == 1 and "another run is working in" in busy.stderr


# About a minute on two cores: two flow processes, one through the whole flow on real images. Slow
# (make test-all); the default run keeps its twin, a flow run refused by a held project
# (test_a_run_on_a_busy_project_is_refused_before_it_changes_anything).
@pytest.mark.slow
@pytest.mark.integration
def test_two_runs_started_together_one_trains_and_the_other_is_refused(project, subset_source, tmp_path):
    shrink_params(project, register__floors={})
    cmd = [sys.executable, "-m", "flows.retrain", "--project-dir", str(project), "--source", str(subset_source)]
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    with logs[0].open("w") as out:
        first = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                 env=child_env(PREFECT_HOME=str(tmp_path / "prefect-1")))
    try:
        _wait_for((project / LOCK_FILE).with_suffix(".json").is_file, 300, "lock taken by the first run")
        # On this shrunk subset the first run's whole flow can end before the second has imported
        # Prefect and reached the lock, and the second would then find nothing to do. Freeze the
        # first run (and its stage commands) while it holds the project, so the second meets it
        # there every time; a stopped process keeps its lock.
        os.killpg(first.pid, signal.SIGSTOP)
        try:
            with logs[1].open("w") as out:
                second = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=300,
                                        env=child_env(PREFECT_HOME=str(tmp_path / "prefect-2")), check=False)
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        assert first.wait(timeout=900) == 0, logs[0].read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert second.returncode != 0
    assert "another run is working in" in logs[1].read_text()
    # One run's worth of everything: DVC up to date, one version, and it is the champion.
    assert "Data and pipelines are up to date" in dvc(project, "status", "dvc.yaml")
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert [str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")] == ["1"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"


@pytest.mark.integration  # about 30 s on two cores: the pipeline up to evaluate on real images first
def test_a_stage_that_cannot_write_its_outputs_fails_clearly_and_the_previous_ones_come_back(project, subset_source):
    run(project, sys.executable, "-m", "fracture.cli", "ingest", "--source", str(subset_source))
    # As the retrain flow runs them: DVC in this process, and the stages' commands too.
    for stage in ("validate", "split", "prepare", "train", "evaluate"):
        assert repro(project, stage).ran
    metrics = project / "outputs" / "evaluate" / "metrics.json"
    before, lock_before = metrics.read_text(), (project / "dvc.lock").read_text()

    # The evaluate stage's command again, with other params, where no file may grow past 1 KiB
    # (a full disk). The limit is the command's alone: DVC's own database would hit it first.
    shrink_params(project, evaluate__bootstrap_resamples=SHRUNK_RESAMPLES // 2)
    command = [str(Path(sys.executable).parent / "fracture"), "evaluate"]
    failed = subprocess.run(["prlimit", "--fsize=1024", *command],
                            cwd=project, capture_output=True, text=True, env=child_env(), check=False)
    assert failed.returncode != 0
    output = failed.stdout + failed.stderr
    assert "fracture evaluate: could not write its outputs in outputs/evaluate/: File too large. Free disk " \
           "space or fix the folder's permissions" in output, output[-3000:]
    assert "`dvc checkout --force evaluate` puts them back" in output
    assert "Traceback" not in output
    assert (project / "dvc.lock").read_text() == lock_before  # DVC recorded nothing of the failed run

    # The previous outputs are whole in DVC's cache and come back as they were.
    shrink_params(project)
    dvc(project, "checkout", "--force", "evaluate")
    assert metrics.read_text() == before
    assert "Data and pipelines are up to date" in dvc(project, "status", "evaluate")


@pytest.mark.integration
def test_the_tracking_server_stopping_mid_registration_moves_no_alias(tmp_path, monkeypatch):
    from fracture import registry

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    db, artifacts, log = tmp_path / "server.db", tmp_path / "artifacts", tmp_path / "server.log"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast; the task's retries are the test
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    cmd, health = mlflow_server_cmd(db, artifacts, port), f"{url}/health"
    server = start(cmd, mlflow_server_env(), health, log)
    try:
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment("fracture-classification")
        split = EvaluatedSplit("s" * 64, 1, xray_paths()[0])
        params = RegisterParams(NAME, "fracture-classification")
        weights, config = untrained_model_files(tmp_path, 0.5)
        runs = []
        for auc in (0.9, 0.95):
            with mlflow.start_run(tags={"data_version": "d" * 32 + ".dir"}) as r:
                mlflow.log_metrics({"test_roc_auc": auc})
            runs.append(r.info.run_id)
        # In this process (isolated=False) throughout: the fault is the server's, and a consumer's Python
        # for each load (test_registry) would only lengthen the test.
        assert register(params, runs[0], weights, config, split, MlflowClient(url), isolated=False).champion

        # The server stops once the second version is registered, while the gate compares it.
        decide, attempts = registry._decide, []

        def stop_then_decide(*args, **kwargs):
            stop(server, signal.SIGKILL)  # killed, as a crashed server is
            return decide(*args, **kwargs)

        monkeypatch.setattr(registry, "_decide", stop_then_decide)

        @task(retries=2, retry_delay_seconds=1, retry_condition_fn=retry_transient_registry)
        def register_once() -> None:
            attempts.append(time.monotonic())
            register(params, runs[1], weights, config, split, MlflowClient(url), isolated=False)

        @flow
        def registration() -> None:
            register_once()

        with pytest.raises(Exception, match=r"127\.0\.0\.1|Connection|connect") as failure:
            registration()
        assert len(attempts) == 3  # the first try and two retries, all against a stopped server
        print(f"after {len(attempts)} tries: {type(failure.value).__name__}: {str(failure.value)[:300]}")

        # Back up: version 2 exists and holds no alias; version 1 is still the champion.
        server = start(cmd, mlflow_server_env(), health, log)
        client = MlflowClient(url)
        versions = sorted(str(v.version) for v in client.search_model_versions(f"name = '{NAME}'"))
        assert versions == ["1", "2"]
        assert client.get_model_version(NAME, "2").aliases == []
        assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
        # Run again with the server up, the interrupted registration completes through the gate.
        monkeypatch.setattr(registry, "_decide", decide)
        done = register(params, runs[1], weights, config, split, client, isolated=False)
        assert done.version == "2" and not done.created and done.decision in {"promoted", "challenger"}
        assert client.get_model_version(NAME, "2").aliases  # champion or challenger, as the gate decided
    finally:
        stop(server)


HOLDING_A_SERVER = '''
import sys, time
from pathlib import Path
from tests.servers import free_port, running

def test_holds_a_server(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]
    with running(cmd, {}, f"http://127.0.0.1:{port}/", tmp_path / "log") as proc:
        Path(PID_FILE).write_text(str(proc.pid))
        time.sleep(300)
'''


def _sigterm_while_a_server_runs(tmp_path: Path, source: str) -> None:
    """Runs the test file ``source`` in a pytest of its own, sends that pytest SIGTERM once the
    server its test starts has written its pid (``PID_FILE``), and checks that the server is gone."""
    pid_file = tmp_path / "server.pid"
    test_file = tmp_path / "test_server.py"
    test_file.write_text(source.replace("PID_FILE", repr(str(pid_file))))
    held = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-q",
                            str(test_file)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.exists() and pid_file.read_text()) and held.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        server = int(pid_file.read_text())
        held.send_signal(signal.SIGTERM)
        out, _ = held.communicate(timeout=60)
    finally:
        held.kill()
    assert "KeyboardInterrupt: signal SIGTERM" in out, out
    with pytest.raises(ProcessLookupError):
        os.kill(server, 0)


def test_a_test_run_ended_by_sigterm_stops_the_servers_its_tests_started(tmp_path):
    """A CI runner's timeout or cancel sends SIGTERM: the servers the tests started, in sessions of
    their own, are stopped as on Ctrl-C rather than left running on the runner."""
    _sigterm_while_a_server_runs(tmp_path, HOLDING_A_SERVER)


STARTING_A_SERVER = '''
import os, sys
from pathlib import Path
from tests.servers import free_port, start

def test_starts_a_server(tmp_path):
    port = free_port()  # nothing will answer there: the server never comes up
    cmd = [sys.executable, "-c", "import os, time; open(PID_FILE, 'w').write(str(os.getpid())); time.sleep(300)"]
    start(cmd, {}, f"http://127.0.0.1:{port}/", tmp_path / "log", timeout=300)
'''


def test_a_test_run_ended_while_a_server_is_still_starting_stops_that_server(tmp_path):
    """A cancel during a server's start (an MLflow server takes 20-60 s) left it running in its own
    session, holding its port and memory: the wait stopped only at its own deadline."""
    _sigterm_while_a_server_runs(tmp_path, STARTING_A_SERVER)


EACH_WORKERS_PREFECT_HOME = '''
import os
from pathlib import Path

def test_home():
    Path(OUT, os.environ["PYTEST_XDIST_WORKER"]).write_text(os.environ["PREFECT_HOME"])
'''


def test_each_test_process_has_its_own_prefect_home_removed_at_its_end(tmp_path):
    """The xdist workers inherited the controller's Prefect home (one sqlite file for both, and
    "database is locked" to come), and none was ever removed."""
    test_file = tmp_path / "test_homes.py"
    test_file.write_text(EACH_WORKERS_PREFECT_HOME.replace("OUT", repr(str(tmp_path))))
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "FRACTURE_TEST_PREFECT_HOME")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-q",
                           "-n", "2", "--dist", "each", str(test_file)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    homes = {(tmp_path / worker).read_text() for worker in ("gw0", "gw1")}
    assert len(homes) == 2
    assert all(Path(home).name.startswith("fracture-prefect-") and not Path(home).exists() for home in homes)


def test_the_main_job_and_the_tests_send_no_usage_data(tmp_path):
    """MLflow reads DO_NOT_TRACK only as "true", so `make main` (DO_NOT_TRACK=1) sent MLflow's
    telemetry; DVC has a switch of its own, which nothing set."""
    recipe = subprocess.run(["make", "-s", "--no-print-directory", "--eval", "environment-probe: ; @env -0",
                             "environment-probe"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    made = dict(line.split("=", 1) for line in recipe.stdout.split("\0") if "=" in line)
    testing = ("PYTEST_CURRENT_TEST", "CI", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "DVC_NO_ANALYTICS")
    probe = ("from dvc.analytics import is_enabled; from mlflow.telemetry.utils import is_telemetry_disabled; "
             "print(is_telemetry_disabled(), is_enabled())")
    for name, env in (("make", made), ("the tests", os.environ)):
        env = {k: v for k, v in env.items() if k not in testing} | {  # what they set, without what pytest sets
            k: env[k] for k in testing[2:] if k in env}
        seen = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120, check=True)
        assert seen.stdout.split() == ["True", "False"], (name, seen.stdout, seen.stderr[-2000:])
