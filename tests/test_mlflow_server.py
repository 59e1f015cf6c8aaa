"""Registration through a real `mlflow server` (sqlite backend, proxied local artifacts, 127.0.0.1).

The fast test registers a real model through ``MLFLOW_TRACKING_URI=http://127.0.0.1:<port>``;
the slow one runs the whole retrain flow against the server. In both, a consumer in a separate
process loads ``models:/<name>@champion`` from the server and predicts a real X-ray.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from fracture.config import RegisterParams
from fracture.decoding import open_xray
from fracture.gate import EvaluatedSplit
from fracture.inference import Classifier
from fracture.registry import register
from tests.conftest import shrink_params, untrained_model_files
from tests.servers import child_env, running_mlflow_server
from tests.test_serving import xray_paths

pytestmark = pytest.mark.integration

NAME = "fracture-classifier"

CONSUMER = """
import base64, json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/fracture-classifier@champion")
images = [base64.b64encode(open(p, "rb").read()).decode() for p in sys.argv[1:]]
print(json.dumps(model.predict(pd.DataFrame({"image": images})).to_dict(orient="list")))
"""


@pytest.fixture()
def tracking_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`mlflow server` on a free loopback port; yields its URL and artifact folder."""
    with running_mlflow_server(tmp_path) as server:
        yield server


def consume(url: str, cwd: Path, images: list[Path]) -> dict[str, list]:
    """Loads ``@champion`` from the server in a separate Python process and predicts ``images``."""
    proc = subprocess.run(
        [sys.executable, "-c", CONSUMER, *map(str, images)],
        cwd=cwd, env=child_env(MLFLOW_TRACKING_URI=url), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_register_through_the_server_and_consume_champion_elsewhere(tracking_server, tmp_path, monkeypatch):
    url, artifacts = tracking_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    mlflow.set_tracking_uri(url)
    mlflow.set_experiment("fracture-classification")
    images = xray_paths()
    temp = tmp_path / "temp"  # this process's and its children's temporary folder, watched below
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))

    weights, config = untrained_model_files(tmp_path, 0.5)
    with mlflow.start_run(tags={"data_version": "d" * 32 + ".dir", "git_commit": "c0ffee"}) as run:
        mlflow.log_metrics({"test_roc_auc": 0.9, "test_recall": 0.9})
    params = RegisterParams(NAME, "fracture-classification", floors={"test_recall": 0.8})
    reg = register(params, run.info.run_id, weights, config, EvaluatedSplit("s" * 64, 1, images[0]), MlflowClient(url))
    assert (reg.version, reg.decision, reg.champion) == ("1", "promoted", True)
    assert reg.checks[-1].name == "load check" and reg.checks[-1].passed

    # The model's files went through the server into its artifact folder, not onto this process's disk.
    stored = {p.name for p in files_under(artifacts)}
    assert {"MLmodel", "model.safetensors", "model.json", "pyfunc_entry.py"} <= stored
    assert MlflowClient(url).get_model_version_by_alias(NAME, "champion").tags["git_commit"] == "c0ffee"

    # The gate scored and load-checked the version in consumers' Pythons and this one, and left no copy of it.
    assert list(temp.iterdir()) == []

    out = consume(url, tmp_path, images)
    # The same numbers as the project's own weights and config give in this process.
    direct = Classifier.load(weights, config).probabilities([open_xray(p) for p in images]).tolist()
    assert out["fracture_probability"] == pytest.approx(direct, abs=1e-6)
    assert out["label"] == ["fractured" if p >= 0.5 else "not_fractured" for p in direct]
    assert out["threshold"] == [0.5, 0.5]


@pytest.mark.slow
def test_the_flow_registers_through_the_server(project, subset_source, tracking_server, monkeypatch):
    """The whole retrain flow (real DVC, Prefect, a tiny profile) with MLflow behind the server."""
    from flows.retrain import retrain

    url, artifacts = tracking_server
    # A one-epoch model at 64 px cannot reach the product's floors; the gate's other rules still apply.
    shrink_params(project, register__floors={})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)

    result = retrain(project_dir=str(project), source=str(subset_source))

    reg = result.registration
    assert (reg.version, reg.created, reg.decision, reg.champion) == ("1", True, "promoted", True)
    assert [c.name for c in reg.checks] == ["beats champion", "load check"] and all(c.passed for c in reg.checks)
    assert not (project / "mlflow.db").exists()  # everything went to the server
    client = MlflowClient(url)
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.run_id == result.train.run_id
    test_ids = pd.read_csv(project / "outputs/split/test.csv", dtype={"image_id": str})
    assert champion.tags["split_fingerprint"] == reg.split_fingerprint and len(test_ids) == result.split.sizes["test"]
    assert champion.tags["data_version"] == result.ingest.data_version
    metrics = json.loads((project / "outputs/evaluate/metrics.json").read_text())
    assert float(champion.tags["threshold"]) == metrics["threshold"]
    assert "model.safetensors" in {p.name for p in files_under(artifacts)}

    images = xray_paths()
    out = consume(url, project.parent, images)
    assert out["threshold"] == [metrics["threshold"]] * 2
    assert all(0.0 <= p <= 1.0 for p in out["fracture_probability"])
