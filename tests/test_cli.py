"""The processes' entry points: the ``fracture`` console script and ``python -m flows.retrain``
end without the interpreter's last garbage collections; :func:`fracture.cli.main`, which a flow
calls in its own process, leaves the collector alone."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

from tests.conftest import REPO

#: Prints, as the very last thing the process does, how many objects gc.freeze() put out of reach.
REPORT_FROZEN = "import atexit, gc; atexit.register(lambda: print('frozen', gc.get_freeze_count(), flush=True)); "


def frozen_at_exit(code: str) -> tuple[int, int, str]:
    """The objects frozen when a Python process running ``code`` ended, its exit status, and its output."""
    proc = subprocess.run([sys.executable, "-c", REPORT_FROZEN + code], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("frozen ")]
    assert line, f"the process did not reach its exit:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return int(line[-1].split()[1]), proc.returncode, proc.stdout + proc.stderr


def test_the_fracture_console_script_is_the_quick_exit_entry_point():
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "fracture"]
    assert script.value == "fracture.cli:console"


def test_the_console_script_freezes_what_is_left_also_when_its_command_fails():
    frozen, status, out = frozen_at_exit(
        "import sys; sys.argv = ['fracture', 'predict', '--help']; from fracture.cli import console; console()")
    assert status == 0 and "Score X-rays" in out
    assert frozen > 10_000  # what the imports made, left to the process's end

    frozen, status, out = frozen_at_exit(
        "import sys; sys.argv = ['fracture', 'predict', 'no-such-folder']; from fracture.cli import console; console()")
    assert status != 0 and "no-such-folder" in out
    assert frozen > 0


def test_main_as_a_flow_calls_it_leaves_the_collector_alone():
    frozen, status, out = frozen_at_exit("from fracture.cli import main; main(['predict', '--help'])")
    assert status == 0 and "Score X-rays" in out
    assert frozen == 0


def test_the_retrain_module_run_as_a_process_freezes_what_is_left():
    frozen, status, out = frozen_at_exit(
        "import runpy, sys; sys.argv = ['retrain', '--help']; runpy.run_module('flows.retrain', run_name='__main__')")
    assert status == 0 and "--project-dir" in out
    assert frozen > 10_000

    frozen, status, out = frozen_at_exit("from flows.retrain import main; main(['--help'])")
    assert status == 0 and frozen == 0


def test_a_stage_in_a_copy_of_the_project_runs_the_copys_code(tmp_path):
    """A queued or --temp `dvc exp run` runs its stages in a copy of the project made when it was
    queued: there the venv's `fracture` (installed from the workspace) runs the copy's code, which
    the experiment's dvc.lock records, not the workspace's as it is when the queue reaches it."""
    import os
    import shutil
    from pathlib import Path

    copy = tmp_path / ".dvc" / "tmp" / "exps" / "run" / "q1"
    shutil.copytree(REPO / "fracture", copy / "fracture", ignore=shutil.ignore_patterns("__pycache__"))
    init = copy / "fracture" / "__init__.py"
    init.write_text(init.read_text() + "\nimport sys as _sys\nprint('the copy s code', file=_sys.stderr)\n")
    script = Path(sys.executable).with_name("fracture")
    env = {key: value for key, value in os.environ.items() if key not in {"DVC_ROOT", "FRACTURE_CODE_FROM"}}

    in_stage = subprocess.run([str(script), "predict", "--help"], cwd=copy, env={**env, "DVC_ROOT": str(tmp_path)},
                              capture_output=True, text=True, timeout=300, check=False)
    assert in_stage.returncode == 0 and "Score X-rays" in in_stage.stdout
    assert in_stage.stderr.count("the copy s code") == 1, in_stage.stderr
    # Outside a DVC stage the command is the installed one, wherever it is run from.
    outside = subprocess.run([str(script), "predict", "--help"], cwd=copy, env=env,
                             capture_output=True, text=True, timeout=300, check=False)
    assert outside.returncode == 0 and "the copy s code" not in outside.stderr
