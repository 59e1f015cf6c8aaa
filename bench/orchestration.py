"""What DVC, MLflow and Prefect cost: the pipeline through the flow vs its stage functions in one process.

    .venv/bin/python -m bench.orchestration --data ../shared/fracatlas [--fractured 60 --not-fractured 240]

Two throwaway projects get the same real FracAtlas subset and the CPU profile cut to one epoch
(its input size and network unchanged). Each side is one command, timed from start to end:

- ``flow``: ``python -m flows.retrain``: a temporary Prefect server, ingest and ``dvc add``,
  every stage through ``dvc repro`` (a process each), registration in MLflow;
- ``direct``: one Python process calling the same stage functions in order (``run_ingest``,
  ``run_validate``, ``run_split``, ``run_prepare``, ``run_train``, ``run_evaluate``,
  ``run_register``), with the same MLflow logging, without DVC and Prefect.

The ratio flow / direct is the orchestration's overhead; its difference in seconds is fixed
per run (process starts, the Prefect server, DVC's hashing), so it shrinks as a share of a
longer run.
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


def timed(cmd: list[str], cwd: Path, log: Path) -> float:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
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
        flow_project, direct_project = make_project(root / "flow"), make_project(root / "direct")
        os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
        print(f"{args.fractured + args.not_fractured} real images, CPU profile for one epoch")
        direct = timed([sys.executable, "-c", DIRECT, str(source)], direct_project, root / "direct.log")
        flow = timed([sys.executable, "-m", "flows.retrain", "--project-dir", str(flow_project), "--source",
                      str(source)], REPO, root / "flow.log")
        print(f"direct (stage functions in one process): {direct:.1f} s")
        print(f"flow (Prefect, DVC, MLflow):              {flow:.1f} s")
        print(f"flow / direct: {flow / direct:.3f} (+{flow - direct:.1f} s)")


if __name__ == "__main__":
    main()
