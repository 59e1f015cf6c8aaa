"""detect_evaluate run by hand: the saved detector's size and the classifier's threshold rule."""

from __future__ import annotations

import dataclasses
import json
import logging

import mlflow
import numpy as np
import pytest

from fracture.config import load_params
from fracture.detection import DetectorTraining
from fracture.stages import detect as stage
from fracture.workspace import Workspace
from tests.conftest import REPO, write_trained_classifier
from tests.synthetic import make_dataset, training_frame


@pytest.fixture()
def trained(client, tmp_path, monkeypatch):
    """A project whose detector ``detect_train`` saved at 128 px (its training stubbed), and its params."""
    params = load_params(REPO)
    params = dataclasses.replace(
        params, detect=dataclasses.replace(params.detect, image_size=128, fpn_channels=64, bootstrap_resamples=50),
        evaluate=dataclasses.replace(params.evaluate, bootstrap_resamples=50),
    )
    root = tmp_path / "project"
    dataset = root / params.ingest.dest
    make_dataset(dataset, 6, 6)
    frame = training_frame(dataset).assign(sha256=lambda f: "h" + f["image_id"])
    workspace = Workspace(root)
    workspace.write_split({k: frame.iloc[rows] for k, rows in
                           {"train": [0, 1, 6, 7], "val": [2, 3, 8, 9], "test": [4, 5, 10, 11]}.items()}, {})
    coco = {"images": [{"id": i, "file_name": f"IMG{i:07d}.jpg", "width": 80, "height": 96} for i in range(6)],
            "annotations": [{"id": i, "image_id": i, "bbox": [10, 10, 30, 30]} for i in range(6)]}
    (dataset / params.evaluate.boxes).parent.mkdir(parents=True)
    (dataset / params.evaluate.boxes).write_text(json.dumps(coco))
    with mlflow.start_run() as classifier:
        pass
    write_trained_classifier(workspace, classifier.info.run_id, classifier.info.experiment_id)

    def train(model, train, val, val_truth, **kwargs):  # the recipe's own test, not this one's
        scores = np.array([0.9, 0.2, 0.4, 0.1])  # val: 2 fractured, 2 not
        return DetectorTraining(model.state_dict(), 1, 0.0, [{"epoch": 1, "val_map_50": 0.0}], 0.0, scores)

    monkeypatch.setattr(stage, "train_detector", train)
    stage.run_detect_train(params, workspace)
    return params, workspace


def test_detect_evaluate_resizes_as_the_saved_detector_was_trained_not_as_params_say_now(trained, monkeypatch, caplog):
    """Run by hand after detect.image_size changed, it resized the test images to params.yaml's size
    and scored a 128 px detector on images resampled twice (512, then 128 in torchvision's transform):
    figures of a detector no one serves."""
    params, workspace = trained
    sizes = []
    real = stage.detect

    def detect(model, images, *args, **kwargs):
        sizes.append(images.image_size)
        return real(model, images, *args, **kwargs)

    monkeypatch.setattr(stage, "detect", detect)
    changed = dataclasses.replace(params, detect=dataclasses.replace(params.detect, image_size=512))
    with caplog.at_level(logging.WARNING, logger="fracture.stages.detect"):
        stage.run_detect_evaluate(changed, workspace)
    assert sizes == [128]
    assert "detect.image_size is 512 px, but the saved detector" in caplog.text and "trained at 128 px" in caplog.text


def test_detect_evaluate_takes_evaluate_threshold_when_no_sensitivity_is_targeted(trained):
    """With evaluate.target_sensitivity null the classifier is served at evaluate.threshold; the
    detector chose one on val for sensitivity 0.85 regardless."""
    params, workspace = trained
    fixed = dataclasses.replace(params, evaluate=dataclasses.replace(params.evaluate, target_sensitivity=None,
                                                                     threshold=0.3))
    assert stage.run_detect_evaluate(fixed, workspace)["image_threshold"] == 0.3
    targeted = dataclasses.replace(params, evaluate=dataclasses.replace(params.evaluate, target_sensitivity=0.5))
    assert stage.run_detect_evaluate(targeted, workspace)["image_threshold"] == pytest.approx(0.9)  # chosen on val
