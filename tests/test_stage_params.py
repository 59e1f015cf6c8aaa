"""params.yaml edited while a stage runs under the flow's ``repro``.

DVC reads a stage's params for ``dvc.lock`` only when its command has finished. Without a check,
an edit made during a long stage would be recorded as what its outputs were made with, and the
next run would find nothing to do. A tiny DVC project whose stage command edits params.yaml
itself, after reading it, stands in for someone tuning the next run's settings meanwhile.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
import yaml

from tasks.pipeline import StageFailed, dvc_status, repro
from tests.conftest import dvc, run

# Reads train.lr, "trains", then writes the params in edit-during-run.yaml over params.yaml, if any.
STAGE_SCRIPT = """\
import pathlib, yaml
lr = yaml.safe_load(open("params.yaml"))["train"]["lr"]
pathlib.Path("model.txt").write_text(f"trained with lr={lr}")
edit = pathlib.Path("edit-during-run.yaml")
if edit.exists():
    pathlib.Path("params.yaml").write_text(edit.read_text())
"""


def _params(lr: float, other: int = 1) -> str:
    return yaml.safe_dump({"train": {"lr": lr, "epochs": 1}, "other": {"x": other}})


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    run(root, "git", "init", "-q")
    dvc(root, "init", "-q")
    (root / "stage.py").write_text(STAGE_SCRIPT)
    (root / "params.yaml").write_text(_params(0.001))
    stage = {"cmd": f"{shlex.quote(sys.executable)} stage.py", "params": ["train"], "outs": ["model.txt"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}))
    return root


def test_params_edited_while_a_stage_runs_fail_it_and_dvc_lock_keeps_its_previous_record(project):
    assert repro(project, "train").ran
    recorded = (project / "dvc.lock").read_text()
    assert "lr: 0.001" in recorded

    (project / "params.yaml").write_text(_params(0.002))
    (project / "edit-during-run.yaml").write_text(_params(0.0001))  # tuned while the stage trains
    with pytest.raises(StageFailed) as err:
        repro(project, "train")
    message = str(err.value)
    assert message.startswith("stage train: params.yaml changed while the stage ran (params.yaml: train.lr 0.002 -> 0.0001)")
    assert "nothing of this run was recorded in dvc.lock" in message and "`dvc repro -s train`" in message
    assert (project / "model.txt").read_text() == "trained with lr=0.002"
    # dvc.lock does not claim the model was trained with lr 0.0001, and the stage is not up to date.
    assert (project / "dvc.lock").read_text() == recorded
    assert dvc_status(project, ["train"])

    # The next run trains with the params as they are now; DVC's run cache held nothing of the
    # failed run to restore in its place.
    (project / "edit-during-run.yaml").unlink()
    again = repro(project, "train")
    assert again.outcome == "ran"
    assert (project / "model.txt").read_text() == "trained with lr=0.0001"
    assert yaml.safe_load((project / "dvc.lock").read_text())["stages"]["train"]["params"]["params.yaml"]["train"]["lr"] == 0.0001
    assert not dvc_status(project, ["train"])


def test_params_the_stage_does_not_depend_on_may_change_while_it_runs(project):
    """Another section of params.yaml edited meanwhile is not the stage's concern; it is recorded as usual."""
    (project / "edit-during-run.yaml").write_text(_params(0.001, other=2))
    assert repro(project, "train").outcome == "ran"
    assert yaml.safe_load((project / "dvc.lock").read_text())["stages"]["train"]["params"]["params.yaml"]["train"]["lr"] == 0.001
    (project / "edit-during-run.yaml").unlink()
    assert not dvc_status(project, ["train"])
    assert repro(project, "train").outcome == "up to date"
