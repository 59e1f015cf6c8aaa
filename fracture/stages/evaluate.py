"""The evaluate stage: the decision threshold on val, then the test split, scored once.

Writes the metrics with their intervals (ROC AUC's bootstrap over the test split's groups of
linked images, sensitivity's and specificity's Wilson over the effective number of images),
calibration, per-body-part metrics, where the page's heat map points on the fractured test
images' boxes (:mod:`fracture.localisation`), DVC plot tables, PNG plots and the model card, and
logs them to the training run in MLflow.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from fracture.config import Params
from fracture.decoding import shown_size
from fracture.dicom import is_dicom
from fracture.evaluation import (
    Calibration,
    Evaluation,
    by_group,
    calibration,
    confidence_intervals,
    evaluate_probabilities,
    operating_threshold,
)
from fracture.explain import grad_cam, to_image_grid
from fracture.fingerprints import split_fingerprint
from fracture.imaging import CLASSES, Preprocessor
from fracture.inference import load_network, probabilities
from fracture.localisation import (
    COLUMNS,
    ImageBoxes,
    Localisation,
    read_coco_boxes,
    score_heat_maps,
)
from fracture.manifest import body_part
from fracture.model_card import dataset_name, render_model_card
from fracture.plots import save_evaluation_plots
from fracture.prepare import PreparedImages
from fracture.recipe import cycle_epochs, learning_rate
from fracture.split import split_groups
from fracture.stages.prepare import open_cache
from fracture.tracking import setup_mlflow, training_run
from fracture.vocabulary import Aspect, Tta
from fracture.workspace import EvaluateResult, SplitResult, TrainResult, Workspace


def _recipe(params: Params, profile_name: str) -> dict[str, object]:
    """The training settings that define the recipe, as the model card quotes them."""
    profile, train = params.profiles[profile_name], params.train
    return {
        "weights": f"ImageNet ({profile.weights})",
        "loss": "cross-entropy" + (f", label smoothing {profile.label_smoothing}" if profile.label_smoothing else ""),
        "optimiser": f"Adam, lr {learning_rate(profile, train)}, weight decay {train.weight_decay}",
        "scheduler": f"CosineAnnealingWarmRestarts, T_0 {cycle_epochs(profile, train)}, T_mult {train.t_mult}",
        "batch size": train.batch_size,
        "class balance": train.class_balance,
        "epochs": profile.epochs,
        "augmentation": profile.augment,
        "test-time augmentation": profile.tta,
        "frozen layers": ", ".join(profile.frozen) or "none",
        # Each changes the model when set; the card says so, so two recipes never read alike.
        "dropout / stochastic depth": f"{profile.drop_rate} / {profile.drop_path_rate}",
        "weights averaged (EMA decay)": profile.ema_decay or "no",
        "layer-wise learning-rate decay": profile.layer_decay if profile.layer_decay != 1 else "no",
        "seed": train.seed,
    }


def _threshold_source(params: Params) -> str:
    ev = params.evaluate
    if ev.target_sensitivity is None:
        return f"fixed at evaluate.threshold {ev.threshold}"
    return f"the highest threshold reaching sensitivity {ev.target_sensitivity} on the validation split"


log = logging.getLogger(__name__)


def _composition(frames: dict[str, pd.DataFrame], dataset: Path) -> dict[str, dict[str, object]]:
    """What each split holds, as the model card shows it: images, fractured, truncated and DICOM
    files (read from each file's first bytes), and the fractured training images by body part."""
    rows = {}
    for name, frame in frames.items():
        dicom: int | None = 0
        for path in frame["path"]:
            try:
                with (dataset / path).open("rb") as handle:
                    dicom += is_dicom(handle.read(132))
            except OSError:  # the dataset not where ingest.dest says (outputs pulled without it): not counted
                dicom = None
                break
        truncated = frame["truncated"].astype(str).str.lower().isin(["true", "1"]).sum() if "truncated" in frame else 0
        rows[name] = {"images": len(frame), "fractured": int(frame["label"].sum()), "truncated": int(truncated),
                      "dicom": dicom}
    train = frames["train"]
    parts = body_part(train[train["label"] == 1]).value_counts().sort_index()
    return {"splits": rows, "train_fractured_by_part": {str(k): int(v) for k, v in parts.items()}}


def localise(
    params: Params, workspace: Workspace, frame: pd.DataFrame, labels: np.ndarray, cache: PreparedImages,
    network: torch.nn.Module, pre: Preprocessor, aspect: Aspect, tta: Tta,
) -> Localisation | None:
    """The pointing game of the page's heat map on a split's fractured images with boxes.

    The evaluate stage plays it on the test split; ``bench/heat_map_mirror.py`` on val. The heat
    map is Grad-CAM for the fractured class on the cached pixels the model was scored on (with
    its mirror's map under ``tta: hflip``, as the page shows it), mapped back onto the image's
    own pixels as the page maps it.

    Returns:
        None when ``evaluate.boxes`` is null, or a hospital export (``ingest.layout: csv``) has no
        box file.
    """
    if params.evaluate.boxes is None:
        return None
    dataset = workspace.root / params.ingest.dest
    path = dataset / params.evaluate.boxes
    if params.ingest.layout == "csv" and not path.is_file():
        log.info("no fracture boxes at %s: the heat map's pointing game is not played", path)
        return None
    boxes = read_coco_boxes(path)
    fractured = frame[(labels == 1) & frame["image_id"].isin(list(boxes)).to_numpy()]
    pixels = cache.dataset(fractured).tensors[0]
    rows = {image_id: i for i, image_id in enumerate(fractured["image_id"])}
    paths = dict(zip(fractured["image_id"], fractured["path"], strict=True))
    target = CLASSES.index("fractured")

    def heat_map(image_id: str, image_boxes: ImageBoxes) -> np.ndarray:
        i = rows[image_id]
        cam = grad_cam(network, pre(pixels[i : i + 1]), target, tta=tta)
        size = shown_size(dataset / paths[image_id])  # the header only: the size the page maps onto (DICOM too)
        return to_image_grid(cam, size, aspect)

    return score_heat_maps(
        ((image_id, boxes[image_id]) for image_id in fractured["image_id"]),
        heat_map,
        params.evaluate.bootstrap_resamples,
        params.evaluate.seed,
        # Linked test images (copies, near-duplicates) resampled together, as the other intervals are.
        groups=dict(zip(fractured["image_id"], split_groups(fractured), strict=True)),
    )


def _write_curves(
    workspace: Workspace, result: Evaluation, calib: Calibration, test: pd.DataFrame, parts: np.ndarray,
    probs: np.ndarray, threshold: float,
) -> None:
    """The DVC plot tables: ROC, precision-recall, reliability, and per-image predictions."""
    result.roc.to_csv(workspace.curve("roc"), index=False)
    result.pr.to_csv(workspace.curve("pr"), index=False)
    calib.curve.to_csv(workspace.curve("calibration"), index=False)
    test.assign(body_part=parts, fracture_probability=probs, predicted=(probs >= threshold).astype(int))[
        ["image_id", "body_part", "label", "predicted", "fracture_probability"]
    ].to_csv(workspace.curve("predictions"), index=False)


def run_evaluate(params: Params, workspace: Workspace) -> EvaluateResult:
    """Chooses the threshold on val (``evaluate`` in params), then scores the test split once.

    Returns:
        The test metrics and confusion counts as written to ``metrics.json``.
    """
    trained: TrainResult = workspace.read_train()
    model = trained.model
    # The figures go into the training run: one the tracking store lacks (a clone that pulled the
    # outputs from a DVC remote but not the MLflow store) stops the stage before any image is scored
    # and any output written, naming the run.
    setup_mlflow(params, workspace.root)
    training_run(trained.run_id)
    network = load_network(workspace.weights, model.architecture)
    pre = Preprocessor(model.data_config)
    # The cache must hold exactly the pixels the trained model's own transform produces.
    cache = open_cache(params, workspace, model.data_config)
    ev = params.evaluate
    frames = workspace.read_split_tables()

    def score(split: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
        frame = frames[split]
        images, labels = cache.dataset(frame).tensors
        probs = probabilities(network, images, pre, torch.device("cpu"), ev.batch_size, model.tta)
        return frame, labels.numpy(), probs

    threshold = operating_threshold(ev, lambda: score("val")[1:])
    test, labels, probs = score("test")
    result = evaluate_probabilities(labels, probs, threshold)
    linked = split_groups(test)
    intervals = confidence_intervals(labels, probs, threshold, ev.bootstrap_resamples, ev.seed, groups=linked)
    calib = calibration(labels, probs, ev.calibration_bins)
    parts = body_part(test).to_numpy()
    metrics = (
        result.metrics
        | {f"{name}_ci_low": low for name, (low, _) in intervals.items()}
        | {f"{name}_ci_high": high for name, (_, high) in intervals.items()}
        | {"ece": calib.ece, "brier": calib.brier}
    )
    localisation = localise(
        params, workspace, test, labels, cache, network, pre, model.data_config.aspect, model.tta
    )
    if localisation is not None:
        metrics |= localisation.metrics
    evaluated = EvaluateResult(metrics, result.confusion)
    per_part = by_group(labels, probs, parts, threshold, linked=linked, n_resamples=ev.bootstrap_resamples, seed=ev.seed)
    workspace.write_evaluate(evaluated, per_part)
    (localisation.per_image if localisation else pd.DataFrame(columns=list(COLUMNS))).to_csv(
        workspace.localisation, index=False
    )
    _write_curves(workspace, result, calib, test, parts, probs, threshold)
    pngs = save_evaluation_plots(labels, probs, threshold, ev.calibration_bins, workspace.plots_dir)

    # The card names the code and data the model was trained from, as the training run recorded them.
    tags = training_run(trained.run_id).data.tags
    dataset = dataset_name(params.ingest.layout, params.ingest.dest)
    card = render_model_card(
        model,
        _recipe(params, model.profile),
        {"version": tags.get("data_version"), "git_commit": tags.get("git_commit"),
         "git_dirty_files": tags.get("git_dirty_files"),
         "splits": SplitResult.of(frames).sizes, "dataset": dataset},
        metrics,
        per_part,
        _threshold_source(params),
        trained.run_id,
        _composition(frames, workspace.root / params.ingest.dest),
    )
    workspace.model_card.write_text(card)
    with mlflow.start_run(run_id=trained.run_id):
        mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items()})
        mlflow.log_metrics({f"test_{k}": v for k, v in result.confusion.items()})
        mlflow.set_tag("threshold_source", _threshold_source(params))
        mlflow.set_tag("dataset", dataset)  # what the registered version's description names
        # The images and labels these figures are on: registration refuses the run when the
        # workspace's test split has changed since (fracture.registry).
        mlflow.set_tag("split_fingerprint", split_fingerprint(test))
        for path in (workspace.metrics, workspace.body_parts, workspace.model_card):
            mlflow.log_artifact(str(path), artifact_path="evaluation")
        mlflow.log_artifact(str(workspace.localisation), artifact_path="evaluation")
        for path in pngs:
            mlflow.log_artifact(str(path), artifact_path="evaluation/plots")
    print(json.dumps(evaluated.to_dict(), indent=2))
    return evaluated
