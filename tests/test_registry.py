"""Registration against a real MLflow sqlite store: once per run, champion only when better."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient
from safetensors.torch import save_file

from fracture.config import load_params
from fracture.model import create_classifier, data_config
from fracture.registry import register
from tests.conftest import REPO

NAME = "fracture-classifier"


@pytest.fixture()
def model_files(tmp_path):
    profile = load_params(REPO).profiles["cpu"]
    model = create_classifier(profile)
    weights = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(weights))
    config = {
        "architecture": profile.model, "profile": "cpu", "classes": ["not_fractured", "fractured"],
        "data_config": data_config(model, 64), "threshold": 0.5,
    }
    return weights, config


@pytest.fixture()
def client(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("t", artifact_location=(tmp_path / "art").as_uri()))
    return MlflowClient(uri)


def run_with_auc(auc: float) -> str:
    with mlflow.start_run() as run:
        mlflow.log_metric("test_roc_auc", auc)
    return run.info.run_id


def test_champion_moves_only_to_a_better_version(client, model_files):
    weights, config = model_files
    first = register(NAME, run_with_auc(0.80), weights, config, "test_roc_auc", client)
    assert (first.version, first.champion, first.reason) == ("1", True, "first version")

    worse = register(NAME, run_with_auc(0.75), weights, config, "test_roc_auc", client)
    assert worse.version == "2" and not worse.champion
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"

    better_run = run_with_auc(0.85)
    better = register(NAME, better_run, weights, config, "test_roc_auc", client)
    assert better.version == "3" and better.champion
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "3"

    again = register(NAME, better_run, weights, config, "test_roc_auc", client)
    assert again.version == "3" and not again.created
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 3


def test_a_run_without_the_metric_is_not_registered(client, model_files):
    weights, config = model_files
    with mlflow.start_run() as run:
        pass
    with pytest.raises(KeyError, match="evaluate"):
        register(NAME, run.info.run_id, weights, config, "test_roc_auc", client)
    assert client.search_model_versions(f"name = '{NAME}'") == []
