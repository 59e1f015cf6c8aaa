"""What a rollback leaves on record, and the registry after versions are deleted or their runs are gone.

Against a real MLflow sqlite store with the real models of :mod:`tests.test_registry` (they rank
real FracAtlas X-rays well, badly or at random), loaded and scored in this process.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from contextlib import closing

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from fracture.cli import main as cli
from fracture.registry import DETECTOR_ROLLBACK_COMMAND, RegistryError, require_ready
from fracture.registry import history as registry_history
from tests import test_registry
from tests.conftest import REPO
from tests.test_registry import (
    ANY_GAIN,
    NAME,
    aliases,
    evaluated_run,
    register,
    rollback,
    stopped_when_moving,
)

#: The module's real models and test split (a module-scoped fixture, built once here too).
ranked = test_registry.ranked

RUN_ROLLED_BACK = ("rolled_back_at", "rolled_back_to", "rolled_back_reason", "rolled_back_version")


def test_a_rolled_back_run_is_not_promoted_again_after_its_version_is_deleted(client, ranked):
    """A rollback is recorded on the demoted champion's training run too: deleting the rolled-back
    version (a clean-up) and registering its run again (a scheduled run with nothing new to train)
    makes a new version that is held back, saying how to serve it deliberately; chosen by hand,
    the run's rollback is lifted and the run is registered as it is."""
    split, models = ranked
    register(ANY_GAIN, evaluated_run(0.9), *models["bad"], split, client)
    good_run = evaluated_run(0.9)
    assert register(ANY_GAIN, good_run, *models["good"], split, client).decision == "promoted"
    rollback(NAME, client, "missed wrist fractures in clinic")
    run_tags = client.get_run(good_run).data.tags
    assert {k: run_tags[k] for k in RUN_ROLLED_BACK[1:]} == {
        "rolled_back_to": "1", "rolled_back_reason": "missed wrist fractures in clinic", "rolled_back_version": "2"}
    assert run_tags["rolled_back_at"] == client.get_model_version(NAME, "2").tags["rolled_back_at"]

    client.delete_model_version(NAME, "2")
    again = register(ANY_GAIN, good_run, *models["good"], split, client)
    assert (again.version, again.created, again.decision, again.champion) == ("3", True, "unchanged", False)
    assert "training run was rolled back from champion" in again.reason and "(as version 2)" in again.reason
    assert "missed wrist fractures in clinic" in again.reason
    assert 'fracture rollback --to 3 --reason "..."' in again.reason
    assert aliases(client) == {"champion": "1"}
    assert client.get_model_version(NAME, "3").tags["rolled_back_version"] == "2"
    # A scheduled run once more: the same.
    assert register(ANY_GAIN, good_run, *models["good"], split, client).decision == "unchanged"
    assert aliases(client) == {"champion": "1"}

    # Served again on purpose: the run's rollback is lifted, and its next registration keeps it champion.
    rollback(NAME, client, "the wrist misses were a PACS export fault", to=3)
    run_tags = client.get_run(good_run).data.tags
    assert not set(RUN_ROLLED_BACK) & set(run_tags) and run_tags["rollback_lifted_at"]
    assert not set(RUN_ROLLED_BACK) & set(client.get_model_version(NAME, "3").tags)
    kept = register(ANY_GAIN, good_run, *models["good"], split, client)
    assert (kept.version, kept.reason) == ("3", "already champion")
    assert aliases(client) == {"champion": "3", "previous-champion": "1"}


def test_a_champion_whose_training_run_was_garbage_collected_is_still_compared_with(client, ranked):
    """The champion's training run deleted and removed by `mlflow gc`: the champion still loads
    from the registry, as its consumers load it, so the gate compares with it from its version's
    own record, and says so; every later registration failed with MLflow's "Run ... not found"."""
    split, models = ranked
    register(ANY_GAIN, evaluated_run(0.9), *models["bad"], split, client)
    assert register(ANY_GAIN, evaluated_run(0.9), *models["random"], split, client).champion
    gone = client.get_model_version(NAME, "2").run_id
    client.delete_run(gone)
    uri = mlflow.get_tracking_uri()
    subprocess.run([sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", uri, "--run-ids", gone],
                   check=True, capture_output=True, env=os.environ | {"MLFLOW_TRACKING_URI": uri})
    with pytest.raises(MlflowException, match="not found"):
        client.get_run(gone)

    better = register(ANY_GAIN, evaluated_run(0.9), *models["good"], split, client)
    assert (better.version, better.decision, better.champion_version) == ("3", "promoted", "2")
    assert better.comparison is not None and better.comparison.champion_version == "2"
    scored = next(c for c in better.checks if c.name == "scored with champion")
    assert scored.passed and f"champion v2's training run {gone} is gone from the tracking store" in scored.detail
    assert aliases(client) == {"champion": "3", "previous-champion": "2"}
    # Its version can still be returned to.
    assert rollback(NAME, client, "back to the version whose run is gone").champion == "2"


def test_with_the_champion_version_deleted_the_gate_compares_with_previous_champion_and_rollback_restores_it(
    client, ranked
):
    """Deleting the champion's version removes MLflow's champion alias; previous-champion remains.
    The next registration must beat that one, and says why; `fracture rollback` gives champion
    back to it, and --to to a version chosen, where both refused ("nothing to roll back") and the
    next registration was promoted as "first version to pass the gate", compared with nothing."""
    split, models = ranked
    first_run = evaluated_run(0.9)
    register(ANY_GAIN, first_run, *models["bad"], split, client)
    register(ANY_GAIN, evaluated_run(0.9), *models["random"], split, client)
    client.delete_model_version(NAME, "2")
    assert aliases(client) == {"previous-champion": "1"}
    # previous-champion's own run registered again is not judged against itself: restoring it is a rollback's.
    kept = register(ANY_GAIN, first_run, *models["bad"], split, client)
    assert (kept.version, kept.decision) == ("1", "unchanged") and "this version is previous-champion" in kept.reason
    assert kept.stand_in is None and kept.comparison is None
    assert client.get_model_version(NAME, "1").tags["gate_decision"] == "promoted"

    same = register(ANY_GAIN, evaluated_run(0.9), *models["bad"], split, client)  # version 1's network again
    assert (same.version, same.decision, same.champion) == ("3", "challenger", False)
    assert same.reason.startswith("no version holds champion (the champion version was deleted from the registry, "
                                  "or its alias removed): compared with previous-champion v1")
    assert 'fracture rollback --reason "..."` restores v1 as champion' in same.reason
    assert same.comparison is not None and same.comparison.champion_version == "1"
    # The version it was compared with is named as what it is, not as the champion.
    assert same.stand_in == "1" and same.comparison.against == "previous-champion"
    assert "vs previous-champion v1's" in same.reason and " vs champion v1's" not in same.reason
    # Version 1's network again: the same ranking of every image, so no difference to measure, and no interval.
    assert same.comparison.auc.no_interval == "same ranking" and "no difference to measure" in same.reason
    assert aliases(client) == {"previous-champion": "1", "challenger": "3"}
    # Registered again, its recorded decision stands, and says against which version it was taken.
    again = register(ANY_GAIN, same.run_id, *models["bad"], split, client)
    assert (again.version, again.decision) == ("3", "unchanged")
    assert again.reason.startswith("already decided with no champion, against previous-champion v1 in its stead")
    assert again.stand_in == "1"

    better = register(ANY_GAIN, evaluated_run(0.9), *models["good"], split, client)
    assert (better.version, better.decision) == ("4", "promoted")
    assert "compared with previous-champion v1" in better.reason and "beats previous-champion v1's" in better.reason
    assert (better.stand_in, better.champion_version) == ("1", None)
    # Its history names the version it replaced, as its replaced_version tag does.
    assert registry_history(client, NAME, "4")[-1]["replaced"] == "1"
    assert aliases(client) == {"champion": "4", "previous-champion": "1", "challenger": "3"}

    # The new champion deleted too: a rollback restores previous-champion, once it loads.
    client.delete_model_version(NAME, "4")
    done = rollback(NAME, client, "version 4 withdrawn")
    assert (done.demoted, done.champion, done.previous_champion, done.chosen) == (None, "1", None, False)
    assert aliases(client) == {"champion": "1", "challenger": "3"}
    tags = client.get_model_version(NAME, "1").tags
    assert tags["gate_decision"] == "restored" and tags["gate_reason"].endswith("version 4 withdrawn")

    # Neither alias left: a plain rollback names --to, which makes a version champion by hand.
    client.delete_model_version(NAME, "1")
    with pytest.raises(RegistryError, match=r"no 'champion' alias and no 'previous-champion'.*fracture rollback --to"):
        rollback(NAME, client, "again")
    with pytest.raises(RegistryError, match="has no version '9'"):
        rollback(NAME, client, "a typo", to=9)
    done = rollback(NAME, client, "clinical sign-off of version 3", to=3)
    assert (done.demoted, done.champion, done.chosen) == (None, "3", True)
    assert aliases(client) == {"champion": "3"}
    assert client.get_model_version(NAME, "3").tags["gate_decision"] == "chosen"


def test_a_rollback_with_the_champion_version_deleted_steps_previous_champion_back(client, ranked):
    """v1, v2 and v3 promoted in turn; v3, the champion, deleted: the rollback restores v2 and
    previous-champion steps back to v1, the version v2 replaced, as after any rollback, where it was
    removed (v2's record of what it replaced was cleared first) and a second rollback had nowhere to go."""
    split, models = ranked
    for model in ("bad", "random", "good"):
        assert register(ANY_GAIN, evaluated_run(0.9), *models[model], split, client).decision == "promoted"
    client.delete_model_version(NAME, "3")
    done = rollback(NAME, client, "version 3 withdrawn")
    assert (done.demoted, done.champion, done.previous_champion) == (None, "2", "1")
    assert aliases(client) == {"champion": "2", "previous-champion": "1"}
    assert client.get_model_version(NAME, "2").tags["replaced_version"] == "1"
    again = rollback(NAME, client, "version 2 withdrawn too")
    assert (again.demoted, again.champion, again.previous_champion) == ("2", "1", None)
    assert aliases(client) == {"champion": "1"}


def test_with_the_champion_version_deleted_choosing_previous_champion_steps_it_back(
    client, ranked, tmp_path, monkeypatch, capsys
):
    """No champion, and `--to` names previous-champion's version: previous-champion steps back from
    it as after a plain rollback, where both aliases were left on one version and the next plain
    rollback said there was no previous-champion while the alias was there. Stopped after champion
    moved, a plain rollback finishes the step back."""
    split, models = ranked
    for model in ("bad", "random", "good"):
        assert register(ANY_GAIN, evaluated_run(0.9), *models[model], split, client).decision == "promoted"
    client.delete_model_version(NAME, "3")
    done = rollback(NAME, client, "sign-off of version 2", to=2)
    assert (done.demoted, done.champion, done.previous_champion, done.chosen) == (None, "2", "1", True)
    assert aliases(client) == {"champion": "2", "previous-champion": "1"}
    assert client.get_model_version(NAME, "2").tags["gate_decision"] == "chosen"
    back = rollback(NAME, client, "version 2 withdrawn")
    assert (back.demoted, back.champion, back.previous_champion) == ("2", "1", None)

    # Stopped once champion moved: the plain rollback finishes it rather than saying there is no
    # previous-champion while the alias names the champion's version.
    client.delete_model_version(NAME, "1")
    register(ANY_GAIN, evaluated_run(0.9), *models["random"], split, client)
    assert aliases(client) == {"champion": "4"}
    register(ANY_GAIN, evaluated_run(0.9), *models["good"], split, client)
    client.delete_model_version(NAME, "5")
    with stopped_when_moving(client, "champion", after=True):
        rollback(NAME, client, "sign-off of version 4", to=4)
    assert aliases(client) == {"champion": "4", "previous-champion": "4"}
    # `fracture rollback` says what it did: it finished the pick; version 4 held champion all along.
    # It said "no version held champion; version 4 is champion now, chosen by hand".
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    cli(["rollback", "--reason", "finish"])
    assert capsys.readouterr().out.strip() == (
        "fracture-classifier: champion and previous-champion were both on version 4: the hand pick of version 4 made "
        "where no version held champion had stopped after champion moved. Finished it: champion stays version 4, "
        "previous-champion: none. The stopped command's reason is the one recorded, not this one's"
    )
    assert aliases(client) == {"champion": "4"}


def test_a_version_promoted_over_previous_champion_in_the_champions_stead_keeps_the_chain(client, ranked):
    """No champion (its version deleted): a version that beats previous-champion v1 is promoted and
    records v1 as the version it replaced, so that after a later champion is rolled back to it,
    previous-champion steps back to v1, where it was removed."""
    split, models = ranked
    register(ANY_GAIN, evaluated_run(0.9), *models["bad"], split, client)
    register(ANY_GAIN, evaluated_run(0.9), *models["random"], split, client)
    client.delete_model_version(NAME, "2")
    over = register(ANY_GAIN, evaluated_run(0.9), *models["random"], split, client)
    assert (over.version, over.decision, over.champion_version) == ("3", "promoted", None)
    assert aliases(client) == {"champion": "3", "previous-champion": "1"}
    assert client.get_model_version(NAME, "3").tags["replaced_version"] == "1"
    assert register(ANY_GAIN, evaluated_run(0.9), *models["good"], split, client).decision == "promoted"
    assert aliases(client) == {"champion": "4", "previous-champion": "3"}
    done = rollback(NAME, client, "version 4 withdrawn")
    assert (done.demoted, done.champion, done.previous_champion) == ("4", "3", "1")


def test_with_every_champion_alias_gone_the_gate_says_it_compared_with_none(client, ranked):
    """Earlier champions, but neither champion nor previous-champion left: promoted on the floors
    and the load check, and the reason says so, not "first version to pass the gate"."""
    split, models = ranked
    register(ANY_GAIN, evaluated_run(0.9), *models["bad"], split, client)
    register(ANY_GAIN, evaluated_run(0.9), *models["random"], split, client)
    rollback(NAME, client, "version 2 withdrawn")
    client.delete_model_version(NAME, "1")
    assert aliases(client) == {}
    new = register(ANY_GAIN, evaluated_run(0.9), *models["good"], split, client)
    assert (new.version, new.decision) == ("3", "promoted")
    assert new.reason.startswith("no version holds champion or previous-champion") and "earlier champions: 2" in new.reason


def test_each_decision_rollback_and_pick_is_kept_in_the_versions_history_with_who_and_where(
    client, ranked, monkeypatch
):
    """Promoted, rolled back (reason A), chosen again by hand (B), rolled back again (C): every
    event stays on the version, with the account that ran it and the host, where the last
    reason overwrote the others and nothing said who."""
    split, models = ranked
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "dr.okafor")
    register(ANY_GAIN, evaluated_run(0.9), *models["bad"], split, client)
    register(ANY_GAIN, evaluated_run(0.9), *models["good"], split, client)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "j.smith")
    rollback(NAME, client, "A: missed wrist fractures")
    rollback(NAME, client, "B: the wrist misses were a PACS export fault", to=2)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    rollback(NAME, client, "C: ankle false alarms")

    events = registry_history(client, NAME, "2")
    assert [(e["event"], e["reason"][:2]) for e in events] == [
        ("promoted", "RO"), ("rolled back", "A:"), ("chosen", "B:"), ("rolled back", "C:")]
    assert [e["by"] for e in events] == ["dr.okafor", "j.smith", "j.smith", getpass.getuser()]
    assert all(e["host"] == socket.gethostname() and e["at"].endswith("+00:00") for e in events)
    assert (events[1]["to"], events[2]["replaced"], events[3]["to"]) == ("1", "1", "1")
    assert [(e["event"], e["reason"][:2]) for e in registry_history(client, NAME, "1")] == [
        ("promoted", "fi"), ("restored", "A:"), ("rolled back", "B:"), ("restored", "C:")]


def _set_status(status: str, version: str) -> None:
    """What a registry plugin or an asynchronous copy that failed or has not finished leaves."""
    database = mlflow.get_tracking_uri().removeprefix("sqlite:///")
    with closing(sqlite3.connect(database)) as con, con:
        con.execute("update model_versions set status = ?, status_message = 'copy failed' where version = ?",
                    (status, int(version)))


def test_a_version_whose_registration_failed_or_has_not_finished_is_neither_reused_nor_restored(client, ranked):
    """A version of the run left FAILED_REGISTRATION or PENDING_REGISTRATION has no model to serve:
    registering the run makes a new version, and a rollback or pick to such a version is refused,
    naming its status; the version was reused and promoted to champion."""
    split, models = ranked
    register(ANY_GAIN, evaluated_run(0.9), *models["bad"], split, client)
    register(ANY_GAIN, evaluated_run(0.9), *models["good"], split, client)
    run_id = evaluated_run(0.9)
    assert register(ANY_GAIN, run_id, *models["random"], split, client).decision == "challenger"
    _set_status("FAILED_REGISTRATION", "3")
    again = register(ANY_GAIN, run_id, *models["random"], split, client)
    assert (again.version, again.created, again.decision) == ("4", True, "challenger")
    assert aliases(client) == {"champion": "2", "previous-champion": "1", "challenger": "4"}

    with pytest.raises(RegistryError, match=r"version 3 is FAILED_REGISTRATION: copy failed, not READY: champion "
                                            r"stays at version 2"):
        rollback(NAME, client, "signed off", to=3)
    _set_status("PENDING_REGISTRATION", "1")
    with pytest.raises(RegistryError, match=r"version 1 is PENDING_REGISTRATION: copy failed, not READY.*may still finish"):
        rollback(NAME, client, "back")
    assert aliases(client) == {"champion": "2", "previous-champion": "1", "challenger": "4"}


def test_the_gate_refuses_a_version_whose_registration_has_not_finished():
    """What register() requires of the version it decides on, before any alias moves."""
    from mlflow.entities.model_registry import ModelVersion

    pending = ModelVersion(NAME, "5", 0, status="PENDING_REGISTRATION")
    with pytest.raises(RegistryError, match=r"fracture-classifier version 5 is PENDING_REGISTRATION, not READY: the "
                                            r"gate cannot score it"):
        require_ready(pending, "the gate cannot score it, and it cannot be made champion")
    require_ready(ModelVersion(NAME, "5", 0, status="READY"), "")


def test_every_command_a_rollback_suggests_is_the_one_it_was_given(client, tmp_path):
    """The detector's rollback suggests `fracture rollback --detector` in each of its messages,
    composed where the message is written: `fracture rollback --detector` rewrote the classifier's
    messages with a pattern afterwards, which any new wording could slip past."""
    command = DETECTOR_ROLLBACK_COMMAND
    client.create_registered_model(NAME)
    for _ in range(3):  # models that were never logged: none of them loads
        client.create_model_version(NAME, (tmp_path / "never-logged").as_uri())

    def refused(**how) -> str:
        with pytest.raises(RegistryError) as refusal:
            rollback(NAME, client, "why", command=command, **how)
        message = str(refusal.value)
        assert message.count("fracture rollback") == message.count(f"{command} ") >= 1, message
        return message

    # Neither alias.
    assert f"To make a version champion by hand: {command} --to <version>" in refused()
    client.set_registered_model_alias(NAME, "champion", "2")
    # No previous champion; the champion itself chosen.
    assert f"to choose a version by hand: {command} --to <version>" in refused()
    assert f"To go back to the version it replaced: {command} --reason" in refused(to=2)
    # previous-champion does not load.
    client.set_registered_model_alias(NAME, "previous-champion", "1")
    assert f"roll back (`{command} --reason ...`) or choose a version by hand (`{command} --to <version>" in refused()
    # A hand pick of version 3 stopped before champion moved.
    client.set_model_version_tag(NAME, "2", "rolled_back_to", "3")
    client.set_model_version_tag(NAME, "3", "gate_decision", "chosen")
    client.set_model_version_tag(NAME, "3", "replaced_version", "2")
    assert f"finish it with `{command} --to 3 --reason ...`" in refused()
    assert aliases(client) == {"champion": "2", "previous-champion": "1"}


def test_an_alias_move_stopped_before_its_history_was_written_still_has_its_entry(client, ranked):
    """A command stopped right after an alias moved (a killed worker, the tracking server gone)
    left the move with no entry in the history, which was written after it: the entry is written
    before the move, not completed, and the next command that finds the move made completes it. A
    move stopped before the alias moved keeps its entry not completed."""
    split, models = ranked
    register(ANY_GAIN, evaluated_run(0.9), *models["bad"], split, client)
    with stopped_when_moving(client, "champion", after=True):
        register(ANY_GAIN, evaluated_run(0.9), *models["good"], split, client)
    assert aliases(client)["champion"] == "2"
    assert [(e["event"], e["completed"]) for e in registry_history(client, NAME, "2")] == [("promoted", False)]
    # The next registration, of any run, finds version 2 champion: its promotion did happen.
    register(ANY_GAIN, evaluated_run(0.9, recall=0.5), *models["random"], split, client)
    assert [(e["event"], e["completed"]) for e in registry_history(client, NAME, "2")] == [("promoted", True)]

    with stopped_when_moving(client, "champion"):  # stopped before the move: champion stays
        rollback(NAME, client, "A: stopped before")
    assert aliases(client)["champion"] == "2"
    with stopped_when_moving(client, "champion", after=True):
        rollback(NAME, client, "B: stopped after")
    assert aliases(client)["champion"] == "1"
    moves = {"2": [("promoted", True), ("rolled back", "A:", False), ("rolled back", "B:", False)],
             "1": [("promoted", True), ("restored", "A:", False), ("restored", "B:", False)]}

    def recorded(version: str) -> list[tuple]:
        return [(e["event"], e["completed"]) if e["event"] == "promoted" else (e["event"], e["reason"][:2], e["completed"])
                for e in registry_history(client, NAME, version)]

    assert {v: recorded(v) for v in moves} == moves
    # The rollback run again finishes the one that moved champion, and completes its entries only.
    done = rollback(NAME, client, "B: stopped after")
    assert (done.demoted, done.champion, done.finished) == ("2", "1", True)
    moves["2"][-1], moves["1"][-1] = ("rolled back", "B:", True), ("restored", "B:", True)
    assert {v: recorded(v) for v in moves} == moves


def test_a_challenger_decision_stopped_after_its_alias_moved_is_completed_by_the_next_command(client, ranked):
    """A registration stopped right after `challenger` moved left its history entry `completed: false`
    for good: only moves to champion were completed. The next command that finds the version holding
    `challenger` completes it; one stopped before the alias moved keeps its entry not completed."""
    split, models = ranked
    register(ANY_GAIN, evaluated_run(0.9), *models["good"], split, client)
    with stopped_when_moving(client, "challenger", after=True):
        register(ANY_GAIN, evaluated_run(0.9), *models["random"], split, client)
    assert aliases(client) == {"champion": "1", "challenger": "2"}
    assert [(e["event"], e["completed"]) for e in registry_history(client, NAME, "2")] == [("challenger", False)]
    # A rollback, or the registration of any run, finds version 2 holding challenger: its move happened.
    with stopped_when_moving(client, "challenger"):  # this one stops before the alias moves
        register(ANY_GAIN, evaluated_run(0.9), *models["bad"], split, client)
    assert aliases(client) == {"champion": "1", "challenger": "2"}
    assert [(e["event"], e["completed"]) for e in registry_history(client, NAME, "2")] == [("challenger", True)]
    assert [(e["event"], e["completed"]) for e in registry_history(client, NAME, "3")] == [("challenger", False)]
    with pytest.raises(RegistryError, match="no 'previous-champion' to roll back to"):
        rollback(NAME, client, "nothing to return to")
    assert [(e["event"], e["completed"]) for e in registry_history(client, NAME, "3")] == [("challenger", False)]
