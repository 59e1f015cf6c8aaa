"""Logs the trained model as an MLflow pyfunc, registers it and moves the ``champion`` alias."""

from __future__ import annotations

import base64
import io
import json
import logging
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

import fracture
from fracture.serving import SIGNATURE

log = logging.getLogger(__name__)

CHAMPION = "champion"
ENTRY = Path(__file__).with_name("pyfunc_entry.py")
REQUIREMENTS = ("torch", "torchvision", "timm", "pillow", "pandas", "numpy", "safetensors", "mlflow")


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    run_id: str
    created: bool
    champion: bool
    metric: str
    score: float
    champion_score: float | None
    reason: str


def _input_example() -> pd.DataFrame:
    # A small synthetic greyscale image: the example must not carry patient data.
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((64, 64)).save(buf, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()]})


def log_pyfunc(run_id: str, weights: Path, config: dict[str, Any]) -> str:
    """Logs the model with its preprocessing code into the training run.

    Args:
        run_id: the MLflow run of the train stage.
        weights: the safetensors file of the fine-tuned model.
        config: architecture, data config and decision threshold (``model.json`` plus the
            threshold the evaluate stage chose).

    Returns:
        The logged model's URI.
    """
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        config_path = Path(tmp) / "model.json"
        config_path.write_text(json.dumps(config, indent=2))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(ENTRY),
            artifacts={"weights": str(weights), "config": str(config_path)},
            code_paths=[str(Path(fracture.__file__).parent)],
            signature=SIGNATURE,
            input_example=_input_example(),
            pip_requirements=[f"{pkg}=={metadata.version(pkg)}" for pkg in REQUIREMENTS],
        )
    return info.model_uri


def _run_metric(client: MlflowClient, run_id: str, metric: str) -> float:
    value = client.get_run(run_id).data.metrics.get(metric)
    if value is None:
        raise KeyError(f"run {run_id} has no metric '{metric}'; run the evaluate stage first")
    return float(value)


def register(
    name: str, run_id: str, weights: Path, config: dict[str, Any], metric: str, client: MlflowClient | None = None
) -> Registration:
    """Registers the run's model once and makes it champion when it beats the current one.

    A run that already has a version under ``name`` is not registered again. The first version
    becomes champion; later ones take the alias only with a strictly higher ``metric``.

    Args:
        name: the registered model name.
        run_id: the training run (holding the evaluation metrics).
        weights: fine-tuned weights (safetensors).
        config: the serving config (see :func:`log_pyfunc`).
        metric: the run metric that decides promotion (higher is better).
        client: an MLflow client (default: one for the current tracking URI).

    Returns:
        What was registered and whether the alias moved.
    """
    client = client or MlflowClient()
    score = _run_metric(client, run_id, metric)
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        mv = max(existing, key=lambda v: int(v.version))
        created = False
        log.info("run %s is already registered as %s version %s", run_id, name, mv.version)
    else:
        uri = log_pyfunc(run_id, weights, config)
        mv = mlflow.register_model(uri, name, tags={"run_id": run_id})
        created = True

    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    version = str(mv.version)
    if current is not None and str(current.version) == version:
        return Registration(name, version, run_id, created, True, metric, score, score, "already champion")
    champion_score = _run_metric(client, current.run_id, metric) if current is not None else None
    if champion_score is None or score > champion_score:
        client.set_registered_model_alias(name, CHAMPION, version)
        reason = "first version" if champion_score is None else f"{metric} {score:.4f} > {champion_score:.4f}"
        promoted = True
    else:
        reason = f"{metric} {score:.4f} does not beat champion's {champion_score:.4f}"
        promoted = False
    log.info("%s version %s: %s", name, version, reason)
    return Registration(name, version, run_id, created, promoted, metric, score, champion_score, reason)
