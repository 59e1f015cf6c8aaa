"""The benchmarks of `make bench` run: each on tiny inputs, in a process of its own, as make runs it.

No figure is checked (no test holds a timing threshold); what is checked is that each one runs
through to its printed comparison. A benchmark calls the product's functions, and a change to one
of them (a method moved to another module) stopped `make bench` at its second line, unnoticed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, require_fracatlas

#: Every module of bench/ that `make bench` or bench/RESULTS.md runs as a command.
COMMANDS = sorted(
    path.stem for path in (REPO / "bench").glob("*.py")
    if path.stem not in ("__init__", "args", "common") and 'if __name__ == "__main__"' in path.read_text()
)


def run(*args: str, timeout: float = 600) -> str:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} exited with {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


def test_every_benchmark_imports():
    """One process importing them all (each imports torch and the product: seconds apiece)."""
    code = (f"import importlib\nfor name in {COMMANDS!r}:\n"
            "    assert callable(getattr(importlib.import_module('bench.' + name), 'main', None)), name\n"
            "    print(name)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == COMMANDS


def test_the_make_bench_target_runs_benchmarks_that_exist():
    make = (REPO / "Makefile").read_text()
    named = {line.split("-m bench.")[1].split()[0] for line in make.splitlines() if "-m bench." in line}
    assert named and named <= set(COMMANDS), named - set(COMMANDS)


@pytest.mark.parametrize(
    ("args", "printed"),
    [
        (("bench.train_loop", "--images", "6", "--repeats", "1", "--warmup", "2", "--memory-epochs", "0",
          "--frozen-epochs", "0"), "training loop: product"),
        pytest.param(("bench.ensemble_cost", "--batches", "1", "--repeats", "1"), "profile cpu",
                     marks=pytest.mark.slow),  # three networks at 448 px: minutes on two cores
        (("bench.map_bootstrap", "--images", "30", "--fractured", "6", "--resamples", "3"), "ratio:"),
        (("bench.dicom_display", "--height", "64", "--width", "48"), "MONOCHROME1 VOI LUT"),
    ],
    ids=lambda v: v[0] if isinstance(v, tuple) else None,
)
def test_a_benchmark_runs_through_to_its_comparison_on_tiny_inputs(args, printed):
    assert printed in run(*args)


def test_the_data_loading_benchmark_runs_on_a_few_real_xrays():
    out = run("bench.cache_vs_decode", "--data", str(require_fracatlas()), "--limit", "8")
    assert "x" in out.splitlines()[-1]
