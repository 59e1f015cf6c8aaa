"""A scheduled retrain with nothing changed vs ``dvc repro`` with nothing changed, side by side.

    .venv/bin/python -m bench.noop_run --project . --source ../shared/fracatlas

Run it in a project whose main job has run (``make main``), with the source that job ingested.
Four figures, all on the unchanged project:

- ``dvc repro``: DVC alone finding every stage up to date (one process: its start and imports
  included, as the one-shot command's below);
- DVC's reproduce in this process, after one untimed call: the check alone, warm, as the flow
  run below meets it (the flow's own figure is against this one too);
- the flow run: ``retrain()`` as a served schedule runs it, in a process where Prefect's
  server is already up (the first call, which starts the temporary server, is a warm-up);
- the one-shot command ``python -m flows.retrain``: interpreter start, imports and a temporary
  Prefect server included.

Each run must report that nothing changed; the script stops otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--source", required=True, help="the folder or zip the main job ingested")
    args = parser.parse_args()
    project = args.project.resolve()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")

    started = time.perf_counter()
    repro = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, capture_output=True,
                           text=True, check=True)
    dvc_seconds = time.perf_counter() - started
    if "didn't change" not in repro.stdout and "up to date" not in repro.stdout:
        raise SystemExit(f"dvc repro ran something; run the main job first:\n{repro.stdout[-2000:]}")

    from dvc.repo import Repo  # noqa: PLC0415 - imported after the process side, not timed

    def reproduce() -> list:
        # From the project's folder, as `dvc repro` runs: DVC reads its default target, dvc.yaml, from there.
        with contextlib.chdir(project), Repo(str(project)) as repo:
            return repo.reproduce()

    reproduce()  # warm: imports, and the file system's caches of the project
    started = time.perf_counter()
    ran = reproduce()
    dvc_warm_seconds = time.perf_counter() - started
    if ran:
        raise SystemExit(f"DVC reproduced {', '.join(s.addressing for s in ran)}; run the main job first")

    from flows.retrain import retrain  # noqa: PLC0415 - imported after the DVC side, not timed

    warm = retrain(project_dir=str(project), source=args.source)
    if not warm.nothing_changed:
        raise SystemExit("the project changed since its last run; run it once more, then measure")
    started = time.perf_counter()
    result = retrain(project_dir=str(project), source=args.source)
    flow_seconds = time.perf_counter() - started
    assert result.nothing_changed and result.ingest.unchanged, "the second run was no no-op"

    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.retrain", "--project-dir", str(project), "--source", args.source],
                   env=env, capture_output=True, text=True, check=True)
    command_seconds = time.perf_counter() - started

    print(f"dvc repro, nothing changed:                         {dvc_seconds:6.1f} s")
    print(f"DVC's reproduce in this process, warm:              {dvc_warm_seconds:6.1f} s")
    print(f"flow run, nothing changed (Prefect server up):      {flow_seconds:6.1f} s  "
          f"({flow_seconds / dvc_seconds:.2f}x dvc repro, {flow_seconds / dvc_warm_seconds:.2f}x DVC's check warm)")
    print(f"python -m flows.retrain, nothing changed (one shot): {command_seconds:6.1f} s")
    print("flow run's stages: " + ", ".join(f"{r.stage} {r.seconds:.2f} s" for r in result.runs.values())
          + f"; ingest {result.ingest.seconds:.2f} s")


if __name__ == "__main__":
    main()
