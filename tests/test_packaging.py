"""How the model is packaged for the registry: what a logged model's artifacts hold."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow

from fracture.packaging import log_pyfunc, save_pyfunc
from tests.conftest import untrained_model_files


def artifact_paths(uri: str, path: str = "") -> list[str]:
    """Every file under ``uri`` as the artifact store lists it, relative to ``uri``."""
    found = []
    for info in mlflow.artifacts.list_artifacts(artifact_uri=f"{uri}/{path}" if path else uri):
        name = f"{path}/{Path(info.path).name}" if path else Path(info.path).name
        found.extend(artifact_paths(uri, name) if info.is_dir else [name])
    return found


def test_a_logged_model_holds_source_and_no_bytecode(client, tmp_path, monkeypatch):
    """MLflow imports the model's entry file from the model's folder to check the input example, and
    Python wrote ``__pycache__/pyfunc_entry.cpython-311.pyc`` there, which went to the artifact store
    with the model (as it runs without ``PYTHONDONTWRITEBYTECODE``, as a scheduled retrain does)."""
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    weights, config = untrained_model_files(tmp_path, 0.5)
    with mlflow.start_run() as run:
        pass
    model_uri = log_pyfunc(run.info.run_id, weights, config)
    logged = artifact_paths(mlflow.get_logged_model(model_uri.removeprefix("models:/")).artifact_location)
    assert "pyfunc_entry.py" in logged and "code/fracture/serving.py" in logged, logged
    assert [p for p in logged if "__pycache__" in p or p.endswith((".pyc", ".pyo"))] == []
    assert sys.dont_write_bytecode is False  # the process's own setting is left as it was
    saved = save_pyfunc(tmp_path / "saved", weights, config)  # a folder for `mlflow models serve -m`
    assert [p for p in saved.rglob("*") if p.name == "__pycache__" or p.suffix == ".pyc"] == []
