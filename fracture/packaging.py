"""Logs the trained model into its training run as an MLflow pyfunc that carries its own code.

The logged model holds the weights, the serving config (``model.json`` plus the decision
threshold), this package (``code_paths``, its source without ``__pycache__``) and pinned
requirements, so a consumer of ``models:/<name>@champion`` needs nothing of this project installed.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from PIL import Image

import fracture
from fracture.inference import ServingConfig
from fracture.intake import InputPolicy
from fracture.serving import SIGNATURE

#: MLflow's models-from-code entry file: it builds the :class:`fracture.serving.FracturePyfunc`.
ENTRY = Path(__file__).with_name("pyfunc_entry.py")
REQUIREMENTS = (
    "torch", "torchvision", "timm", "pillow", "pandas", "numpy", "safetensors", "mlflow",
    # DICOM input: pydicom, with decoders for JPEG (pylibjpeg-libjpeg) and JPEG-LS (pyjpegls).
    "pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pyjpegls",
)
#: What a model trained with an ablation enhancement (``prepare.enhance``) needs besides.
ENHANCE_REQUIREMENTS = {
    "clahe": ("opencv-contrib-python-headless",),
    "canny": ("opencv-contrib-python-headless",),
    "anisotropic_diffusion": ("SimpleITK",),
}


@contextlib.contextmanager
def _no_bytecode() -> Iterator[None]:
    """Within it, Python writes no ``__pycache__``. MLflow imports the model's entry file from the
    model's folder to check the input example, before the folder is uploaded: Python wrote
    ``__pycache__/pyfunc_entry.cpython-311.pyc`` beside it, and the artifact store kept bytecode of
    one interpreter with the model's source. (``code_paths`` are copied without ``__pycache__``.)"""
    before = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.dont_write_bytecode = before


def _input_example(policy: InputPolicy) -> pd.DataFrame:
    """A small synthetic greyscale image the model accepts (its sides at least ``policy.min_side``):
    the example must not carry patient data, and a consumer trying the model with it gets an answer."""
    side = min(max(policy.min_side, 64), policy.max_side)
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((side, side)).save(buf, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()]})


def requirements(config: ServingConfig) -> tuple[str, ...]:
    """The packages the served model needs: the base set plus its enhancement's library.

    Args:
        config: the serving config; its data config names the enhancement.

    Returns:
        Package names, without versions.
    """
    return REQUIREMENTS + ENHANCE_REQUIREMENTS.get(config.data_config.enhance, ())


def _pyfunc_kwargs(
    entry: Path, signature: ModelSignature, weights: Path, described: dict[str, object], packages: tuple[str, ...],
    folder: Path,
) -> dict[str, object]:
    """What ``mlflow.pyfunc.log_model`` and ``save_model`` are given: code, artifacts, signature, pins."""
    config_path = folder / "model.json"
    config_path.write_text(json.dumps(described, indent=2))
    return {
        "python_model": str(entry),
        "artifacts": {"weights": str(weights), "config": str(config_path)},
        "code_paths": [str(Path(fracture.__file__).parent)],
        "signature": signature,
        "input_example": _input_example(InputPolicy.from_dict(described.get("input"))),
        "pip_requirements": [f"{pkg}=={metadata.version(pkg)}" for pkg in packages],
    }


def _model_kwargs(weights: Path, config: ServingConfig, folder: Path) -> dict[str, object]:
    """The classifier's: :class:`fracture.serving.FracturePyfunc` with its serving config."""
    return _pyfunc_kwargs(ENTRY, SIGNATURE, weights, config.to_dict(), requirements(config), folder)


def log_pyfunc(run_id: str, weights: Path, config: ServingConfig, card: Path | None = None) -> str:
    """Logs the model with its preprocessing code into the training run.

    Args:
        run_id: the MLflow run of the train stage.
        weights: the safetensors file of the fine-tuned model.
        config: architecture, data config and decision threshold (``model.json`` plus the
            threshold the evaluate stage chose); stored as the model's ``config`` artifact.
        card: the model card of the evaluation the model is logged with, stored as its
            ``artifacts/model_card.md`` (the model's ``model_card`` artifact).

    Returns:
        The logged model's URI. The run's experiment becomes the active one.
    """
    def kwargs(folder: Path) -> dict[str, object]:
        given = _model_kwargs(weights, config, folder)
        if card is not None:
            given["artifacts"] = {**given["artifacts"], "model_card": str(card)}
        return given

    return _log_into_run(run_id, kwargs)


def _log_into_run(run_id: str, kwargs: Callable[[Path], dict[str, object]]) -> str:
    """Logs a pyfunc (``kwargs`` given a scratch folder) into an existing run; returns its URI."""
    # MLflow resumes a run only inside its own experiment, which may not be the active one.
    mlflow.set_experiment(experiment_id=MlflowClient().get_run(run_id).info.experiment_id)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id), _no_bytecode():
        info = mlflow.pyfunc.log_model(name="model", **kwargs(Path(tmp)))
    return info.model_uri


def save_pyfunc(dest: Path, weights: Path, config: ServingConfig) -> Path:
    """Saves the same model as :func:`log_pyfunc` to a folder, without a tracking server.

    For benchmarks and for serving a model outside the registry (``mlflow models serve -m <dest>``).
    """
    with tempfile.TemporaryDirectory() as tmp, _no_bytecode():
        mlflow.pyfunc.save_model(str(dest), **_model_kwargs(weights, config, Path(tmp)))
    return dest


#: The detector's models-from-code entry file (:class:`fracture.detector_serving.DetectorPyfunc`).
DETECTOR_ENTRY = Path(__file__).with_name("detector_entry.py")


def _detector_kwargs(weights: Path, described: dict[str, object], folder: Path) -> dict[str, object]:
    from fracture.detector_serving import SIGNATURE as DETECTOR_SIGNATURE

    return _pyfunc_kwargs(DETECTOR_ENTRY, DETECTOR_SIGNATURE, weights, described, REQUIREMENTS, folder)


def save_detector_pyfunc(dest: Path, weights: Path, described: dict[str, object]) -> Path:
    """Saves the fracture detector as a pyfunc folder (boxes with scores per X-ray).

    Args:
        dest: the folder to create.
        weights: the detector's safetensors file.
        described: its config (:class:`fracture.detection.DetectorConfig`'s keys), ``threshold``
            (the image-level score threshold) and ``input`` (the :class:`fracture.intake.InputPolicy`).
    """
    with tempfile.TemporaryDirectory() as tmp, _no_bytecode():
        mlflow.pyfunc.save_model(str(dest), **_detector_kwargs(weights, described, Path(tmp)))
    return dest


def log_detector_pyfunc(run_id: str, weights: Path, described: dict[str, object]) -> str:
    """Logs the fracture detector as a pyfunc into its training run (see :func:`save_detector_pyfunc`).

    Returns:
        The logged model's URI. The run's experiment becomes the active one.
    """
    return _log_into_run(run_id, lambda folder: _detector_kwargs(weights, described, folder))
