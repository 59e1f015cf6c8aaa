"""The retrain flow's function outside a flow run, how it rewrites params.yaml, and the one-line
errors of ``python -m flows.retrain``.

No Prefect server: nothing here starts a flow run (each error here stops the run before it starts).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.conftest import shipped_params_text
from tests.servers import child_env, free_port

HOLDER = """
import sys, time
from pathlib import Path
from fracture.project_lock import project_lock
with project_lock(Path(sys.argv[1]), "test"):
    print("holding", flush=True)
    time.sleep(600)
"""


def _retrain_process(project: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m flows.retrain`` on ``project`` as a user runs it, its Prefect home in ``tmp_path``."""
    cmd = [sys.executable, "-m", "flows.retrain", "--project-dir", str(project), "--source", str(tmp_path / "absent")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                          env=child_env(PREFECT_HOME=str(tmp_path / "prefect"), **env))


def _one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The single line a refused run prints; fails the test on a traceback or a longer output."""
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in output, output[-3000:]
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1, output[-3000:]
    return done.stderr.strip()


def test_a_run_on_a_busy_project_exits_with_one_line_naming_the_holder(project: Path, tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(project)], stdout=subprocess.PIPE, text=True,
                              env=child_env(), start_new_session=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        line = _one_line_error(_retrain_process(project, tmp_path))
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    assert line.startswith(f"error: another run is working in {project} (test, process {holder.pid} "), line
    assert not (project / "data").exists()


def test_a_run_whose_source_does_not_exist_exits_with_one_line_naming_it(project: Path, tmp_path: Path) -> None:
    """It printed two or three tracebacks (173 lines) around the same message, from the failed flow run."""
    line = _one_line_error(_retrain_process(project, tmp_path))
    assert line == (f"error: --source {tmp_path / 'absent'}: {tmp_path / 'absent'} does not exist. Give a FracAtlas "
                    "folder or zip with --source or FRACATLAS_SOURCE, or leave both unset to download from figshare")
    assert not (project / "data").exists()


def test_a_run_with_a_bad_params_value_exits_with_one_line_naming_the_field(project: Path, tmp_path: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["schedule"]["retry_delay_seconds"] = "30s"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    line = _one_line_error(_retrain_process(project, tmp_path))
    assert line.startswith("error: params.yaml: schedule.retry_delay_seconds must be a number of seconds"), line


def test_a_run_whose_tracking_server_does_not_answer_exits_at_once_naming_the_uri_and_variable(
    project: Path, tmp_path: Path
) -> None:
    """Nothing listens on the port: the run stops before any work, not after MLflow's retries."""
    uri = f"http://127.0.0.1:{free_port()}"
    line = _one_line_error(_retrain_process(project, tmp_path, MLFLOW_TRACKING_URI=uri))
    assert f"the MLflow tracking server at {uri} (MLFLOW_TRACKING_URI) does not answer" in line, line
    assert "Start that server, or set MLFLOW_TRACKING_URI" in line, line
    assert not (project / "data").exists() and not (project / "outputs").exists()


def test_a_scheduled_run_fails_before_any_work_when_its_tracking_server_does_not_answer(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deployment's run calls the flow without ``python -m flows.retrain``'s checks: the flow
    itself fails, with the message Prefect shows as the run's state, before it writes anything."""
    from flows.retrain import TrackingServerUnreachable, retrain

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr("flows.retrain.TRACKING_CHECK_PAUSE_S", 0)
    reports = []  # the failed run's report: why, and no registry read from the server that does not answer
    monkeypatch.setattr("flows.retrain.create_markdown_artifact", lambda **kw: reports.append(kw["markdown"]))
    params_before = (project / "params.yaml").read_text()
    with pytest.raises(TrackingServerUnreachable, match=rf"tracking server at {uri} \(MLFLOW_TRACKING_URI\)"):
        retrain.fn(project_dir=str(project), profile="paper")
    assert (project / "params.yaml").read_text() == params_before and not (project / "outputs").exists()
    assert len(reports) == 1 and reports[0].splitlines()[2].startswith(
        "**Failed** at stage checks before the run: TrackingServerUnreachable: the MLflow tracking server at"
    )


@contextmanager
def _health_server(statuses: list[int], port: int = 0) -> Iterator[tuple[str, list[str]]]:
    """A tracking server's stand-in on 127.0.0.1: answers each request with the next of ``statuses``
    (the last one again once they run out); yields its URI and the paths it was asked for."""
    seen: list[str] = []

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            seen.append(self.path)
            self.send_response(statuses[min(len(seen), len(statuses)) - 1])
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def quick_tracking_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """No pause between the tracking server check's attempts, and no proxy between it and 127.0.0.1."""
    monkeypatch.setattr("flows.retrain.TRACKING_CHECK_PAUSE_S", 0)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("http_proxy", raising=False)


@pytest.mark.usefixtures("quick_tracking_check")
@pytest.mark.parametrize(("status", "answers"), [(503, False), (502, False), (401, True), (404, True)])
def test_a_proxys_gateway_error_is_a_tracking_server_that_does_not_answer(
    project: Path, monkeypatch: pytest.MonkeyPatch, status: int, answers: bool
) -> None:
    """A reverse proxy in front of a tracking server that is down answers 502 or 503 for it: that
    is no server, and the run fails before any work, naming the status. Any other answer (a 401 of a
    server that wants a login, a 404 of one without /health) is a server that answers, whose own
    calls then report what it says."""
    from flows.retrain import TrackingServerUnreachable, require_tracking_server

    with _health_server([status]) as (uri, _):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        if answers:
            require_tracking_server(project)
        else:
            with pytest.raises(TrackingServerUnreachable, match=rf"at {uri} \(MLFLOW_TRACKING_URI\) does not answer "
                               rf"\(HTTP {status} .* from the proxy in front of it\)"):
                require_tracking_server(project)


@pytest.mark.usefixtures("quick_tracking_check")
def test_a_tracking_server_behind_a_proxy_that_answers_the_second_attempt_passes_the_check(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy reloading, or the server behind it restarting, answers 503 for a second: the check
    asks again and the run goes ahead, saying once what the first attempt got."""
    from flows.retrain import TRACKING_CHECK_ATTEMPTS, require_tracking_server

    said: list[str] = []
    with _health_server([503, 200]) as (uri, seen):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        require_tracking_server(project, said.append)
    assert seen == ["/health", "/health"]
    assert said == [f"the MLflow tracking server at {uri} (MLFLOW_TRACKING_URI) does not answer (HTTP 503 Service "
                    f"Unavailable from the proxy in front of it); asking again in 0 s (attempt 1 of "
                    f"{TRACKING_CHECK_ATTEMPTS})"]


@pytest.mark.usefixtures("quick_tracking_check")
def test_a_tracking_server_that_starts_after_the_first_attempt_passes_the_check(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing listens on the port at the first attempt (a server restarting); it is up by the second."""
    from flows.retrain import require_tracking_server

    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    said: list[str] = []
    asked: list[list[str]] = []  # the paths the server was asked for, once it runs
    with ExitStack() as servers:

        def restarted(message: str) -> None:  # told after the attempt that got no answer
            said.append(message)
            asked.append(servers.enter_context(_health_server([200], port))[1])

        require_tracking_server(project, restarted)
    assert len(said) == 1 and "(attempt 1 of " in said[0], said
    assert asked == [["/health"]]


@pytest.mark.usefixtures("quick_tracking_check")
def test_a_tracking_server_that_never_answers_fails_the_check_after_every_attempt(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy whose server stays down: each attempt asks once, each but the last is told, and the
    error still names the address, the variable and what to do, with the attempts made."""
    from flows.retrain import (
        TRACKING_CHECK_ATTEMPTS,
        TrackingServerUnreachable,
        require_tracking_server,
    )

    said: list[str] = []
    with _health_server([503]) as (uri, seen):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(TrackingServerUnreachable) as raised:
            require_tracking_server(project, said.append)
    assert TRACKING_CHECK_ATTEMPTS > 1 and len(seen) == TRACKING_CHECK_ATTEMPTS
    assert [m[m.index("(attempt"):] for m in said] == [
        f"(attempt {n} of {TRACKING_CHECK_ATTEMPTS})" for n in range(1, TRACKING_CHECK_ATTEMPTS)
    ]
    assert str(raised.value) == (
        f"the MLflow tracking server at {uri} (MLFLOW_TRACKING_URI) does not answer (HTTP 503 Service Unavailable "
        f"from the proxy in front of it) after {TRACKING_CHECK_ATTEMPTS} attempts, 0 s apart. Start that server, or "
        "set MLFLOW_TRACKING_URI to one that runs (unset it to use the project's own mlflow.db), then run again; "
        "nothing was changed"
    )


class _Stop(Exception):
    """Raised in place of the flow's next step, once what is tested has happened."""


def test_the_flows_function_runs_outside_a_flow_run_and_logs_through_prefects_plain_logger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``retrain.fn(...)`` (a notebook, a test) has no run context: ``get_run_logger`` would raise
    MissingContextError before the first step; the flow logs through ``prefect.logging.get_logger``."""
    import flows.retrain
    from flows.retrain import retrain, set_profile

    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(shipped_params_text())
    set_profile(project, "cpu")
    # Stops the run after its first logged step: setting the profile the caller asked for.
    monkeypatch.setattr(flows.retrain, "load_params", lambda _project: (_ for _ in ()).throw(_Stop()))
    monkeypatch.setattr(flows.retrain, "create_markdown_artifact", lambda **_kw: None)  # the stopped run's report
    prefect_logger = logging.getLogger("prefect")
    caplog.set_level(logging.INFO, logger="prefect")
    prefect_logger.addHandler(caplog.handler)
    try:
        with pytest.raises(_Stop):
            retrain.fn(project_dir=str(project), profile="paper")
    finally:
        prefect_logger.removeHandler(caplog.handler)
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["profile"] == "paper"
    assert any(f"set train.profile: paper in {project / 'params.yaml'}" in r.getMessage() for r in caplog.records)


def test_run_logger_outside_a_run_is_prefects_plain_logger_of_that_name() -> None:
    from tasks.pipeline import run_logger

    logger = run_logger("flows.retrain")
    assert isinstance(logger, logging.Logger) and logger.name == "prefect.flows.retrain"


def test_setting_the_profile_writes_params_nulls_as_null_and_leaves_other_yaml_dumps_as_they_were(tmp_path: Path) -> None:
    """params.yaml keeps `null` as it spells it; DVC's dumps in the same process (dvc.lock, through
    ruamel's round-trip YAML) write None as ``dvc repro`` does, not as params.yaml does."""
    import io

    from ruamel.yaml import YAML

    from flows.retrain import set_profile

    (tmp_path / "params.yaml").write_text(shipped_params_text())
    nulls = shipped_params_text().count(": null")
    assert set_profile(tmp_path, "cpu") and (tmp_path / "params.yaml").read_text().count(": null") == nulls > 0
    out = io.StringIO()
    YAML().dump({"T_0": None}, out)
    assert out.getvalue() == "T_0:\n"
