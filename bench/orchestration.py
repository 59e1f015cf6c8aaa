"""What DVC, MLflow and Prefect cost: the pipeline through the flow vs its stage functions in one process.

    .venv/bin/python -m bench.orchestration --data ../shared/fracatlas [--fractured 60 --not-fractured 240] [--repeats 3]

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
  ``run_register``), with the same MLflow logging, without DVC and Prefect, keeping freed
  memory as the stage commands do (:func:`fracture.allocator.keep_freed_memory`) and ending as
  the flow's process ends (:func:`fracture.cli.skip_exit_collection`).

The ratio flow / direct is the orchestration's overhead. Its difference in seconds does not
grow with the epochs (the Prefect server and its API calls, DVC's checks), only DVC's hashing and
caching grows with the images (``--fractured``, ``--not-fractured``), so it shrinks as a share of
a longer run. A run's time moves by a few seconds from one run to the next on a small
machine, as much as the overhead itself, so ``direct`` and ``flow, server up`` run ``--repeats``
times each, alternating, each pair in the other order from the last, each in a fresh project;
the bench prints every run, the ratio of the medians and each pair's ratio. The one-shot command
runs once. The server's own CPU time during each run is printed too: on this machine it shares
the cores with the run, on a deployment it has its own. Last, a table splits the medians into
each of the five DVC stages' seconds on both sides, as each run prints them (the flow's include
DVC's work around the stage's command, which the flow times apart), and the rest of the run.
Since the stages' commands are the same code on both sides, the overhead is also read inside
the runs: DVC's work around the commands plus the difference outside the stages, free of the
commands' own run-to-run spread.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from bench.args import fracatlas_folder
from fracture.config import read_params_yaml
from tests.conftest import copy_project, make_subset, pick_ids
from tests.servers import child_env, free_port, running

REPO = Path(__file__).resolve().parents[1]  # flows.retrain runs from the repository

DIRECT = """
import importlib
import sys
import time
from pathlib import Path
# What the flow's module imports before the flow starts, less Prefect and DVC.
import torch
import fracture.cli, fracture.ingest, fracture.registry, fracture.stages.register
from fracture.allocator import keep_freed_memory
from fracture.config import load_params
from fracture.workspace import Workspace

keep_freed_memory()  # as every stage command does (fracture.cli), so both sides' tensors reuse freed memory
params, workspace = load_params(), Workspace(Path("."))
importlib.import_module("fracture.stages.ingest").run_ingest(params, workspace, sys.argv[1])
for name in ("validate", "split", "prepare", "train", "evaluate"):
    # Each stage's module is imported in its stage's time, as the flow's stage command imports it.
    started = time.perf_counter()
    getattr(importlib.import_module(f"fracture.stages.{name}"), f"run_{name}")(params, workspace)
    print(f"{name:<9} {'ran':<10} {time.perf_counter() - started:7.1f} s")  # as the flow prints its stages
importlib.import_module("fracture.stages.register").run_register(params, workspace)
# Ends as the flow's process does (python -m flows.retrain), without the last collections.
fracture.cli.skip_exit_collection()
"""
STAGES = ("validate", "split", "prepare", "train", "evaluate")


def stage_seconds(log: Path) -> tuple[dict[str, float], dict[str, float]]:
    """The seconds of each DVC stage as a run printed them at its end, and of DVC's work around its command.

    The flow prints ``train     ran   <s> s (command <s> s, DVC <s> s)``; the direct run
    ``train     ran   <s> s`` (no DVC).
    """
    found = re.findall(
        rf"^({'|'.join(STAGES)})\s+ran\s+([\d.]+) s(?: \(command [\d.]+ s, DVC (-?[\d.]+) s\))?$",
        log.read_text(), flags=re.MULTILINE,
    )
    return {stage: float(seconds) for stage, seconds, _ in found}, {stage: float(d) for stage, _, d in found if d}


def make_project(dest: Path) -> Path:
    """A project checkout (git and DVC) with the CPU profile cut to one epoch and no floors."""
    copy_project(dest)
    params = read_params_yaml((dest / "params.yaml").read_text())
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


def server_cpu_seconds(port: int) -> float:
    """CPU time so far of the Prefect server listening on ``port`` and its children."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "server" in cmdline and str(port) in cmdline:
            return sum(sum(p.cpu_times()[:2]) for p in [proc, *proc.children(recursive=True)])
    raise SystemExit(f"no Prefect server on port {port}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=fracatlas_folder, required=True, help="a FracAtlas-layout folder")
    parser.add_argument("--fractured", type=int, default=60)
    parser.add_argument("--not-fractured", type=int, default=240)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side against the server, alternating")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = make_subset(args.data, root / "source", pick_ids(args.data, args.fractured, args.not_fractured))
        os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
        print(f"{args.fractured + args.not_fractured} real images, CPU profile for one epoch, "
              f"{args.repeats} alternating runs of each side")

        def flow_cmd(project: Path) -> list[str]:
            return [sys.executable, "-m", "flows.retrain", "--project-dir", str(project), "--source", str(source)]

        one_shot = timed(flow_cmd(make_project(root / "one-shot")), REPO, root / "one-shot.log")
        print(f"flow, one shot (temporary Prefect server, DVC, MLflow): {one_shot:.1f} s", flush=True)
        home, port = root / "prefect-server", free_port()
        home.mkdir()
        server_env = child_env(
            PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
            DO_NOT_TRACK="1",
        )
        server_env.pop("PREFECT_API_URL", None)
        api = f"http://127.0.0.1:{port}/api"
        prefect = str(Path(sys.executable).parent / "prefect")
        direct: list[float] = []
        served: list[float] = []
        stages: dict[str, list[dict[str, float]]] = {"direct": [], "served": []}
        dvc_work: list[dict[str, float]] = []
        with running([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], server_env,
                     f"{api}/health", root / "prefect-server.log"):
            for i in range(args.repeats):
                # Each pair in the other order from the last, so a machine slowing down (or
                # speeding up) over the bench weighs on both sides alike.
                order = (("direct", direct), ("served", served))
                for side, times in order if i % 2 == 0 else order[::-1]:
                    project = make_project(root / f"{side}-{i}")
                    cpu = server_cpu_seconds(port)
                    if side == "direct":
                        seconds = timed([sys.executable, "-c", DIRECT, str(source)], project, root / f"{side}-{i}.log")
                    else:
                        seconds = timed(flow_cmd(project), REPO, root / f"{side}-{i}.log", PREFECT_API_URL=api)
                    times.append(seconds)
                    total, dvc = stage_seconds(root / f"{side}-{i}.log")
                    stages[side].append(total)
                    if side == "served":  # a stage DVC restored from its run cache ran no command: all DVC's
                        dvc_work.append({stage: dvc.get(stage, seconds) for stage, seconds in total.items()})
                    label = "direct (stage functions in one process)" if side == "direct" else "flow, server up"
                    print(f"run {i + 1}: {label:<42} {seconds:6.1f} s "
                          f"(Prefect server CPU meanwhile {server_cpu_seconds(port) - cpu:.1f} s)", flush=True)
        d, s = statistics.median(direct), statistics.median(served)
        pairs = ", ".join(f"{b / a:.3f}" for a, b in zip(direct, served, strict=True))
        print(f"medians: direct {d:.1f} s, flow with the server up (a scheduled run) {s:.1f} s")
        print(f"flow / direct: server up {s / d:.3f} (+{s - d:.1f} s; each pair {pairs}); "
              f"one shot {one_shot / d:.3f} (+{one_shot - d:.1f} s)")
        # Where the difference is: each stage (the flow's includes DVC's checks, hashing, caching
        # and locking around the command), and the rest of the run (start-up, ingest, registration,
        # Prefect's engine), as medians over the runs.
        print(f"{'':<34}{'direct':>8}{'flow':>8}{'flow - direct':>15}{'DVC around the command':>24}")
        rest = {side: [total - sum(run.values()) for total, run in zip(times, stages[side], strict=True)]
                for side, times in (("direct", direct), ("served", served))}
        rows = [(f"stage {stage}", [run[stage] for run in stages["direct"]], [run[stage] for run in stages["served"]],
                 [run[stage] for run in dvc_work]) for stage in STAGES]
        rows.append(("outside the five stages", rest["direct"], rest["served"], []))
        for label, a, b, work in rows:
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"{label:<34}{ma:8.1f}{mb:8.1f}{mb - ma:+15.1f}" + (f"{statistics.median(work):24.1f}" if work else ""))
        # The stages' commands are the same code on both sides, so what the orchestration adds can
        # also be read inside the runs, without the commands' run-to-run spread: DVC's work around
        # each command (timed by the flow) and the difference outside the stages.
        around = statistics.median([sum(run.values()) for run in dvc_work])
        outside = statistics.median(rest["served"]) - statistics.median(rest["direct"])
        print(f"measured inside the runs: DVC around the five commands {around:.1f} s + outside the stages "
              f"{outside:+.1f} s = {around + outside:.1f} s over direct's {d:.1f} s: "
              f"{(d + around + outside) / d:.3f}")

if __name__ == "__main__":
    main()
