"""The MLflow pyfunc model that consumers load from the registry.

Input: a DataFrame with a column ``image`` (the image file's bytes, or their base64 text as a JSON
request carries them) or ``path`` (a file path readable by the model's process); one of the two
per row.
Output: a DataFrame with ``fracture_probability``, ``label`` and ``threshold`` per row.

It scores through the one inference path (:mod:`fracture.inference`). This package travels
inside the logged model (``code_paths``), so a consumer needs nothing of this project installed.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image

from fracture.imaging import ImageLoadError, open_xray
from fracture.inference import Classifier, ServingConfig

INPUT_SCHEMA = Schema(
    [ColSpec("string", "image", required=False), ColSpec("string", "path", required=False)]
)
OUTPUT_SCHEMA = Schema(
    [
        ColSpec("double", "fracture_probability"),
        ColSpec("string", "label"),
        ColSpec("double", "threshold"),
    ]
)
SIGNATURE = ModelSignature(inputs=INPUT_SCHEMA, outputs=OUTPUT_SCHEMA)
#: Rows decoded and scored together; bounds the memory a large request needs.
BATCH_SIZE = 32


def read_row(i: int, row: pd.Series) -> Image.Image:
    """Decodes one input row: ``image`` (bytes, or base64 text) or ``path``, exactly one of them.

    Raises:
        ValueError: the row gives neither or both, or its image does not decode; the message
            names the row and what to send instead.
    """
    image = row.get("image")
    path = row.get("path")
    has_image = isinstance(image, (str, bytes, bytearray)) and len(image) > 0
    has_path = isinstance(path, str) and path != ""
    if has_image == has_path:
        raise ValueError(f"row {i}: give exactly one of 'image' (file bytes, or base64 text) or 'path' (a file path)")
    try:
        if not has_image:
            source: str | bytes = path
        elif isinstance(image, str):
            source = base64.b64decode(image, validate=True)
        else:
            source = bytes(image)
        return open_xray(source, allow_truncated=False)
    except binascii.Error as exc:
        raise ValueError(f"row {i}: 'image' is not base64 text ({exc}); send the file's bytes base64-encoded") from exc
    except ImageLoadError as exc:
        raise ValueError(f"row {i}: {exc}") from exc


class FracturePyfunc(mlflow.pyfunc.PythonModel):
    """Fracture classifier with its preprocessing, as logged to the MLflow registry.

    Attributes:
        classifier: the network, its preprocessing and threshold (:class:`fracture.inference.Classifier`),
            for consumers that need more than :meth:`predict`, such as a heat map on the page.
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        with open(context.artifacts["config"]) as fh:
            config = ServingConfig.from_dict(json.load(fh))
        self.classifier = Classifier.load(context.artifacts["weights"], config)

    @property
    def config(self) -> ServingConfig:
        """Architecture, data config and threshold the model was logged with."""
        return self.classifier.config

    def predict_images(self, images: list[Image.Image]) -> pd.DataFrame:
        """Scores decoded images: ``fracture_probability``, ``label`` and ``threshold`` per image."""
        probs = self.classifier.probabilities(images, BATCH_SIZE).astype(np.float64)
        labels = self.classifier.labels(probs)
        return pd.DataFrame({"fracture_probability": probs, "label": labels, "threshold": self.classifier.threshold})

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        if not {"image", "path"} & set(frame.columns):
            raise ValueError("input needs a column 'image' (base64 file bytes) or 'path'")
        rows = frame.reset_index(drop=True)
        # Decoded a batch at a time, so a large request never holds every full-size X-ray at once.
        parts = [
            self.predict_images([read_row(i, row) for i, row in rows.iloc[start : start + BATCH_SIZE].iterrows()])
            for start in range(0, len(rows), BATCH_SIZE)
        ]
        if not parts:
            return self.predict_images([])
        return pd.concat(parts, ignore_index=True)
