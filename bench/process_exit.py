"""How long a command's process takes to end, with and without the interpreter's last collections.

    .venv/bin/python -m bench.process_exit --project . --source ../shared/fracatlas [--images 16] [--repeats 3]

Run it in a project whose main job has run (``make main``), with the source that job ingested.
Two commands users run as processes, each run ``--repeats`` times both ways, alternating (each
pair in the other order from the last):

- ``fracture predict`` on ``--images`` of the project's X-rays (half fractured) through its
  champion, as a consumer scores a folder;
- ``python -m flows.retrain`` with nothing changed, as a scheduled run that finds nothing to do
  (its temporary Prefect server included).

The two ways differ only after the command has returned: ``plain`` lets the interpreter exit as
Python does by default; ``skip`` calls :func:`fracture.cli.skip_exit_collection` first, as the
``fracture`` console script and ``python -m flows.retrain`` now do. Each run prints when its
command returned, so the exit's own seconds are read apart from the whole process's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Runs ``<module>.main(argv)``, prints when it returned, then exits plainly or after skipping the collections.
CHILD = """
import importlib, sys, time
module, skip, argv = sys.argv[1], sys.argv[2] == "skip", sys.argv[3:]
try:
    importlib.import_module(module).main(argv)
finally:
    print(f"returned at {time.time():.6f}", file=sys.stderr, flush=True)
    if skip:
        from fracture.cli import skip_exit_collection
        skip_exit_collection()
"""
WAYS = ("plain", "skip")


def run(module: str, way: str, argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, float]:
    """The whole process's seconds and its exit's (from the command's return to the process's end)."""
    started = time.time()
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, "-c", CHILD, module, way, *argv], cwd=cwd, env=env,
                              stdout=out, stderr=subprocess.STDOUT, check=False)
    ended = time.time()
    text = log.read_text()
    if proc.returncode:
        raise SystemExit(f"{module} {' '.join(argv)} failed ({proc.returncode}):\n{text[-3000:]}")
    returned = float(text.rsplit("returned at ", 1)[1].split()[0])
    return ended - started, ended - returned


def xrays(project: Path, n: int, dest: Path) -> Path:
    """A folder of links to the first ``n`` X-rays of the project's data, half of them fractured."""
    dest.mkdir()
    for folder, count in (("Fractured", n // 2), ("Non_fractured", n - n // 2)):
        found = sorted((project / "data").rglob(f"images/{folder}/*.jpg"))[:count]
        if len(found) < count:
            raise SystemExit(f"fewer than {count} images under {project / 'data'}/**/images/{folder}; run the main job first")
        for path in found:
            (dest / path.name).symlink_to(path)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--source", required=True, help="the folder or zip the main job ingested")
    parser.add_argument("--images", type=int, default=16, help="X-rays fracture predict scores")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    project = args.project.resolve()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}")
    env.pop("PREFECT_API_URL", None)  # the one-shot command, with its temporary server
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = xrays(project, args.images, root / "xrays")
        commands = {
            f"fracture predict, {args.images} X-rays": (
                "fracture.cli", ["predict", str(folder), "--out", str(root / "rows.csv"), "--no-progress"]),
            "retrain flow, nothing changed": (
                "flows.retrain", ["--project-dir", str(project), "--source", str(Path(args.source).resolve())]),
        }
        print(f"{'command':<34}{'way':>6}{'process s (each run)':>34}{'exit s (each run)':>30}")
        for label, (module, argv) in commands.items():
            seconds: dict[str, list[tuple[float, float]]] = {way: [] for way in WAYS}
            for i in range(args.repeats):
                for way in WAYS if i % 2 == 0 else WAYS[::-1]:
                    seconds[way].append(run(module, way, argv, project, env, root / f"{way}-{i}.log"))
            for way in WAYS:
                whole, exits = zip(*seconds[way], strict=True)
                print(f"{label:<34}{way:>6}{statistics.median(whole):8.2f} ("
                      f"{', '.join(f'{s:.2f}' for s in whole)}){statistics.median(exits):9.2f} ("
                      f"{', '.join(f'{s:.2f}' for s in exits)})")
            plain = statistics.median(s for s, _ in seconds["plain"])
            skip = statistics.median(s for s, _ in seconds["skip"])
            print(f"{label}: skip / plain, whole process {skip / plain:.3f}x ({skip - plain:+.2f} s)", flush=True)


if __name__ == "__main__":
    main()
