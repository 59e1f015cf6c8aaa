"""Servers the tests and benchmarks start on 127.0.0.1: a free port, start, wait until ready, stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests


def free_port() -> int:
    """A port nothing listens on at the moment, on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """This environment, with the venv's scripts first on PATH (the servers start `uvicorn` from it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env | extra


def mlflow_server_env(**extra: str) -> dict[str, str]:
    """:func:`child_env` for `mlflow server`, without MLflow 3's job runner.

    By default the server also starts a job runner and seven huey consumers for MLflow's GenAI
    jobs, which this product never submits: ten processes holding 2.4 GiB instead of two holding
    0.5 GiB, each importing MLflow while the tests run.
    """
    return child_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **extra)


def mlflow_server_cmd(db: Path, artifacts: Path, port: int) -> list[str]:
    """`mlflow server` on 127.0.0.1 with a sqlite backend and proxied local artifacts, one worker."""
    return [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{db}",
        "--artifacts-destination", str(artifacts),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 10) -> None:
    """Stops a process started in its own session, and everything it started, by its group id.

    ``sig`` first; SIGKILL when the group is still there after ``grace`` seconds.
    """
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start(cmd: list[str], env: dict[str, str], ready_url: str, log: Path, timeout: float = 300) -> subprocess.Popen:
    """Starts a server in its own process group and waits for ``ready_url`` to answer 200.

    Raises:
        RuntimeError: the server exited, or did not answer within ``timeout``; the message
            holds the end of its log. The server is stopped first, as it is when the wait is
            interrupted (Ctrl-C, or SIGTERM, which the tests' conftest turns into the same).
    """
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(ready_url, timeout=5).status_code == 200:
                    return proc
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ready_url} did not answer within {timeout:.0f}s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
    except BaseException:  # its deadline passed, or Ctrl-C or SIGTERM while it starts: not left running
        stop(proc)
        raise


@contextmanager
def running(
    cmd: list[str], env: dict[str, str], ready_url: str, log: Path, timeout: float = 300
) -> Iterator[subprocess.Popen]:
    """:func:`start`, then :func:`stop` on the way out, whatever happened."""
    proc = start(cmd, env, ready_url, log, timeout)
    try:
        yield proc
    finally:
        stop(proc)


@contextmanager
def running_mlflow_server(folder: Path) -> Iterator[tuple[str, Path]]:
    """`mlflow server` (:func:`mlflow_server_cmd`, :func:`mlflow_server_env`) on a free loopback port,
    its sqlite store, artifacts and log in ``folder``; yields its URL and its artifact folder."""
    artifacts, port = folder / "server-artifacts", free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = mlflow_server_cmd(folder / "server.db", artifacts, port)
    with running(cmd, mlflow_server_env(), f"{url}/health", folder / "server.log"):
        yield url, artifacts
