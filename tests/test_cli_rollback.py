"""What ``fracture rollback`` prints for each thing a rollback can have done (the registry's side,
against a real MLflow store, is in :mod:`tests.test_registry_rollback`)."""

from __future__ import annotations

import shutil

import pytest

from fracture.cli import main as cli
from fracture.registry import Rollback
from fracture.stages import register as stage_register
from tests.conftest import REPO


@pytest.fixture()
def rolled_back(tmp_path, monkeypatch, capsys):
    """``fracture rollback`` in a project, the registry's answer given: what the command prints."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)

    def run(done: Rollback, *args: str) -> str:
        monkeypatch.setattr(stage_register, "run_rollback", lambda *a, **k: done)
        cli(["rollback", "--reason", "why", *args])
        return capsys.readouterr().out.strip()

    return run


def test_finishing_a_rollback_stopped_after_champion_moved_says_so(rolled_back):
    """champion and previous-champion both on version 1: a rollback from version 2 stopped after
    champion moved. This command moved previous-champion only, and said it had rolled champion
    back from version 2 to 1, as if it had."""
    out = rolled_back(Rollback("fracture-classifier", "2", "1", "0", finished=True))
    assert out == (
        "fracture-classifier: champion and previous-champion were both on version 1: the rollback from version 2 to "
        "version 1 had stopped after champion moved. Finished it: champion stays version 1, previous-champion: "
        "version 0; version 2 stays tagged rolled_back_at. The stopped command's reason is the one recorded, not "
        "this one's; `fracture rollback` again rolls back to version 0"
    )
    restored = rolled_back(Rollback("fracture-classifier", None, "4", None, finished=True))
    assert "the restoration of version 4 made where no version held champion had stopped" in restored
    assert "no version held champion; version 4 is champion now" not in restored


def test_a_rollback_that_moved_champion_says_where_from_and_to(rolled_back):
    assert rolled_back(Rollback("fracture-classifier", "3", "1", None)) == (
        "fracture-classifier: champion rolled back from version 3 to version 1; previous-champion: none; version 3 "
        "holds no alias now and is tagged rolled_back_at"
    )
    assert rolled_back(Rollback("fracture-classifier", None, "4", None, chosen=True), "--to", "4") == (
        "fracture-classifier: no version held champion; version 4 is champion now, chosen by hand; previous-champion: "
        "none"
    )
