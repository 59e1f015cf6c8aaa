"""Where the page finds its model, and the model as the page uses it.

Settings come from the environment, with defaults from the project's ``params.yaml``:

- ``MLFLOW_TRACKING_URI``: the tracking server or store (default: the project's ``mlflow.db``);
- ``FRACTURE_MODEL_NAME``: the registered model (default: ``register.model_name``);
- ``FRACTURE_MODEL_ALIAS``: the alias to serve (default: ``champion``);
- ``FRACTURE_DETECTOR_NAME``: the registered fracture detector whose boxes the page draws, at the
  same alias (default: ``detect.model_name``; empty: no boxes). Without a version at that alias
  the page shows the classifier alone.

Each version the page loads is downloaded into a folder of its own under the page's folder (one
per process, under the temporary directory), removed when the page drops that version (see
:meth:`ServedModel.release`) and, with the page's folder, when the process exits.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import re
import shutil
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from fracture.config import load_params, tracking_uri
from fracture.detector_serving import DetectorPyfunc
from fracture.explain import grad_cam, overlay, to_image_grid
from fracture.inference import ServingConfig
from fracture.intake import read_xray
from fracture.registry import CHAMPION
from fracture.serving import FracturePyfunc
from fracture.vocabulary import CLASSES

ROOT = Path(__file__).resolve().parents[1]


class ModelUnavailable(RuntimeError):
    """The registry, the model or its alias cannot be reached; the message says what to do."""


@dataclass(frozen=True)
class PageSettings:
    """What the page serves (the uploads it accepts are the model's own input policy)."""

    tracking_uri: str
    model_name: str
    alias: str
    detector_name: str = ""

    @property
    def shown_uri(self) -> str:
        """The tracking URI as the page may show it: without a password or token in it."""
        parts = urlsplit(self.tracking_uri)
        if parts.password is None and parts.username is None:
            return self.tracking_uri
        host = parts.hostname or ""
        netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))


def settings_from_env(root: Path = ROOT) -> PageSettings:
    """Reads the page's settings from the environment and the project's ``params.yaml``.

    Args:
        root: the project root holding ``params.yaml`` (and the default ``mlflow.db``).

    Returns:
        The settings.
    """
    params = load_params(root)
    return PageSettings(
        tracking_uri=tracking_uri(root),
        model_name=os.environ.get("FRACTURE_MODEL_NAME") or params.register.model_name,
        alias=os.environ.get("FRACTURE_MODEL_ALIAS") or CHAMPION,
        detector_name=os.environ.get("FRACTURE_DETECTOR_NAME", params.detect.model_name),
    )


@dataclass(frozen=True)
class Prediction:
    """One X-ray's result, as the registered model returns it."""

    label: str
    fracture_probability: float
    threshold: float

    @property
    def class_index(self) -> int:
        return CLASSES.index(self.label)


class ServedModel:
    """A registered model version, loaded through MLflow's pyfunc flavour.

    ``files``: removes the folder the version was loaded from (:func:`_load_pyfunc`); ``None``
    for a pyfunc whose files are not the page's to remove.
    """

    def __init__(
        self, name: str, version: str, alias: str, run_id: str, pyfunc: mlflow.pyfunc.PyFuncModel,
        files: weakref.finalize | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.alias = alias
        self.run_id = run_id
        self.pyfunc = pyfunc
        self._files = files
        inner, kind = _python_model(pyfunc)
        if not isinstance(inner, FracturePyfunc):
            self.release()  # never served: its copy goes now, not whenever the collector gets to it
            raise ModelUnavailable(
                f"models:/{name}/{version} is a {kind}, not a fracture classifier logged by this project's "
                "register step. Point FRACTURE_MODEL_NAME and FRACTURE_MODEL_ALIAS at one, or register one with "
                "`make main`."
            )
        self._inner = inner

    def release(self) -> None:
        """Removes this version's downloaded files: the page's cache calls it when it drops the model.

        The model keeps working: its network was read into memory at load. Without a call the files
        go when the model is garbage-collected, or when the process exits.
        """
        if self._files is not None:
            self._files()

    @property
    def config(self) -> ServingConfig:
        """Architecture, data config and threshold the served model was logged with."""
        return self._inner.config

    def predict(self, model_bytes: bytes) -> Prediction:
        """Classifies one image through the pyfunc, exactly as a registry consumer would."""
        out = self.pyfunc.predict(pd.DataFrame({"image": [base64.b64encode(model_bytes).decode()]}))
        row = out.iloc[0]
        if row["error"]:
            raise ValueError(str(row["error"]))
        return Prediction(str(row["label"]), float(row["fracture_probability"]), float(row["threshold"]))

    def scored_input(self, model_bytes: bytes) -> torch.Tensor:
        """The normalised batch of one image that the network scores for these bytes: decoded as the
        pyfunc decodes a consumer's file (a JPEG at reduced scale when the model was trained that
        way), at full resolution, then resized by the model's own preprocessing."""
        xray = read_xray(model_bytes, self.config.input, self.config.data_config.draft_size)
        return self._inner.classifier.batch([xray.image])

    def heat_map(self, model_bytes: bytes, target: int, display: Image.Image) -> tuple[Image.Image, np.ndarray]:
        """Grad-CAM of class ``target`` over the pixels :meth:`predict` scored, drawn on ``display``
        (the upload at the page's display size).

        Returns:
            The overlay at ``display``'s size, and the heat map values in ``[0, 1]``. With
            ``tta: hflip`` it is the mean of the image's map and its mirror's, mirrored back, as
            the score is the mean of their probabilities.
        """
        cam = grad_cam(self._inner.classifier.network, self.scored_input(model_bytes), target, tta=self.config.tta)
        heat = to_image_grid(cam, display.size, self.config.data_config.aspect)
        return overlay(display, heat), heat


def _python_model(pyfunc: mlflow.pyfunc.PyFuncModel) -> tuple[object | None, str]:
    """The Python model a pyfunc wraps (``None`` for another flavour's model), and what it is, for a message.

    A model of another flavour (sklearn, say) has no Python model to unwrap: MLflow raises, and
    the page must say which model is wrong instead of failing whole, the classifier's answer with it.
    """
    try:
        inner = pyfunc.unwrap_python_model()
    except MlflowException:
        return None, f"{pyfunc.loader_module.removeprefix('mlflow.')}-flavour MLflow model"
    return inner, type(inner).__name__


def resolve_version(settings: PageSettings) -> tuple[str, str]:
    """The version (and its run id) the alias points to now.

    Raises:
        ModelUnavailable: the registry cannot be reached, or has no such model or alias.
    """
    if settings.tracking_uri.startswith("sqlite:///"):
        # MLflow would create an empty store; a missing file means nothing was registered yet.
        store = Path(settings.tracking_uri.removeprefix("sqlite:///"))
        if not store.is_file():
            raise ModelUnavailable(
                f"No MLflow store at {store}. Train and register a model with `make main`, or point "
                "the page at your registry with MLFLOW_TRACKING_URI."
            )
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    try:
        mv = client.get_model_version_by_alias(settings.model_name, settings.alias)
    except MlflowException as exc:
        raise ModelUnavailable(
            f"No model version '{settings.model_name}@{settings.alias}' in the registry at "
            f"{settings.shown_uri} ({exc.message.splitlines()[0]}). Train and register one with "
            "`make main`, or point the page elsewhere with MLFLOW_TRACKING_URI, FRACTURE_MODEL_NAME "
            "and FRACTURE_MODEL_ALIAS."
        ) from exc
    except Exception as exc:  # connection errors come in many types
        reason = str(exc).replace(settings.tracking_uri, settings.shown_uri)
        raise ModelUnavailable(
            f"The MLflow registry at {settings.shown_uri} cannot be reached ({reason}). Check MLFLOW_TRACKING_URI."
        ) from exc
    return str(mv.version), mv.run_id


def load_served_model(settings: PageSettings, version: str, run_id: str) -> ServedModel:
    """Loads one registered version; the caller resolves the alias first, so that the page
    shows the version it actually loaded even when the alias moves meanwhile.

    Raises:
        ModelUnavailable: the version's files cannot be loaded.
    """
    return ServedModel(settings.model_name, version, settings.alias, run_id,
                       *_load_pyfunc(settings, settings.model_name, version))


_page_folder: Path | None = None
_page_folder_lock = threading.Lock()


def page_folder() -> Path:
    """This process's folder for the versions it loads (``fracture-page-<pid>-*`` under the
    temporary directory), made on first use and removed when the process exits."""
    global _page_folder
    with _page_folder_lock:
        if _page_folder is None:
            _page_folder = Path(tempfile.mkdtemp(prefix=f"fracture-page-{os.getpid()}-"))
            atexit.register(shutil.rmtree, _page_folder, ignore_errors=True)
        # Made again if something removed it (a cleaner of old temporary files) while the page ran.
        _page_folder.mkdir(parents=True, exist_ok=True)
        return _page_folder


def _load_pyfunc(
    settings: PageSettings, name: str, version: str
) -> tuple[mlflow.pyfunc.PyFuncModel, weakref.finalize]:
    """``models:/<name>/<version>`` from the page's registry, loaded from a folder of the page's own.

    From a tracking server (or any artifact store MLflow downloads from), MLflow would download
    the version into a temporary folder it never removes: a copy (tens of MB) left on the disk for
    every version the page loads, for as long as the page runs and after. Loaded here into a
    folder of its own under :func:`page_folder`, the copy lives as long as the model: the returned
    finalizer removes it when called (:meth:`ServedModel.release`, when the page's cache drops
    the model), when the pyfunc is garbage-collected, or at exit. Not sooner: the project's
    pyfuncs read their files whole at load, but a model still served keeps what it was loaded
    from (its packaged code stays on ``sys.path``, and a pyfunc may open its files later).
    A local store's versions are copied too (MLflow would load them in place; given a folder, it
    copies), so that every version the page serves is one it owns.

    Returns:
        The pyfunc, and the finalizer that removes its files.

    Raises:
        ModelUnavailable: its files cannot be loaded.
    """
    mlflow.set_tracking_uri(settings.tracking_uri)
    uri = f"models:/{name}/{version}"
    folder = None
    try:
        # Named after the version, for an operator looking at the disk: registered names may hold any character.
        folder = tempfile.mkdtemp(prefix=f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}-v{version}-", dir=page_folder())
        pyfunc = mlflow.pyfunc.load_model(uri, dst_path=folder)
    except Exception as exc:  # artifact stores fail in many ways; the page must say so, not crash
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise ModelUnavailable(f"{uri} could not be loaded from {settings.shown_uri}: {exc}") from exc
    return pyfunc, weakref.finalize(pyfunc, shutil.rmtree, folder, ignore_errors=True)


@dataclass(frozen=True)
class FoundBoxes:
    """The detector's answer for one X-ray, as the registered detector returns it.

    Attributes:
        boxes: ``(n, 5)``: ``x0, y0, x1, y1, score`` in the upload's pixels, each scored at least
            ``threshold``, highest first.
        fracture_score: the top box's score (0 without a box).
        threshold: the detector's image-level threshold, chosen on its val split.
    """

    boxes: np.ndarray
    fracture_score: float
    threshold: float


class ServedDetector:
    """A registered fracture detector version, loaded through MLflow's pyfunc flavour.

    ``files``: as :class:`ServedModel`'s.
    """

    def __init__(
        self, name: str, version: str, run_id: str, pyfunc: mlflow.pyfunc.PyFuncModel,
        files: weakref.finalize | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.run_id = run_id
        self.pyfunc = pyfunc
        self._files = files
        inner, kind = _python_model(pyfunc)
        if not isinstance(inner, DetectorPyfunc):
            self.release()
            raise ModelUnavailable(
                f"models:/{name}/{version} is a {kind}, not a fracture detector logged by this project's "
                "detect-register step. Point FRACTURE_DETECTOR_NAME at one, or set it empty for no boxes."
            )
        self.architecture = f"{inner.config.architecture} on {inner.config.backbone}"

    def release(self) -> None:
        """Removes this version's downloaded files, as :meth:`ServedModel.release`."""
        if self._files is not None:
            self._files()

    def find(self, model_bytes: bytes) -> FoundBoxes:
        """The boxes on one image through the pyfunc, exactly as a registry consumer gets them."""
        out = self.pyfunc.predict(pd.DataFrame({"image": [base64.b64encode(model_bytes).decode()]}))
        row = out.iloc[0]
        if row["error"]:
            raise ValueError(str(row["error"]))
        boxes = np.array(json.loads(row["boxes"]), dtype=np.float64).reshape(-1, 5)
        return FoundBoxes(boxes, float(row["fracture_score"]), float(row["threshold"]))


def resolve_detector(settings: PageSettings) -> tuple[str, str] | None:
    """The detector version at the page's alias, or ``None`` when no detector is registered there.

    Raises:
        ModelUnavailable: the registry failed otherwise (the page then shows the classifier alone).
    """
    if not settings.detector_name:
        return None
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    try:
        mv = client.get_model_version_by_alias(settings.detector_name, settings.alias)
    except MlflowException as exc:
        if exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            return None
        raise ModelUnavailable(
            f"The fracture detector '{settings.detector_name}@{settings.alias}' could not be looked up at "
            f"{settings.shown_uri}: {exc.message.splitlines()[0]}"
        ) from exc
    return str(mv.version), mv.run_id


def load_served_detector(settings: PageSettings, version: str, run_id: str) -> ServedDetector:
    """Loads one registered detector version (``run_id``: the run :func:`resolve_detector` found it logged by).

    Raises:
        ModelUnavailable: its files cannot be loaded, or it is no fracture detector.
    """
    return ServedDetector(settings.detector_name, version, run_id,
                          *_load_pyfunc(settings, settings.detector_name, version))
