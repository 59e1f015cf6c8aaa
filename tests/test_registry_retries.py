"""Registrations stopped right after the version was created, and retried (as the flow's register
task retries a locked database or a lost response), and champions moved by another clone while a
detector is scored: against a real MLflow sqlite store, with stand-ins for what is slow.

Each version here is a trivial pyfunc, the pair's scores are made by hand and the load check
passes: the gate's rules are tested elsewhere (tests/test_registry.py, tests/test_detector_registry.py);
what is tested here is which version the run ends up with and what it carries.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest

from fracture import detector_registry
from fracture import registry as registry_module
from fracture.config import DetectParams, RegisterParams
from fracture.data_config import DataConfig
from fracture.detection import Detections
from fracture.detector_registry import DetectorTestSplit, register_detector
from fracture.gate import GateCheck, PairedScores
from fracture.inference import ServingConfig
from fracture.intake import InputPolicy
from fracture.registry import (
    CHAMPION,
    PREVIOUS_CHAMPION,
    TAG_POLICY,
    TAG_ROLLED_BACK,
    register,
    rollback,
)

NAME = "fracture-classifier"
DETECTOR = "fracture-detector"
PARAMS = RegisterParams(NAME, "t", confidence=0.95, sensitivity_tolerance=0.05, floors={"test_roc_auc": 0.8})
SPLIT = SimpleNamespace(fingerprint="a" * 64, check_image=Path("fractured.png"), images=40)
CONFIG = ServingConfig(
    "tf_efficientnet_lite0",
    DataConfig(input_size=(3, 64, 64), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3),
    0.5,
    {"profile": "cpu"},
)
#: CONFIG after the evaluate stage ran again and chose threshold 0.4 (its run logs ``test_threshold`` 0.4).
REEVALUATED = dataclasses.replace(CONFIG, threshold=0.4)
LABELS = np.r_[np.ones(20), np.zeros(20)].astype(int)


class Trivial(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def log_trivial(run_id: str, *_) -> str:
    """Logs a trivial pyfunc into the run (its requirements given: none inferred in a subprocess)."""
    with mlflow.start_run(run_id=run_id):
        return mlflow.pyfunc.log_model(name="model", python_model=Trivial(), pip_requirements=["mlflow"]).model_uri


@pytest.fixture()
def stand_ins(client, monkeypatch):
    """Every version ranks the test split perfectly, the champion not at all; each loads."""

    def perfect_against_chance(name, candidate, champion, split, isolated=True):
        scores = PairedScores(LABELS, LABELS * 0.8 + 0.1, 0.5, np.full(len(LABELS), 0.5), 0.5, str(champion.version))
        return scores, GateCheck("scored with champion", True, "stand-in"), None

    monkeypatch.setattr(registry_module, "log_pyfunc", log_trivial)
    monkeypatch.setattr(registry_module, "scored_with_champion", perfect_against_chance)
    monkeypatch.setattr(registry_module, "load_check", lambda *a, **k: GateCheck("load check", True, "stand-in"))
    monkeypatch.setattr(registry_module, "_require_loadable", lambda *a, **k: None)
    monkeypatch.setattr(detector_registry, "log_detector_pyfunc", log_trivial)
    monkeypatch.setattr(detector_registry, "load_check", lambda *a, **k: GateCheck("load check", True, "stand-in"))
    return client


def evaluated_run(auc: float = 0.9) -> str:
    with mlflow.start_run(tags={"data_version": "d1", "profile": "cpu", "git_commit": "c0ffee"}) as run:
        mlflow.log_metrics({"test_roc_auc": auc, "test_recall": 0.9})
    return run.info.run_id


def registered(run_id: str, config: ServingConfig = CONFIG):
    return register(PARAMS, run_id, Path("model.safetensors"), config, SPLIT, isolated=False)


def aliases(client, name: str = NAME) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def response_lost_once(monkeypatch) -> list[str]:
    """``mlflow.register_model`` creates the version, then the first call's answer is lost (a
    connection reset, a locked database on the request after): the caller sees an error, the
    registry holds the version. Returns the versions it created."""
    real, created = mlflow.register_model, []

    def lost(*args, **kwargs):
        mv = real(*args, **kwargs)
        created.append(str(mv.version))
        if len(created) == 1:
            raise ConnectionError("connection reset by peer")
        return mv

    monkeypatch.setattr(mlflow, "register_model", lost)
    return created


def retried_after_a_lost_response(register, run_id: str, monkeypatch) -> None:
    """``register(run_id)`` whose first try loses the registry's answer after the version is created,
    then the retry, which reuses that version as the first to pass the gate."""
    response_lost_once(monkeypatch)
    with pytest.raises(ConnectionError):
        register(run_id)
    again = register(run_id)
    assert (again.version, again.created, again.decision) == ("1", False, "promoted")


def test_a_rolled_back_run_registered_again_after_a_lost_response_is_not_promoted(stand_ins, monkeypatch):
    """The run's version 2 was rolled back; its evaluate stage ran again, so registering it logs
    version 3, whose creation's answer is lost. The retry finds version 3 and must not promote
    it: it carries the rollback from its creation on."""
    client = stand_ins
    first, second = evaluated_run(), evaluated_run()
    registered(first)
    registered(second)
    rollback(NAME, client, isolated=False)
    assert aliases(client) == {CHAMPION: "1"}
    with mlflow.start_run(run_id=second):
        mlflow.log_metric("test_threshold", 0.4)

    created = response_lost_once(monkeypatch)
    with pytest.raises(ConnectionError):
        registered(second, REEVALUATED)
    again = registered(second, REEVALUATED)
    assert created == ["3"] and (again.version, again.created) == ("3", False)
    assert again.decision == "unchanged" and "rolled back" in again.reason
    assert aliases(client) == {CHAMPION: "1"}
    assert client.get_model_version(NAME, "3").tags[TAG_ROLLED_BACK] == client.get_model_version(NAME, "2").tags[
        TAG_ROLLED_BACK]


def test_a_rolled_back_run_registered_again_while_the_registry_is_locked_is_not_promoted(stand_ins, monkeypatch):
    """The reviewer's case: the request that was to copy the rollback to the new version 3 failed
    ("database is locked", which the flow's register task retries), and the retry promoted version
    3. The rollback now arrives with the version's creation, in the same request."""
    from mlflow.exceptions import MlflowException

    client = stand_ins
    first, second = evaluated_run(), evaluated_run()
    registered(first)
    registered(second)
    rollback(NAME, client, isolated=False)
    with mlflow.start_run(run_id=second):
        mlflow.log_metric("test_threshold", 0.4)
    real_tag, failed = registry_module._tag_version, []

    def locked_once(client_, name, version, tags):  # the first tagging request after the creation fails
        if not failed:
            failed.append((version, set(tags)))
            raise MlflowException("database is locked")
        real_tag(client_, name, version, tags)

    monkeypatch.setattr(registry_module, "_tag_version", locked_once)
    with pytest.raises(MlflowException, match="database is locked"):
        registered(second, REEVALUATED)
    # The version was created carrying the rollback: the request that failed was not the one to copy it.
    assert failed[0][0] == "3" and TAG_ROLLED_BACK not in failed[0][1], failed
    assert client.get_model_version(NAME, "3").tags.get(TAG_ROLLED_BACK)
    assert aliases(client) == {CHAMPION: "1"}
    again = registered(second, REEVALUATED)
    assert again.version == "3" and again.decision == "unchanged" and "rolled back" in again.reason
    assert aliases(client) == {CHAMPION: "1"}
    assert client.get_model_version(NAME, "3").tags.get(TAG_ROLLED_BACK)


def test_a_registration_retried_after_a_lost_response_keeps_its_input_checks_and_description(stand_ins, monkeypatch):
    """The retry reuses the version its first try created: it must carry the input checks it was
    logged with (or a later serve change would reuse it) and its description."""
    client, run_id = stand_ins, evaluated_run()
    retried_after_a_lost_response(registered, run_id, monkeypatch)
    mv = client.get_model_version(NAME, "1")
    assert json.loads(mv.tags[TAG_POLICY]) == InputPolicy().to_dict()
    assert mv.tags["split_fingerprint"] == SPLIT.fingerprint and mv.tags["git_commit"] == "c0ffee"
    assert mv.description and "0.9" in mv.description

    # params.yaml's serve section changed: a new version serves the new checks.
    tightened = dataclasses.replace(CONFIG, input=InputPolicy(max_bytes=5 * 2**20))
    changed = registered(run_id, tightened)
    assert (changed.version, changed.created) == ("2", True)
    assert json.loads(client.get_model_version(NAME, "2").tags[TAG_POLICY])["max_bytes"] == 5 * 2**20


def test_a_version_an_earlier_release_left_half_tagged_is_completed_when_its_run_is_registered_again(stand_ins):
    """An earlier release tagged a new version in requests after creating it; one stopped in
    between left a version without its inherited rollback, input checks and description. The next
    registration of the run completes it before the gate runs, so the rollback holds; a version the
    gate has decided on keeps what it has (its model may serve other checks than today's)."""
    client = stand_ins
    first, second = evaluated_run(), evaluated_run()
    registered(first)
    registered(second)
    rollback(NAME, client, isolated=False)
    with mlflow.start_run(run_id=second):
        mlflow.log_metric("test_threshold", 0.4)
    assert registered(second, REEVALUATED).version == "3"
    # As the earlier release left it when stopped after mlflow.register_model.
    for key in (TAG_ROLLED_BACK, TAG_POLICY, "gate_decision", "gate_reason"):
        client.delete_model_version_tag(NAME, "3", key)
    client.update_model_version(NAME, "3", description="")

    again = registered(second, REEVALUATED)
    assert again.version == "3" and again.decision == "unchanged" and "rolled back" in again.reason
    assert aliases(client) == {CHAMPION: "1"}
    mv = client.get_model_version(NAME, "3")
    assert mv.tags[TAG_ROLLED_BACK] and json.loads(mv.tags[TAG_POLICY]) == InputPolicy().to_dict()
    assert mv.description

    # A decided version without the tag (registered before it existed) is not given today's.
    client.delete_model_version_tag(NAME, "1", TAG_POLICY)
    assert registered(first).version == "1"
    assert TAG_POLICY not in client.get_model_version(NAME, "1").tags


# --- the detector -------------------------------------------------------------------------------------

TRUTH = tuple([np.array([[10.0 + i, 10.0, 50.0 + i, 50.0]]) for i in range(8)] + [np.zeros((0, 4))] * 8)
DETECTOR_SPLIT = DetectorTestSplit("f" * 64, tuple(Path(f"IMG{i:07d}.png") for i in range(16)), TRUTH)
DETECT_PARAMS = dataclasses.replace(DetectParams(), floors={"test_map_50": 0.1}, bootstrap_resamples=50)
DESCRIBED = {"architecture": "fcos", "backbone": "tf_efficientnet_lite0", "image_size": 256, "threshold": 0.05,
             "input": InputPolicy().to_dict()}


def detector_run(map_50: float = 0.4) -> str:
    with mlflow.start_run(tags={"classifier_run_id": "c1", "data_version": "d1", "git_commit": "c0ffee"}) as run:
        mlflow.log_metrics({"test_map_50": map_50, "test_map": map_50 / 2})
    return run.info.run_id


def detector_registered(run_id: str, described: dict = DESCRIBED):
    return register_detector(DETECT_PARAMS, run_id, Path("detector.safetensors"), described, DETECTOR_SPLIT,
                             isolated=False)


def finding(versions: set[str]):
    """``served_detections`` where the ``versions`` find every box and the others none."""

    def served(name, version, split):
        boxes = [t.copy() if len(t) and str(version) in versions else np.array([[0.0, 0.0, 5.0, 5.0]]) for t in TRUTH]
        return Detections(boxes, [np.array([0.9]) for _ in TRUTH]), 0.05

    return served


def test_a_detector_registration_retried_after_a_lost_response_keeps_its_provenance(stand_ins, monkeypatch):
    client = stand_ins
    retried_after_a_lost_response(detector_registered, detector_run(), monkeypatch)
    mv = client.get_model_version(DETECTOR, "1")
    assert mv.tags["split_fingerprint"] == DETECTOR_SPLIT.fingerprint and mv.tags["threshold"] == "0.05"
    assert json.loads(mv.tags["metrics"]) == {"test_map": 0.2, "test_map_50": 0.4}
    assert mv.tags["classifier_run_id"] == "c1" and mv.tags["git_commit"] == "c0ffee"
    assert json.loads(mv.tags[TAG_POLICY]) == InputPolicy().to_dict()
    assert mv.description and "mAP@0.5 0.400" in mv.description


def test_a_detector_registered_again_under_other_input_checks_is_a_new_version_that_serves_them(stand_ins):
    client = stand_ins
    run_id = detector_run()
    first = detector_registered(run_id)
    assert (first.version, first.created) == ("1", True)
    assert json.loads(client.get_model_version(DETECTOR, "1").tags[TAG_POLICY]) == InputPolicy().to_dict()
    tightened = DESCRIBED | {"input": InputPolicy(max_rows=4, modalities=("DX",)).to_dict()}
    again = detector_registered(run_id, tightened)
    assert (again.version, again.created) == ("2", True)
    policy = json.loads(client.get_model_version(DETECTOR, "2").tags[TAG_POLICY])
    assert (policy["max_rows"], policy["modalities"]) == (4, ["DX"])
    assert detector_registered(run_id, tightened).created is False  # nothing changed since
    assert detector_registered(run_id).version == "1"  # the old checks: the old version


def test_a_champion_moved_while_a_detector_is_scored_is_the_one_it_is_scored_against(stand_ins, monkeypatch):
    """Another clone promotes version 2 while version 3 is scored against champion 1: version 3 is
    scored against 2 before any alias moves, rather than crashing or replacing 2 unseen."""
    client = stand_ins
    detector_registered(detector_run())
    detector_registered(detector_run(0.05))  # below the floor
    assert aliases(client, DETECTOR) == {CHAMPION: "1", "challenger": "2"}
    served, scored = finding({"1", "3"}), []

    def another_clone_promotes_2(name, version, split):
        scored.append(str(version))
        if scored == ["3"]:
            client.set_registered_model_alias(DETECTOR, CHAMPION, "2")
        return served(name, version, split)

    monkeypatch.setattr(detector_registry, "served_detections", another_clone_promotes_2)
    third = detector_registered(detector_run())
    assert scored == ["3", "1", "3", "2"]
    assert (third.decision, third.champion_version) == ("promoted", "2"), third.summary()
    assert aliases(client, DETECTOR) == {CHAMPION: "3", PREVIOUS_CHAMPION: "2", "challenger": "2"}
    tags = client.get_model_version(DETECTOR, "3").tags
    assert tags["gate_compared_with"] == "2" and tags["replaced_version"] == "2" and tags["gate_decision"] == "promoted"


def test_a_champion_moved_while_a_detector_is_promoted_is_not_overwritten(stand_ins, monkeypatch):
    """The other clone's promotion lands after this one decided but before its champion alias
    moves: the version is scored against the new champion, and loses to it."""
    client = stand_ins
    detector_registered(detector_run())
    detector_registered(detector_run(0.05))  # below the floor
    # Version 3 beats 1, but not 2.
    monkeypatch.setattr(detector_registry, "served_detections", finding({"2", "3"}))
    real_tag, moved = registry_module._tag_version, []

    def another_clone_promotes_2(client_, name, version, tags):
        real_tag(client_, name, version, tags)
        if tags.get("gate_decision") == "promoted" and name == DETECTOR and not moved:
            moved.append(version)
            client_.set_registered_model_alias(DETECTOR, CHAMPION, "2")

    monkeypatch.setattr(registry_module, "_tag_version", another_clone_promotes_2)
    third = detector_registered(detector_run())
    assert moved == ["3"]
    assert (third.decision, third.champion_version) == ("challenger", "2"), third.summary()
    assert aliases(client, DETECTOR)[CHAMPION] == "2"
    tags = client.get_model_version(DETECTOR, "3").tags
    assert tags["gate_decision"] == "challenger" and tags["gate_compared_with"] == "2"
    assert "replaced_version" not in tags
