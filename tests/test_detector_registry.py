"""The detector's own registered model and promotion gate: a paired bootstrap of mAP@0.5 on the same images."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

import fracture
from fracture import detector_registry
from fracture.config import DetectParams
from fracture.consumer import ConsumerAnswer
from fracture.detection import Detections, build_detector, paired_bootstrap_map
from fracture.detector_registry import (
    DetectorTestSplit,
    register_detector,
    served_detections,
)
from fracture.gate import split_fingerprint
from fracture.intake import InputPolicy
from fracture.registry import CHALLENGER, CHAMPION, PREVIOUS_CHAMPION, RegistryError
from tests.test_detection import CONFIG, xray_with_square


def boxes_on(n_fractured: int, n_negative: int) -> list[np.ndarray]:
    """One 40 x 40 box per fractured image, each somewhere else; none on the negatives."""
    truth = [np.array([[10 + 3 * i, 20 + 2 * i, 50 + 3 * i, 60 + 2 * i]], dtype=np.float64) for i in range(n_fractured)]
    return truth + [np.zeros((0, 4)) for _ in range(n_negative)]


def finds(truth: list[np.ndarray], hits: set[int], seed: int) -> Detections:
    """A detector that finds the box of the images in ``hits`` and puts a box 30 px off on the others."""
    rng = np.random.default_rng(seed)
    boxes, scores = [], []
    for i, t in enumerate(truth):
        if len(t):
            boxes.append(t.copy() if i in hits else t + 30)
            scores.append(rng.uniform(0.5, 1.0, 1))
        else:
            boxes.append(np.array([[0.0, 0.0, 30.0, 30.0]]))
            scores.append(rng.uniform(0.0, 0.6, 1))
    return Detections(boxes, scores)


def test_the_paired_bootstrap_knows_identical_detectors_a_better_one_and_noise():
    truth = boxes_on(60, 60)
    half = finds(truth, set(range(30)), seed=1)

    same = paired_bootstrap_map(truth, half, half, 100, seed=0)
    assert same.difference == 0 and same.ci_low == same.ci_high == 0 and same.p_value == 1.0
    assert (same.n_images, same.n_fractured, same.resamples) == (120, 60, 100)

    better = paired_bootstrap_map(truth, finds(truth, set(range(55)), seed=1), half, 100, seed=0)
    assert better.map_a > better.map_b + 0.3 and better.ci_low > 0 and better.p_value < 0.05

    # One image more found, a different one missed: higher by noise, not with 95% confidence.
    noise = paired_bootstrap_map(truth, finds(truth, set(range(1, 32)), seed=1), half, 100, seed=0)
    assert 0 < noise.difference < 0.05 and noise.ci_low < 0 < noise.ci_high and noise.p_value > 0.05
    gate = detector_registry.beats_champion(noise, "1", 0.95)
    assert not gate.passed and "not with 95% confidence" in gate.detail
    assert detector_registry.beats_champion(better, "1", 0.95).passed

    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap_map(truth[:3], half, half, 10, seed=0)


@pytest.fixture()
def split(tmp_path) -> DetectorTestSplit:
    """Four synthetic X-rays with a bright square each, and two without."""
    paths, truth = [], []
    for i in range(6):
        box = (20 + 8 * i, 30 + 6 * i, 60 + 8 * i, 70 + 6 * i) if i < 4 else None
        path = tmp_path / f"IMG{i:07d}.png"
        truth.append(xray_with_square(path, size=(160, 200), box=box, seed=i))
        paths.append(path)
    frame = pd.DataFrame({"image_id": [p.stem for p in paths], "label": [1, 1, 1, 1, 0, 0]})
    return DetectorTestSplit(split_fingerprint(frame), tuple(paths), tuple(truth))


def detector_run(tmp_path, seed: int, map_50: float, code: dict[str, str] | None = None) -> tuple[str, object, dict]:
    """A detector's training run as ``detect_evaluate`` leaves it, with its weights and served config
    (``code``: its git tags, a clean commit unless given)."""
    torch.manual_seed(seed)
    model = build_detector(CONFIG, timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2).state_dict())
    weights = tmp_path / f"detector-{seed}.safetensors"
    save_file(model.state_dict(), str(weights))
    tags = {"classifier_run_id": "c1", "data_version": "d1"} | (code or {"git_commit": "c0ffee"})
    with mlflow.start_run(tags=tags) as run:
        mlflow.log_metrics({"test_map_50": map_50, "test_map": map_50 / 2, "test_image_sensitivity": 0.9})
    return run.info.run_id, weights, CONFIG.to_dict() | {"threshold": 0.05, "input": InputPolicy().to_dict()}


def test_the_first_detector_becomes_champion_and_an_identical_one_stays_challenger(client, split, tmp_path, monkeypatch):
    params = dataclasses.replace(DetectParams(), floors={"test_map_50": 0.1}, bootstrap_resamples=20)
    run_id, weights, described = detector_run(tmp_path, 0, 0.4)

    first = register_detector(params, run_id, weights, described, split)
    assert first.decision == "promoted" and first.champion and first.created and first.score == 0.4
    assert [c.name for c in first.checks] == ["floor test_map_50", "beats champion", "load check"]
    assert all(c.passed for c in first.checks), first.summary()
    mv = client.get_model_version("fracture-detector", first.version)
    assert mv.tags["split_fingerprint"] == split.fingerprint and mv.tags["classifier_run_id"] == "c1"
    assert mv.tags["git_commit"] == "c0ffee" and "git_dirty_files" not in mv.tags
    assert "mAP@0.5 0.400" in mv.description

    # Served as a registry consumer gets it: every box with min_score 0, in the images' pixels.
    found, threshold = served_detections("fracture-detector", first.version, split)
    assert threshold == 0.05 and len(found.boxes) == 6 and sum(len(b) for b in found.boxes) > 0

    # The same weights again, from another run (trained from uncommitted code: the version names
    # the files, as its run does): scored with the champion, no gain, so challenger.
    dirty = {"git_commit": "c0ffee-dirty", "git_dirty_files": "fracture/detection.py"}
    twin_id, _, _ = detector_run(tmp_path, 0, 0.45, code=dirty)
    twin = register_detector(params, twin_id, weights, described, split)
    assert {k: client.get_model_version("fracture-detector", twin.version).tags[k] for k in dirty} == dirty
    assert twin.decision == "challenger" and not twin.champion and twin.aliases == (CHALLENGER,)
    assert "beats champion: mAP@0.5" in twin.reason and "not higher" in twin.reason
    tags = client.get_model_version("fracture-detector", twin.version).tags
    assert tags["gate_compared_with"] == first.version and tags["gate_map_50_difference"] == "0.0000"
    assert tags["gate_p_value"] == "1" and tags["gate_decision"] == "challenger"
    assert str(client.get_model_version_by_alias("fracture-detector", CHAMPION).version) == first.version
    # Registered again against the same champion under the same rules: its decision stands, unscored.
    with monkeypatch.context() as patch:
        patch.setattr(detector_registry, "_gate", lambda *a, **k: pytest.fail("scored again"))
        twin_again = register_detector(params, twin_id, weights, described, split)
    assert twin_again.decision == "unchanged" and twin_again.reason.startswith(
        f"already decided against champion v{first.version}, on this test split and these rules: stays challenger")

    # Below a floor: never compared, never champion.
    low_id, _, _ = detector_run(tmp_path, 1, 0.05)
    low = register_detector(params, low_id, weights, described, split)
    assert low.decision == "challenger" and [c.name for c in low.checks] == ["floor test_map_50"]

    # Registering a run again registers nothing new.
    again = register_detector(params, run_id, weights, described, split)
    assert not again.created and again.version == first.version and again.reason == "already champion"


def champion_and_contender(split, tmp_path, monkeypatch, champion_hits: set[int], contender_hits: set[int], map_50: float):
    """A first detector registered as champion, and a second run whose boxes (on the split's images,
    as known answers) find the fractures ``contender_hits`` where the champion finds ``champion_hits``.

    Returns the params, the champion's registration, the second run's id, its weights and config.
    """
    params = dataclasses.replace(DetectParams(), bootstrap_resamples=100)
    truth = list(split.truth)
    run_id, weights, described = detector_run(tmp_path, 0, 0.3)
    # In this process: the load check in a consumer's Python is the first test's.
    first = register_detector(params, run_id, weights, described, split, isolated=False)
    second_id, _, _ = detector_run(tmp_path, 2, map_50)
    answers = {
        first.version: finds(truth, champion_hits, seed=0),
        str(int(first.version) + 1): finds(truth, contender_hits, seed=0),
    }
    monkeypatch.setattr(detector_registry, "served_detections", lambda name, version, s: (answers[version], 0.05))
    return params, first, second_id, weights, described


def test_a_detector_better_on_the_same_images_replaces_the_champion(client, split, tmp_path, monkeypatch):
    # The new one finds all four fractures, the champion one.
    params, first, better_id, weights, described = champion_and_contender(
        split, tmp_path, monkeypatch, {0}, {0, 1, 2, 3}, 0.9
    )
    second = register_detector(params, better_id, weights, described, split, isolated=False)
    assert second.decision == "promoted" and second.champion, second.summary()
    assert second.aliases == (CHAMPION,) and second.previous_champion == first.version
    assert "beats champion" in [c.name for c in second.checks] and "higher with 95% confidence" in second.reason
    assert str(client.get_model_version_by_alias("fracture-detector", PREVIOUS_CHAMPION).version) == first.version


def test_a_detector_decided_without_a_comparison_keeps_no_figures_of_an_earlier_one(client, split, tmp_path, monkeypatch):
    params, first, worse_id, weights, described = champion_and_contender(
        split, tmp_path, monkeypatch, {0, 1, 2, 3}, {0}, 0.2
    )
    lost = register_detector(params, worse_id, weights, described, split, isolated=False)
    assert lost.decision == "challenger"
    assert float(client.get_model_version("fracture-detector", lost.version).tags["gate_map_50_difference"]) < 0
    # The champion deleted by hand: the run registered again is decided with nothing to compare with.
    client.delete_model_version("fracture-detector", first.version)
    again = register_detector(params, worse_id, weights, described, split, isolated=False)
    assert again.decision == "promoted", again.summary()
    tags = client.get_model_version("fracture-detector", lost.version).tags
    assert not set(detector_registry.MAP_COMPARISON_TAGS) & set(tags), tags


def test_a_detector_run_without_its_test_map_is_refused(client, split, tmp_path):
    with mlflow.start_run() as run:
        mlflow.log_metric("best_val_map_50", 0.3)
    with pytest.raises(RegistryError, match="detect_evaluate"):
        register_detector(DetectParams(), run.info.run_id, tmp_path / "w.safetensors", {}, split)
    with pytest.raises(RegistryError, match="no fracture box"):
        DetectorTestSplit("f", (tmp_path / "a.png",), (np.zeros((0, 4)),))


def test_the_detectors_load_check_fails_a_version_that_ran_this_installations_code(tmp_path, monkeypatch):
    """As the classifier's: a consumer's answer counts only when the version imported its own
    packaged code; one that ran this installation's says nothing of what its consumers can load."""
    image = tmp_path / "fractured.png"
    row = pd.DataFrame([{"boxes": "[[1.0, 2.0, 30.0, 40.0, 0.9]]", "fracture_score": 0.9, "label": "fractured",
                         "threshold": 0.05, "error": ""}])
    answers = {"own": ConsumerAnswer(row, "/models/v2/code/fracture/__init__.py", files=(str(image),)),
               "ours": ConsumerAnswer(row, str(Path(fracture.__file__)), files=(str(image),))}
    which = []
    monkeypatch.setattr(detector_registry, "predict_as_consumer", lambda uri, files: answers[which[-1]])

    which.append("own")
    assert detector_registry.load_check("fracture-detector", "2", image, 0.05).passed
    which.append("ours")
    check = detector_registry.load_check("fracture-detector", "2", image, 0.05)
    assert not check.passed
    assert check.detail == (f"models:/fracture-detector/2 on fractured.png: it ran this installation's code "
                            f"({fracture.__file__}), not its own")
