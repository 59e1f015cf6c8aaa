"""The register stage: the trained model into the MLflow registry, champion only through the gate.

Also the way back: :func:`run_rollback` returns ``champion`` to the version it replaced, or
makes a version chosen by hand champion.
"""

from __future__ import annotations

from fracture.config import Params
from fracture.gate import EvaluatedSplit
from fracture.intake import InputPolicy
from fracture.registry import (
    DETECTOR_ROLLBACK_COMMAND,
    ROLLBACK_COMMAND,
    Registration,
    Rollback,
    register,
    rollback,
)
from fracture.tracking import setup_mlflow
from fracture.workspace import Workspace


def input_policy(params: Params) -> InputPolicy:
    """The served model's input checks: ``serve``, with the side bounds and truncated-file policy
    the pipeline trained with (``validate``), so the model scores what it was trained on."""
    s, v = params.serve, params.validate
    return InputPolicy(
        min_side=v.min_side,
        max_side=v.max_side,
        max_pixels=s.max_megapixels * 1_000_000,
        max_bytes=s.max_file_mb * 2**20,
        min_grey_std=float(s.min_grey_std),
        truncated="score" if v.on_truncated == "keep" else "refuse",
        modalities=tuple(s.modalities),
        max_rows=s.max_rows,
        body_parts=None if s.body_parts is None else tuple(s.body_parts),
    )


def run_register(params: Params, workspace: Workspace) -> Registration:
    """Registers the train stage's model and runs the promotion gate on the evaluate stage's test split.

    Args:
        params: ``register`` names the model and the gate; ``ingest.dest`` locates the images;
            ``validate.on_truncated`` says whether files that end early are scored; ``serve``
            and ``validate`` give the served model's input checks (:func:`input_policy`).
        workspace: the project, after the train, split and evaluate stages.

    Returns:
        The version, the gate's decision and each check.

    Raises:
        FileNotFoundError: a stage's output is missing; the message names the stage to run.
        fracture.registry.RegistryError: the run lacks a metric the gate needs.
        fracture.gate.SplitTableError: the test split table lacks a column, an image path or a
            label; the message names the table and the rows.
    """
    # Every stage output is read first, so a missing one fails before the tracking store is touched.
    run_id = workspace.read_train().run_id
    config = workspace.serving_config(input_policy(params))
    split = EvaluatedSplit.from_csv(
        workspace.split_table("test"),
        workspace.root / params.ingest.dest,
        params.validate.on_truncated == "keep",
    )
    setup_mlflow(params, workspace.root)
    return register(params.register, run_id, workspace.weights, config, split)


def run_rollback(
    params: Params, workspace: Workspace, reason: str = "", to: int | None = None, detector: bool = False,
) -> Rollback:
    """Moves ``champion`` back to the ``previous-champion`` version, or to version ``to``.

    Args:
        params: ``register.model_name`` names the registered model (``detect.model_name`` with
            ``detector``).
        workspace: the project (its MLflow store, unless ``MLFLOW_TRACKING_URI`` names another).
        reason: why, for the registry's record.
        to: the version to make champion, chosen by hand (default: ``previous-champion``).
        detector: act on the fracture detector's registered model instead of the classifier's:
            the same rollback, load check (the version loaded in a consumer's Python), tags and
            history, so that a later ``fracture detect-register`` does not promote the demoted
            version's run again.

    Returns:
        Which version was demoted and where the aliases point now.

    Raises:
        fracture.registry.RegistryError: there is no champion, or no previous champion to return
            to; version ``to`` does not exist or already is champion; the version does not load.
            For the detector, each command the message suggests is ``fracture rollback --detector``,
            so that the command copied from it does not act on the classifier.
    """
    setup_mlflow(params, workspace.root)
    if not detector:
        return rollback(params.register.model_name, reason=reason, to=to, command=ROLLBACK_COMMAND)
    return rollback(params.detect.model_name, reason=reason, to=to, command=DETECTOR_ROLLBACK_COMMAND)
