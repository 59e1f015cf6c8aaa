"""The MLflow pyfunc model that consumers load from the registry.

Input: a DataFrame with a column ``image`` (the image file's bytes, or their base64 text as a JSON
request carries them) or ``path`` (a file path readable by the model's process); one of the two
per row.
Output: a DataFrame with ``fracture_probability``, ``label`` and ``threshold`` per row.

Only third-party packages and :mod:`fracture.imaging` are imported, and both travel inside the
logged model (``code_paths``), so a consumer needs nothing of this project installed.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import timm
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from safetensors.torch import load_file

from fracture.imaging import CLASSES, ImageLoadError, build_transform, open_xray

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


def load_classifier(weights_path: str, config: dict[str, Any]) -> torch.nn.Module:
    """Builds the timm architecture named in ``config`` and loads fine-tuned weights into it.

    Args:
        weights_path: a safetensors file of the model's state dict.
        config: the ``model.json`` written by the train stage.

    Returns:
        The model in eval mode on the CPU.
    """
    model = timm.create_model(config["architecture"], pretrained=False, num_classes=len(CLASSES))
    model.load_state_dict(load_file(weights_path))
    return model.eval()


class FracturePyfunc(mlflow.pyfunc.PythonModel):
    """Fracture classifier with its preprocessing, as logged to the MLflow registry."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        with open(context.artifacts["config"]) as fh:
            self.config: dict[str, Any] = json.load(fh)
        self.model = load_classifier(context.artifacts["weights"], self.config)
        self.transform = build_transform(self.config["data_config"])
        self.threshold = float(self.config["threshold"])

    def _read_row(self, i: int, row: pd.Series) -> torch.Tensor:
        image = row.get("image")
        path = row.get("path")
        has_image = isinstance(image, (str, bytes, bytearray)) and len(image) > 0
        has_path = isinstance(path, str) and path != ""
        if has_image == has_path:
            raise ValueError(
                f"row {i}: give exactly one of 'image' (file bytes, or base64 text) or 'path' (a file path)"
            )
        try:
            if not has_image:
                source: str | bytes = path
            elif isinstance(image, str):
                source = base64.b64decode(image, validate=True)
            else:
                source = bytes(image)
            return self.transform(open_xray(source, allow_truncated=False))
        except binascii.Error as exc:
            raise ValueError(
                f"row {i}: 'image' is not base64 text ({exc}); send the file's bytes base64-encoded"
            ) from exc
        except ImageLoadError as exc:
            raise ValueError(f"row {i}: {exc}") from exc

    @torch.inference_mode()
    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        if not {"image", "path"} & set(frame.columns):
            raise ValueError("input needs a column 'image' (base64 file bytes) or 'path'")
        if frame.empty:
            return pd.DataFrame(
                {"fracture_probability": pd.Series(dtype="float64"), "label": pd.Series(dtype=object),
                 "threshold": pd.Series(dtype="float64")}
            )
        batch = torch.stack([self._read_row(i, row) for i, row in frame.reset_index(drop=True).iterrows()])
        probs = self.model(batch).softmax(dim=-1)[:, 1].double().numpy()
        labels = np.where(probs >= self.threshold, CLASSES[1], CLASSES[0])
        return pd.DataFrame(
            {"fracture_probability": probs, "label": labels, "threshold": self.threshold}
        )
