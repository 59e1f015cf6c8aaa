"""A registered version scored as a consumer would score it, for the promotion gate.

:func:`load_check` loads ``models:/<name>/<version>`` and predicts one real image before any
alias moves; :func:`rescore` scores a champion evaluated on another split or data version on
the candidate's test split, through the one inference path, so the gate compares the two on the
same images.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from fracture.config import RegisterParams
from fracture.evaluation import evaluate_probabilities
from fracture.gate import EvaluatedSplit, Evaluation, GateCheck, SplitTableError
from fracture.imaging import open_xray
from fracture.serving import FracturePyfunc


def load_check(name: str, version: str, image: Path, threshold: float) -> GateCheck:
    """Loads ``models:/<name>/<version>`` as a consumer would and predicts one real image.

    Args:
        name: the registered model name.
        version: the version to load.
        image: a real X-ray file.
        threshold: the decision threshold the model must report.

    Returns:
        A passed check naming the prediction, or a failed one naming what went wrong.
    """
    uri = f"models:/{name}/{version}"
    try:
        model = mlflow.pyfunc.load_model(uri)
        out = model.predict(pd.DataFrame({"path": [str(image)]}))
        prob = float(out["fracture_probability"].iloc[0])
        problems = []
        if len(out) != 1:
            problems.append(f"{len(out)} rows for one image")
        if not (math.isfinite(prob) and 0.0 <= prob <= 1.0):
            problems.append(f"fracture_probability {prob} outside [0, 1]")
        if not math.isclose(float(out["threshold"].iloc[0]), threshold):
            problems.append(f"threshold {out['threshold'].iloc[0]} instead of {threshold}")
        expected = "fractured" if prob >= threshold else "not_fractured"
        if out["label"].iloc[0] != expected:
            problems.append(f"label {out['label'].iloc[0]!r} for probability {prob:.4f}")
    except Exception as exc:  # noqa: BLE001 - any failure to load or predict keeps the alias where it is
        return GateCheck("load check", False, f"{uri} failed on {image.name}: {type(exc).__name__}: {exc}")
    if problems:
        return GateCheck("load check", False, f"{uri} on {image.name}: {'; '.join(problems)}")
    return GateCheck("load check", True, f"{uri} predicted {image.name}: fracture_probability {prob:.4f}")


def rescore(name: str, version: str, split: EvaluatedSplit, batch_size: int = 32) -> dict[str, float]:
    """Scores a registered version on ``split`` at its own threshold, as the evaluate stage would.

    The version is loaded through ``models:/<name>/<version>`` and scores through its own
    classifier, with the preprocessing it was logged with; images are decoded as the evaluate
    stage decodes them (files that end early are kept when ``split.allow_truncated``).

    Args:
        name: the registered model name.
        version: the version to score.
        split: the test split, with every image path and label.
        batch_size: images decoded and scored together; bounds the memory full-size X-rays take.

    Returns:
        ``test_*`` metrics (ROC AUC, recall, specificity, ...) named as the evaluate stage logs them.

    Raises:
        SplitTableError: the split carries no images to score, or rows without an image path.
        TypeError: the version is no fracture classifier.
    """
    if not split.paths:
        raise SplitTableError("the test split carries no image paths to score the champion on")
    if len(split.paths) != split.images:
        raise SplitTableError(
            f"{split.images - len(split.paths)} of the test split's {split.images} rows have no image path; "
            "rebuild it with `dvc repro split`"
        )
    uri = f"models:/{name}/{version}"
    served = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    if not isinstance(served, FracturePyfunc):
        raise TypeError(f"{uri} is a {type(served).__name__}, not a model logged by fracture.packaging")
    classifier = served.classifier
    probs = []
    # Decoded a batch at a time, so the split's full-size X-rays are never all in memory at once.
    for start in range(0, len(split.paths), batch_size):
        chunk = split.paths[start : start + batch_size]
        images = [open_xray(p, allow_truncated=split.allow_truncated) for p in chunk]
        probs.append(classifier.probabilities(images, batch_size))
    # float64 as the evaluate stage compares them with the threshold.
    scores = np.concatenate(probs).astype(np.float64)
    result = evaluate_probabilities(np.array(split.labels), scores, float(classifier.threshold))
    return {f"test_{k}": float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}


def rescored(
    params: RegisterParams, champion: Evaluation, candidate: Evaluation, split: EvaluatedSplit
) -> tuple[Evaluation, GateCheck]:
    """The champion's evaluation on the candidate's split and data version, and the check saying how it went.

    A champion that cannot be scored keeps its recorded evaluation and the check fails, so the
    gate does not compare the two.
    """
    v = champion.version
    try:
        metrics = rescore(params.model_name, str(v), split)
    except Exception as exc:  # noqa: BLE001 - a champion that cannot be scored is not compared
        return champion, GateCheck(
            "champion re-scored", False, f"champion v{v} could not be scored on this split: {type(exc).__name__}: {exc}"
        )
    recorded = champion.metrics.get(params.metric)
    was = f" (recorded {recorded:.4f} on its own split)" if recorded is not None else ""
    detail = (
        f"champion v{v} was evaluated on another split or data version; scored on this one "
        f"({split.images} images): {params.metric} {metrics.get(params.metric, float('nan')):.4f}{was}"
    )
    rescored = Evaluation(champion.version, metrics, candidate.split_fingerprint, candidate.data_version)
    return rescored, GateCheck("champion re-scored", True, detail)
