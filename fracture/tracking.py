"""The MLflow tracking store a stage logs to: the URI and the experiment."""

from __future__ import annotations

from pathlib import Path

import mlflow

from fracture.config import Params, artifact_location, tracking_uri


def setup_mlflow(params: Params, root: Path = Path(".")) -> None:
    """Points MLflow at the tracking URI and makes sure the experiment exists.

    Args:
        params: names the experiment.
        root: the project directory, where the default sqlite store and artifacts live.
    """
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(params.register.experiment) is None:
        location = artifact_location(root) if uri.startswith("sqlite:") else None
        mlflow.create_experiment(params.register.experiment, artifact_location=location)
    mlflow.set_experiment(params.register.experiment)
