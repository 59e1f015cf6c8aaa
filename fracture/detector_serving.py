"""The MLflow pyfunc of the fracture detector: boxes with scores per X-ray.

Input: the classifier's (:mod:`fracture.serving`): a DataFrame with ``image`` (bytes or base64
text) or ``path`` per row, JPEG, PNG or DICOM, through the same input checks
(:mod:`fracture.intake`) and the same ``on_error`` parameter.

Output: one row per input row, in order:

- ``boxes``: JSON text, a list of ``[x0, y0, x1, y1, score]`` in the file's own pixels (a JPEG's
  or PNG's upright image, EXIF orientation applied; a DICOM's stored Columns x Rows grid, also
  when its pixels are not square and were resampled to square ones for the detector), highest
  score first, holding every box scored at least ``threshold`` (``"[]"`` for none, and
  for a row that was not scored); the request parameter ``min_score`` lowers or raises that
  bound (``min_score: 0`` returns every box the detector keeps, as mAP is computed on them);
- ``fracture_score``: the top box's score, the detector's image-level answer (0 without a box;
  NaN when the row was not scored);
- ``label``: ``fractured`` when ``fracture_score >= threshold``, else ``not_fractured`` (empty
  when not scored); ``threshold``: chosen on the val split to reach the classifier's target
  sensitivity;
- ``error`` and ``note``: as the classifier's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from safetensors.torch import load_file

from fracture.detection import (
    DetectorConfig,
    build_detector,
    detector_input,
    fracture_boxes,
)
from fracture.intake import InputPolicy
from fracture.serving import (
    INPUT_SCHEMA,
    RequestRefused,
    RowRefused,
    _in_scoring_server,
    check_request,
    input_root,
    on_input_index,
    read_row,
)
from fracture.vocabulary import CLASSES

log = logging.getLogger(__name__)

#: The classifier's ``on_error``, and the lowest box score returned (default: the threshold).
PARAMS_SCHEMA = ParamSchema([ParamSpec("on_error", "string", "report"), ParamSpec("min_score", "double", None)])
OUTPUT_COLUMNS = ("boxes", "fracture_score", "label", "threshold", "error", "note")
SIGNATURE = ModelSignature(
    inputs=INPUT_SCHEMA,
    outputs=Schema([
        ColSpec("string", "boxes"),
        ColSpec("double", "fracture_score"),
        ColSpec("string", "label"),
        ColSpec("double", "threshold"),
        ColSpec("string", "error"),
        ColSpec("string", "note"),
    ]),
    params=PARAMS_SCHEMA,
)


class DetectorPyfunc(mlflow.pyfunc.PythonModel):
    """The fracture detector with its preprocessing and input checks, as logged to the registry.

    Attributes:
        config: the detector's architecture and sizes.
        threshold: the image-level (and box) score threshold.
        policy: the input checks, the classifier's own.
        network: the torchvision detector, in eval mode.
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        described = json.loads(Path(context.artifacts["config"]).read_text())
        self.config = DetectorConfig.from_dict(described)
        self.threshold = float(described["threshold"])
        self.policy = InputPolicy.from_dict(described.get("input"))
        network = build_detector(self.config)
        network.load_state_dict(load_file(context.artifacts["weights"]))
        self.network = network.eval()
        self.root = input_root()

    def _boxes(self, image: Any) -> np.ndarray:
        """``(n, 5)``: boxes in the image's pixels with their scores, highest first."""
        tensor, scale = detector_input(image, self.config.image_size)
        boxes, scores = fracture_boxes(self.network, tensor)
        boxes = boxes / scale
        order = np.argsort(-scores, kind="stable")
        return np.column_stack([boxes[order], scores[order]]) if len(order) else np.zeros((0, 5))

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        on_error, frame = check_request(model_input, params, self.policy)
        min_score = (params or {}).get("min_score")
        if min_score is None:
            min_score = self.threshold
        elif isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not 0 <= min_score <= 1:
            raise RequestRefused(f"parameter min_score must be a number in [0, 1]; got {min_score!r}")
        rows = []
        for i, row in frame.iterrows():
            try:
                xray = read_row(int(i), row, self.root, self.policy)
            except RowRefused as exc:
                if on_error == "raise":
                    raise RequestRefused(str(exc)) from None
                rows.append({"boxes": "[]", "fracture_score": np.nan, "label": "", "error": str(exc), "note": ""})
                continue
            found = self._boxes(xray.image)
            note = list(xray.warnings)
            stored = xray.stored_size
            if stored is not None and stored != xray.image.size:
                # The network saw the DICOM resampled to square pixels; an overlay, or a DICOM SR or
                # GSPS coordinate, uses the file's own grid.
                found[:, :4] *= np.array(xray.to_stored() * 2)
                note.append(f"boxes are in its stored {stored[0]} x {stored[1]} px")
            top = float(found[0, 4]) if len(found) else 0.0
            shown = found[found[:, 4] >= min_score]
            rows.append({
                # Scores in full: rounded, one just at the threshold (the threshold is one val image's
                # score) was listed below it, against the served rule and the gate's load check.
                "boxes": json.dumps([[round(float(v), 2) for v in b[:4]] + [float(b[4])] for b in shown]),
                "fracture_score": top,
                "label": CLASSES[1] if top >= self.threshold else CLASSES[0],
                "error": "",
                "note": "; ".join(note),
            })
        out = pd.DataFrame(rows, columns=[c for c in OUTPUT_COLUMNS if c != "threshold"])
        out.insert(3, "threshold", self.threshold)
        if _in_scoring_server() and out["error"].ne("").any():
            # As the classifier's: an unscored row's score is null over HTTP, not a bare NaN.
            out["fracture_score"] = out["fracture_score"].astype(object).where(out["error"].eq(""), None)
        return on_input_index(out, model_input)
