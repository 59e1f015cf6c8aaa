"""The detector's stages (``detect/dvc.yaml``, outside the main job): train it on the classifier's
backbone with FracAtlas's fracture boxes, then score the test split once.

Both read the classifier's split tables, so the detector trains, is selected and is tested on the
same near-duplicate-grouped images as the classifier. An image that cannot serve the detector
(fractured by its label but without a box; a box on an image labelled not fractured) is left out
and listed with its reason in ``outputs/detect/excluded.csv``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score

from fracture.config import Params
from fracture.decoding import shown_size
from fracture.detection import (
    BoxedImages,
    DetectionError,
    DetectorConfig,
    bootstrap_map,
    build_detector,
    detect,
    mean_average_precision,
    train_detector,
)
from fracture.detector_registry import DetectorTestSplit, register_detector
from fracture.devices import select_device
from fracture.evaluation import confidence_intervals, operating_threshold
from fracture.gate import split_fingerprint
from fracture.localisation import BoxesError, ImageBoxes, read_coco_boxes
from fracture.registry import Registration
from fracture.seen import SEEN_ARTIFACT, SeenImages, SeenListError, seen_table
from fracture.split import split_groups
from fracture.stages.register import input_policy
from fracture.tracking import setup_mlflow
from fracture.workspace import Workspace, write_json

log = logging.getLogger(__name__)


def _boxes(params: Params, workspace: Workspace) -> dict[str, ImageBoxes]:
    if params.evaluate.boxes is None:
        raise DetectionError(
            "evaluate.boxes is null: the detector learns from fracture boxes. Name the dataset's COCO JSON of boxes "
            "there (FracAtlas: Annotations/COCO JSON/COCO_fracture_masks.json)"
        )
    return read_coco_boxes(workspace.root / params.ingest.dest / params.evaluate.boxes)


def boxed_split(
    params: Params, workspace: Workspace, split: str, boxes: dict[str, ImageBoxes], flip: bool = False,
    image_size: int | None = None,
) -> tuple[BoxedImages, list[np.ndarray], np.ndarray, pd.DataFrame]:
    """One split's images with their boxes (none for a non-fractured image).

    Args:
        image_size: the longer side the images are resized to: a saved detector's own (its
            ``model.json``); None: ``detect.image_size``, the size the next detector trains at.

    Returns:
        The images, their boxes in original pixels, their labels, and the images left out, with
        ``split``, ``image_id`` and ``reason``.
    """
    frame = workspace.read_split_table(split)
    has_box = frame["image_id"].isin(list(boxes)).to_numpy()
    label = frame["label"].astype(int).to_numpy()
    where = params.evaluate.boxes
    reasons = pd.Series("", index=frame.index)
    reasons[(label == 1) & ~has_box] = f"fractured by its label but has no fracture box in {where}"
    reasons[(label == 0) & has_box] = f"labelled not fractured but has a fracture box in {where}"
    kept = frame[reasons.eq("").to_numpy()]
    excluded = pd.DataFrame({"split": split, "image_id": frame["image_id"][reasons.ne("")], "reason": reasons[reasons.ne("")]})
    dataset = workspace.root / params.ingest.dest
    fractured = kept[kept["label"] == 1]
    for image_id, path in zip(fractured["image_id"], fractured["path"], strict=True):
        # The boxes are scaled with the image as decoded: drawn on another frame, they would fall elsewhere.
        shown, stated = shown_size(dataset / path), boxes[image_id].size
        if tuple(shown) != tuple(stated):
            raise BoxesError(
                f"{image_id}: its boxes in {where} are for a {stated[0]} x {stated[1]} px image, but {path} shows "
                f"{shown[0]} x {shown[1]} px (turned upright by its EXIF orientation; a DICOM's pixels made square): "
                "draw the boxes on the image as it is shown, or give its size as shown"
            )
    truth = [boxes[i].boxes if int(lab) == 1 else np.zeros((0, 4)) for i, lab in zip(kept["image_id"], kept["label"], strict=True)]
    images = BoxedImages(
        [dataset / p for p in kept["path"]], truth, image_size or params.detect.image_size, flip=flip,
        allow_truncated=params.validate.on_truncated == "keep",
    )
    return images, truth, kept["label"].astype(int).to_numpy(), excluded


def run_detect_train(params: Params, workspace: Workspace) -> dict[str, object]:
    """Fine-tunes the detector on the train split, keeping the epoch with the best val mAP@0.5.

    Writes ``outputs/detect/model.safetensors``, ``model.json`` (the detector's config, its best
    epoch, its MLflow run), ``history.json`` and ``excluded.csv``; logs the run to MLflow, tagged
    with the classifier's run, with the images it learnt from (:func:`seen_by_detector`) as its
    :data:`fracture.seen.SEEN_ARTIFACT`.

    Returns:
        What ``model.json`` holds.
    """
    d = params.detect
    boxes = _boxes(params, workspace)
    trained = workspace.read_train()
    train, _, _, left_train = boxed_split(params, workspace, "train", boxes, flip=d.flip)
    val, val_truth, _, left_val = boxed_split(params, workspace, "val", boxes)
    data = trained.model.data_config
    config = DetectorConfig(trained.model.architecture, d.architecture, d.image_size, d.fpn_channels, data.mean, data.std)
    model = build_detector(config, load_file(str(workspace.weights)), seed=d.seed)
    workspace.detect_dir.mkdir(parents=True, exist_ok=True)
    setup_mlflow(params, workspace.root)
    seen = seen_by_detector(workspace, trained.run_id, MlflowClient())
    tags = {"model_kind": "fracture-detector", "classifier_run_id": trained.run_id,
            "data_version": workspace.data_version() or "", "git_commit": ""} | workspace.git_tags()
    with mlflow.start_run(run_name=f"detector-{d.architecture}", tags=tags) as run:
        mlflow.log_params({f"detect.{k}": v for k, v in vars(d).items()} | {"backbone": config.backbone,
                          "train_images": len(train), "val_images": len(val)})
        # What it learnt from, for a later gate that scores it as champion on a new split.
        mlflow.log_text(seen, SEEN_ARTIFACT)

        def on_epoch(row: dict[str, float]) -> None:
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

        result = train_detector(
            model, train, val, val_truth, epochs=d.epochs, batch_size=d.batch_size, lr=d.lr,
            weight_decay=d.weight_decay, negatives_per_positive=d.negatives_per_positive, seed=d.seed,
            workers=d.workers, frozen=d.frozen, warmup_epochs=d.warmup_epochs, on_epoch=on_epoch,
            device=select_device(params.train.device),
        )
        mlflow.log_metrics({"best_val_map_50": result.best_val_map_50, "train_seconds": result.seconds})
    save_file(result.state, str(workspace.detect_weights))
    described = config.to_dict() | {
        "best_epoch": result.best_epoch, "best_val_map_50": result.best_val_map_50, "run_id": run.info.run_id,
        "classifier_run_id": trained.run_id, "train_seconds": round(result.seconds, 1),
    }
    write_json(workspace.detect_model_json, described)
    write_json(workspace.detect_history, result.history)
    pd.DataFrame({"path": _relative(params, workspace, val), "label": [int(len(t) > 0) for t in val_truth],
                  "top_score": result.val_scores}).to_csv(workspace.detect_val_scores, index=False)
    pd.concat([left_train, left_val]).to_csv(workspace.detect_excluded, index=False)
    return described


def seen_by_detector(workspace: Workspace, classifier_run_id: str, client: MlflowClient) -> str:
    """The images the detector learns from, as its run's :data:`fracture.seen.SEEN_ARTIFACT` csv.

    Its own train and val split tables, every image of them (those left out for want of a box
    included): it trains on the one and keeps the epoch the other scores best. And every image
    its backbone was trained or validated on, as the classifier's run ``classifier_run_id`` lists
    them (with ``split`` ``backbone`` where the split tables do not hold them): the detector
    starts from the classifier's fine-tuned weights, so what the classifier learnt shaped the
    detector too, and a test image the classifier trained on is no unseen evidence for the
    detector either. Through ``dvc repro`` both stages read the same split tables and the two
    lists are the same images; they differ when ``fracture detect-train`` runs by hand on split
    tables drawn after the classifier was trained. A classifier run that lists nothing (trained
    before its runs did), or that the tracking store does not hold (warned), adds nothing.

    A classifier run's list that cannot be read (damaged) adds nothing either, with a warning.
    """
    frames = {name: workspace.read_split_table(name) for name in ("train", "val")}
    try:
        inherited = seen_table(client, classifier_run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        log.warning("classifier run %s (outputs/train/run.json) is not in the tracking store %s: the detector's run "
                    "lists the images of its own train and val split tables only, not the ones its backbone may have "
                    "learnt besides", classifier_run_id, client.tracking_uri)
        inherited = None
    backbone = None
    if inherited is not None:
        try:
            backbone = SeenImages.rows(inherited, f"classifier run {classifier_run_id}'s artifact {SEEN_ARTIFACT}")
        except SeenListError as exc:
            log.warning("%s: the detector's run lists the images of its own train and val split tables only", exc)
    if backbone is not None:
        own = pd.concat(frames.values())
        listed = backbone["image_id"].isin(own["image_id"].astype(str)) & backbone["sha256"].isin(own["sha256"].astype(str))
        frames["backbone"] = backbone[~listed]
    return SeenImages.table(frames)


def load_trained_detector(workspace: Workspace) -> tuple[DetectorConfig, dict[str, object], object]:
    """The detector the train stage saved: its config, ``model.json`` and the network."""
    described = json.loads(Path(workspace.detect_model_json).read_text())
    config = DetectorConfig.from_dict(described)
    model = build_detector(config)
    model.load_state_dict(load_file(str(workspace.detect_weights)))
    return config, described, model.eval()


def run_detect_evaluate(params: Params, workspace: Workspace) -> dict[str, float]:
    """Scores the test split once: COCO mAP with bootstrap intervals, and the top box as a classifier.

    The image-level threshold follows the classifier's rule (:func:`fracture.evaluation.operating_threshold`):
    the highest threshold reaching ``evaluate.target_sensitivity`` on the val split, from the val
    scores ``detect_train`` saved for the epoch it kept, or ``evaluate.threshold`` when that is null.
    The images are resized to the saved detector's ``image_size`` (its ``model.json``), as it was
    trained and is served, whatever ``detect.image_size`` says now (a warning says when they differ).

    Raises:
        DetectionError: the threshold is chosen on val and the saved val scores are not those of
            the val split's images (stale).

    Returns:
        The metrics written to ``outputs/detect/metrics.json``.
    """
    d = params.detect
    boxes = _boxes(params, workspace)
    config, described, model = load_trained_detector(workspace)
    model.to(select_device(params.train.device))
    if config.image_size != d.image_size:
        log.warning("params.yaml's detect.image_size is %d px, but the saved detector (%s) was trained at %d px: it "
                    "is scored at %d px, as it is served; rerun detect_train (dvc repro detect/dvc.yaml) for a detector "
                    "of %d px", d.image_size, workspace.detect_model_json, config.image_size, config.image_size,
                    d.image_size)
    # Resized as the detector was trained and is served, whatever params.yaml says now.
    test, truth, labels, left_test = boxed_split(params, workspace, "test", boxes, image_size=config.image_size)

    def val() -> tuple[np.ndarray, np.ndarray]:
        scores = _val_scores(params, workspace, boxes)
        return scores["label"].to_numpy(), scores["top_score"].to_numpy()

    # evaluate.threshold, or the highest threshold reaching evaluate.target_sensitivity on val: the classifier's rule.
    threshold = operating_threshold(params.evaluate, val)
    found = detect(model, test, d.batch_size, d.workers)
    maps = mean_average_precision(found, truth)
    # Resampled over the test split's groups of linked images, as the classifier's intervals are.
    groups = _test_rows(params, workspace, test)["group"].to_numpy()
    intervals = bootstrap_map(found, truth, d.bootstrap_resamples, params.evaluate.seed, groups=groups.tolist())
    top = found.top_scores()
    predicted = top >= threshold
    # The top box as an image classifier, with the classifier's intervals: ROC AUC's grouped bootstrap,
    # sensitivity's and specificity's Wilson intervals over the effective number of images.
    image = confidence_intervals(labels, top, threshold, d.bootstrap_resamples, params.evaluate.seed, groups=groups)
    intervals |= {f"image_{name.replace('recall', 'sensitivity')}": bounds for name, bounds in image.items()}
    metrics = maps | {f"{k}_ci_low": low for k, (low, _) in intervals.items()} | {
        f"{k}_ci_high": high for k, (_, high) in intervals.items()
    } | {
        "image_roc_auc": float(roc_auc_score(labels, top)),
        "image_sensitivity": float(predicted[labels == 1].mean()),
        "image_specificity": float((~predicted[labels == 0]).mean()),
        "image_threshold": threshold,
        "n_images": float(len(labels)),
        "n_fractured": float(labels.sum()),
        "n_boxes": float(sum(len(t) for t in truth)),
        "n_excluded": float(len(left_test)),
    }
    write_json(workspace.detect_metrics, metrics)
    left_test.to_csv(workspace.detect_test_excluded, index=False)
    setup_mlflow(params, workspace.root)
    fingerprint = split_fingerprint(pd.DataFrame({"image_id": [p.stem for p in test.paths], "label": labels}))
    with mlflow.start_run(run_id=str(described["run_id"])):
        mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items()})
        # The split these figures are on: registration refuses them for another (detect-register).
        mlflow.set_tag("split_fingerprint", fingerprint)
    return metrics


def _val_scores(params: Params, workspace: Workspace, boxes: dict[str, ImageBoxes]) -> pd.DataFrame:
    """The val scores ``detect_train`` saved, checked against the val split's images."""
    path = workspace.detect_val_scores
    if not path.is_file():
        raise DetectionError(f"{path} not found: run detect_train first (dvc repro detect/dvc.yaml)")
    scores = pd.read_csv(path)
    val, _, _, _ = boxed_split(params, workspace, "val", boxes)
    if scores["path"].tolist() != _relative(params, workspace, val):
        raise DetectionError(f"{path} was written for other val images than the split's: rerun detect_train "
                             "(dvc repro detect/dvc.yaml)")
    return scores


def _relative(params: Params, workspace: Workspace, images: BoxedImages) -> list[str]:
    """The images' paths relative to the dataset, as the split tables hold them."""
    dataset = workspace.root / params.ingest.dest
    return [p.relative_to(dataset).as_posix() for p in images.paths]


def _test_rows(params: Params, workspace: Workspace, test: BoxedImages) -> pd.DataFrame:
    """The test split table's row of each of ``test``'s images, in their order, with its ``group``
    of linked images (:func:`fracture.split.split_groups`)."""
    table = workspace.read_split_table("test")
    return table.assign(group=split_groups(table)).set_index("path").loc[_relative(params, workspace, test)]


def run_detect_register(params: Params, workspace: Workspace) -> Registration:
    """Registers the detector under ``detect.model_name``; it becomes champion only through its gate.

    The served detector carries its image-level threshold (chosen on val by ``detect_evaluate``)
    and the classifier's input checks (:func:`fracture.stages.register.input_policy`). Its gate
    scores it and the champion on the test images ``detect_evaluate`` scored
    (:func:`fracture.detector_registry.register_detector`).

    Raises:
        FileNotFoundError: a detect stage's output is missing; the message says to run them.
        fracture.registry.RegistryError: the run lacks a metric the gate needs.
    """
    for path in (workspace.detect_model_json, workspace.detect_weights, workspace.detect_metrics):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} not found: run the detector's stages first (dvc repro detect/dvc.yaml)")
    described = json.loads(Path(workspace.detect_model_json).read_text())
    metrics = json.loads(Path(workspace.detect_metrics).read_text())
    test, truth, labels, _ = boxed_split(params, workspace, "test", _boxes(params, workspace))
    frame = pd.DataFrame({"image_id": [p.stem for p in test.paths], "label": labels})
    # Each scored image's row of the test split table: the gate leaves out those a champion learnt from.
    rows = _test_rows(params, workspace, test)
    split = DetectorTestSplit(
        split_fingerprint(frame), tuple(test.paths), tuple(truth), tuple(rows["image_id"].astype(str)),
        tuple(rows["sha256"].fillna("").astype(str)) if "sha256" in rows.columns else (), tuple(rows["group"]),
    )
    served = DetectorConfig.from_dict(described).to_dict() | {
        "threshold": float(metrics["image_threshold"]), "input": input_policy(params).to_dict(),
    }
    setup_mlflow(params, workspace.root)
    return register_detector(
        params.detect, str(described["run_id"]), workspace.detect_weights, served, split, params.evaluate.seed
    )
