"""What DVC, MLflow and Prefect cost: the pipeline through the flow vs its stage functions in one process.

    .venv/bin/python -m bench.orchestration --data ../shared/fracatlas [--fractured 60 --not-fractured 240]

Two throwaway projects get the same real FracAtlas subset and the CPU profile cut to one epoch
(its input size and network unchanged). Each side is one command, timed from start to end:

- ``flow``: ``python -m flows.retrain``: a temporary Prefect server, ingest and ``dvc add``,
  every stage reproduced by DVC (status, outputs hashed, cached and locked; the stage's
  ``fracture`` command in the flow's process), registration in MLflow;
- ``flow, server up``: the same command against a Prefect server that is already running
  (``prefect server start`` on 127.0.0.1, started before the clock), as a scheduled run meets
  it: a work pool's worker, or ``flow.serve``, talks to a long-running server, and a process
  work pool starts one such process per run;
- ``direct``: one Python process calling the same stage functions in order (``run_ingest``,
  ``run_validate``, ``run_split``, ``run_prepare``, ``run_train``, ``run_evaluate``,
  ``run_register``), with the same MLflow logging, without DVC and Prefect.

The ratio flow / direct is the orchestration's overhead; its difference in seconds is fixed
per run (the Prefect server and its API calls, DVC's checks and hashing), so it shrinks as a
share of a longer run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tests.conftest import copy_project, make_subset, pick_ids
from tests.servers import child_env, free_port, running

REPO = Path(__file__).resolve().parents[1]  # flows.retrain runs from the repository

DIRECT = """
import sys
from pathlib import Path
from fracture.config import load_params
from fracture.stages.evaluate import run_evaluate
from fracture.stages.ingest import run_ingest
from fracture.stages.prepare import run_prepare
from fracture.stages.register import run_register
from fracture.stages.split import run_split
from fracture.stages.train import run_train
from fracture.stages.validate import run_validate
from fracture.workspace import Workspace

params, workspace = load_params(), Workspace(Path("."))
run_ingest(params, workspace, sys.argv[1])
for stage in (run_validate, run_split, run_prepare, run_train, run_evaluate, run_register):
    stage(params, workspace)
"""


def make_project(dest: Path) -> Path:
    """A project checkout (git and DVC) with the CPU profile cut to one epoch and no floors."""
    copy_project(dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["train"]["profile"] = "cpu"
    params["profiles"]["cpu"]["epochs"] = 1
    params["register"]["floors"] = {}
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def timed(cmd: list[str], cwd: Path, log: Path, **extra_env: str) -> float:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}") | extra_env
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True, help="a FracAtlas-layout folder")
    parser.add_argument("--fractured", type=int, default=60)
    parser.add_argument("--not-fractured", type=int, default=240)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = make_subset(args.data, root / "source", pick_ids(args.data, args.fractured, args.not_fractured))
        projects = {side: make_project(root / side) for side in ("direct", "flow", "served")}
        os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
        print(f"{args.fractured + args.not_fractured} real images, CPU profile for one epoch")
        direct = timed([sys.executable, "-c", DIRECT, str(source)], projects["direct"], root / "direct.log")

        def flow_cmd(project: Path) -> list[str]:
            return [sys.executable, "-m", "flows.retrain", "--project-dir", str(project), "--source", str(source)]

        flow = timed(flow_cmd(projects["flow"]), REPO, root / "flow.log")
        home, port = root / "prefect-server", free_port()
        home.mkdir()
        server_env = child_env(
            PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
            DO_NOT_TRACK="1",
        )
        server_env.pop("PREFECT_API_URL", None)
        api = f"http://127.0.0.1:{port}/api"
        prefect = str(Path(sys.executable).parent / "prefect")
        with running([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], server_env,
                     f"{api}/health", root / "prefect-server.log"):
            served = timed(flow_cmd(projects["served"]), REPO, root / "served.log", PREFECT_API_URL=api)
        print(f"direct (stage functions in one process):             {direct:.1f} s")
        print(f"flow, one shot (temporary Prefect server, DVC, MLflow): {flow:.1f} s")
        print(f"flow, Prefect server already up (a scheduled run):    {served:.1f} s")
        print(f"flow / direct: one shot {flow / direct:.3f} (+{flow - direct:.1f} s), "
              f"server up {served / direct:.3f} (+{served - direct:.1f} s)")


if __name__ == "__main__":
    main()
