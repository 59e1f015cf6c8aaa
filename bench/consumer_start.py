"""How long a consumer's Python takes to load a version and end, this checkout's against a commit's.

    .venv/bin/python -m bench.consumer_start --project . --before <commit> [--repeats 3]

Run it in a project whose main job has run (``make main``). ``fracture predict`` keeps a version
loaded in a Python of its own (:class:`fracture.consumer.ConsumerModel`), and the gate scores
each version in one (:func:`fracture.consumer.predict_as_consumer`): that Python's start, loading
the version and its end is a fixed cost of every ``fracture predict`` and of each version the
gate scores. This starts the program that keeps a version loaded (``WORKER``), as it is in this
checkout and as it was at ``--before`` (read with ``git show``), on the project's champion;
closes its input once it has said what it loaded, so that it ends; and times the whole process.
The two run ``--repeats`` times, alternating (each pair in the other order from the last), each
with a temporary folder of its own as ``fracture.consumer`` gives it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fracture import consumer

REPO = Path(__file__).resolve().parent.parent


def program_at(commit: str) -> str:
    """``fracture.consumer.WORKER`` as it was at ``commit``."""
    source = subprocess.run(["git", "show", f"{commit}:fracture/consumer.py"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "consumer_then.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("consumer_then", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        try:
            spec.loader.exec_module(module)
        finally:
            del sys.modules[spec.name]
    return module.WORKER


def seconds(program: str, uri: str) -> float:
    """One consumer's Python loading ``uri``, told there is nothing to score, to its end."""
    # Its error output goes to a file, as ConsumerModel's does: a pipe left unread until the end could fill.
    with tempfile.TemporaryDirectory(prefix="fracture-consumer-") as tmp, tempfile.TemporaryFile() as errors:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-I", "-c", program, uri], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=errors, env=consumer._consumer_env(tmp))
        header = proc.stdout.read(8)  # the first frame's length: the version has loaded
        proc.stdin.close()
        proc.stdout.read()
        proc.wait()
        ended = time.perf_counter()
        if proc.returncode or len(header) < 8:
            errors.seek(0)
            raise SystemExit(f"{uri} did not load ({proc.returncode}):\n{errors.read().decode(errors='replace')[-3000:]}")
    return ended - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--before", required=True, help="the commit whose consumer program to compare with")
    parser.add_argument("--model", default="fracture-classifier", help="the registered model whose champion loads")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{args.project.resolve() / 'mlflow.db'}"
    from mlflow import MlflowClient

    version = MlflowClient().get_model_version_by_alias(args.model, "champion").version
    uri = f"models:/{args.model}/{version}"
    programs = {args.before: program_at(args.before), "this checkout": consumer.WORKER}
    times: dict[str, list[float]] = {label: [] for label in programs}
    for i in range(args.repeats):
        for label in list(programs) if i % 2 == 0 else list(programs)[::-1]:
            times[label].append(seconds(programs[label], uri))
    print(f"a consumer's Python loading {uri} and ending, {args.repeats} runs each, alternating")
    for label, runs in times.items():
        print(f"{label:>16}: {statistics.median(runs):6.2f} s ({', '.join(f'{s:.2f}' for s in runs)})")
    then, now = (statistics.median(times[label]) for label in programs)
    print(f"this checkout / {args.before}: {now / then:.3f}x ({now - then:+.2f} s)")


if __name__ == "__main__":
    main()
