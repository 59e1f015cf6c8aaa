"""What a rollback leaves on record, and the registry after versions are deleted or their runs are gone.

Against a real MLflow sqlite store with the real models of :mod:`tests.test_registry` (they rank
real FracAtlas X-rays well, badly or at random), loaded and scored in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from tests import test_registry
from tests.test_registry import (
    ANY_GAIN,
    NAME,
    aliases,
    evaluated_run,
    register,
    rollback,
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
