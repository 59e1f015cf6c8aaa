"""The fracture detector on the classifier's backbone: building, boxes through resizing, COCO mAP, training."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from mlflow import MlflowClient
from PIL import Image

from fracture.config import load_params
from fracture.detection import (
    BoxedImages,
    DetectionError,
    Detections,
    DetectorConfig,
    MatchedImages,
    bootstrap_map,
    build_detector,
    detect,
    epoch_indices,
    fit_longer_side,
    mean_average_precision,
    paired_bootstrap_map,
    train_detector,
)
from tests.conftest import REPO, dvc, shrink_params

CONFIG = DetectorConfig("tf_efficientnet_lite0", "fcos", 128, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def xray_with_square(path, size=(160, 200), box=(40, 60, 80, 100), seed=0) -> np.ndarray:
    """A dark noisy image with a bright square (the 'fracture') at ``box`` (x0, y0, x1, y1)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 60, (size[1], size[0]), dtype=np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        a[y0:y1, x0:x1] = 230
    Image.fromarray(a, mode="L").save(path)
    return np.array([box], dtype=np.float32) if box is not None else np.zeros((0, 4), dtype=np.float32)


def test_the_backbone_is_the_classifier_s_network():
    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2)
    state = classifier.state_dict()
    detector = build_detector(CONFIG, state)
    body = detector.backbone.body
    np.testing.assert_array_equal(body.conv_stem.weight.detach().numpy(), state["conv_stem.weight"].numpy())
    assert type(detector).__name__ == "FCOS" and detector.backbone.out_channels == 64
    # A classifier whose first layers were frozen (the CPU profile) saves no batch counters for them.
    frozen = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert build_detector(CONFIG, frozen).backbone.body.conv_stem.weight.equal(state["conv_stem.weight"])
    with pytest.raises(DetectionError, match="lack .* of the tf_efficientnet_lite0 backbone's tensors"):
        build_detector(CONFIG, {k: v for k, v in state.items() if not k.startswith("blocks.6")})
    assert type(build_detector(DetectorConfig(**{**CONFIG.__dict__, "architecture": "retinanet"}))).__name__ == "RetinaNet"
    with pytest.raises(DetectionError, match="detect.architecture must be one of"):
        DetectorConfig(**{**CONFIG.__dict__, "architecture": "yolo"})
    with pytest.raises(DetectionError, match="multiple of 32 and at least 64, got 32"):
        DetectorConfig(**{**CONFIG.__dict__, "fpn_channels": 32})
    assert DetectorConfig.from_dict(CONFIG.to_dict()) == CONFIG


def test_detect_seed_seeds_the_new_layers_so_training_again_gives_the_same_detector(monkeypatch):
    """The feature pyramid and the head were drawn from torch's state as the stage found it, before
    train_detector seeded anything: two runs on the same data and params trained two detectors."""
    from fracture.stages import detect as stage

    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2).state_dict()
    first = build_detector(CONFIG, classifier, seed=3).state_dict()
    torch.rand(1000)  # another process's torch state
    again = build_detector(CONFIG, classifier, seed=3).state_dict()
    other = build_detector(CONFIG, classifier, seed=4).state_dict()
    new_layers = [k for k in first if not k.startswith("backbone.body.")]
    assert new_layers and all(first[k].equal(again[k]) for k in first)
    assert not all(first[k].equal(other[k]) for k in new_layers if first[k].is_floating_point())
    # The train stage builds it under detect.seed (stopped there: what comes after needs a trained project).
    seeds = []

    def built(*_, seed=None):
        seeds.append(seed)
        raise RuntimeError("built")

    monkeypatch.setattr(stage, "build_detector", built)
    monkeypatch.setattr(stage, "_boxes", lambda *_: {})
    monkeypatch.setattr(stage, "boxed_split", lambda *_, **__: (None, None, None, None))
    monkeypatch.setattr(stage, "load_file", lambda *_: classifier)
    config = SimpleNamespace(mean=(0.5,) * 3, std=(0.5,) * 3)
    trained = SimpleNamespace(model=SimpleNamespace(data_config=config, architecture="tf_efficientnet_lite0"))
    workspace = SimpleNamespace(read_train=lambda: trained, weights="model.safetensors")
    params = load_params(REPO)
    with pytest.raises(RuntimeError, match="built"):
        stage.run_detect_train(params, workspace)
    assert seeds == [params.detect.seed]


def test_boxes_follow_the_resize_and_the_flip(tmp_path):
    truth = xray_with_square(tmp_path / "a.png", size=(160, 200), box=(40, 60, 80, 100))
    assert fit_longer_side((160, 200), 128) == (102, 128)
    images = BoxedImages([tmp_path / "a.png"], [truth], 128)
    image, boxes, size = images.load(0)
    assert image.shape == (3, 128, 102) and size == (160, 200)
    x0, y0, x1, y1 = boxes[0]
    assert (x0, y0) == pytest.approx((40 * 102 / 160, 60 * 128 / 200)) and (x1, y1) == pytest.approx((80 * 102 / 160, 100 * 128 / 200))
    inside = image[0, round(y0) + 2 : round(y1) - 2, round(x0) + 2 : round(x1) - 2]
    assert inside.min() > 0.8  # the bright square is where the scaled box says
    flipped = BoxedImages([tmp_path / "a.png"], [truth], 128, flip=True)
    seen = set()
    for _ in range(40):
        image, target = flipped[0]
        fx0, fy0, fx1, fy1 = target["boxes"][0].tolist()
        assert image[0, round(fy0) + 2 : round(fy1) - 2, round(fx0) + 2 : round(fx1) - 2].min() > 0.8
        seen.add(round(fx0))
    assert seen == {round(x0), round(102 - x1)}  # both the image and its mirror were drawn


def test_detect_decodes_in_worker_processes_started_by_spawn(tmp_path, monkeypatch):
    """The loader's collate_fn was a lambda: with detect.workers > 0 under the spawn start method
    (macOS's and Windows' default; CUDA users set it) the workers could not unpickle it, and
    training failed at its first val pass."""
    import functools

    from fracture import detection

    truth = [xray_with_square(tmp_path / f"{i}.png", box=box, seed=i)
             for i, box in enumerate([(40, 60, 80, 100), None, (10, 20, 50, 40)])]
    images = BoxedImages([tmp_path / f"{i}.png" for i in range(3)], truth, 128)
    model = build_detector(CONFIG, seed=0)
    here = detect(model, images, batch_size=2, workers=0)
    monkeypatch.setattr(detection, "DataLoader", functools.partial(detection.DataLoader, multiprocessing_context="spawn"))
    spawned = detect(model, images, batch_size=2, workers=1)
    assert len(spawned.boxes) == 3
    for a, b in zip(here.boxes + here.scores, spawned.boxes + spawned.scores, strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_epoch_takes_every_positive_and_a_fresh_draw_of_negatives():
    has_boxes = np.array([True] * 5 + [False] * 20)
    first = epoch_indices(has_boxes, 2.0, np.random.default_rng(0))
    assert len(first) == 15 and set(range(5)) <= set(first.tolist()) and len(set(first.tolist())) == 15
    rng = np.random.default_rng(0)
    a, b = epoch_indices(has_boxes, 2.0, rng), epoch_indices(has_boxes, 2.0, rng)
    assert np.array_equal(a, first) and set(a.tolist()) != set(b.tolist())
    assert len(epoch_indices(has_boxes, 10.0, rng)) == 25  # no more negatives than there are


def test_map_is_one_for_exact_boxes_and_zero_for_misplaced_ones():
    truth = [np.array([[10, 10, 50, 50]], dtype=np.float32), np.array([[100, 100, 140, 160]], dtype=np.float32),
             np.zeros((0, 4), dtype=np.float32)]
    exact = Detections([t.copy() for t in truth[:2]] + [np.zeros((0, 4))], [np.array([0.9]), np.array([0.8]), np.zeros(0)])
    assert mean_average_precision(exact, truth)["map_50"] == pytest.approx(1.0)
    moved = Detections([t + 35 for t in truth[:2]] + [np.zeros((0, 4))], [np.array([0.9]), np.array([0.8]), np.zeros(0)])
    assert mean_average_precision(moved, truth)["map_50"] == pytest.approx(0.0)
    # A confident false box on the negative image ranks above a true one: precision at full recall drops.
    noisy = Detections(exact.boxes[:2] + [np.array([[0, 0, 30, 30]], dtype=np.float32)],
                       [np.array([0.9]), np.array([0.5]), np.array([0.95])])
    assert 0.3 < mean_average_precision(noisy, truth)["map_50"] < 1.0
    low, high = bootstrap_map(noisy, truth, 50, seed=0)["map_50"]
    assert 0.0 <= low <= high <= 1.0
    assert bootstrap_map(exact, truth, 50, seed=0)["map_50"] == (pytest.approx(1.0), pytest.approx(1.0))
    # Twenty X-rays, ten with a fracture found exactly and ten without, half of those with a false box
    # scored among the true ones: the resampled images give an interval around the whole set's figure.
    rng = np.random.default_rng(0)
    many_truth = [np.array([[10, 10, 50, 50]], dtype=np.float32)] * 10 + [np.zeros((0, 4), dtype=np.float32)] * 10
    scores = rng.uniform(0.2, 0.9, 20)
    many = Detections([t.copy() for t in many_truth[:10]] + [np.array([[0, 0, 30, 30]], dtype=np.float32)] * 5
                      + [np.zeros((0, 4))] * 5, [np.array([s]) for s in scores[:15]] + [np.zeros(0)] * 5)
    whole = mean_average_precision(many, many_truth)["map_50"]
    low, high = bootstrap_map(many, many_truth, 200, seed=0)["map_50"]
    assert 0.3 < low < whole < high <= 1.0, (low, whole, high)
    np.testing.assert_array_equal(noisy.top_scores(), [0.9, 0.5, 0.95])


def jittered_detections(n_images: int, seed: int) -> tuple[Detections, list[np.ndarray]]:
    """Detections that test every part of COCO's matching: boxes found at every overlap from a near
    miss to exact (so each IoU threshold matches differently), two boxes on one fracture, false
    boxes on fractured and negative images, scores tied across images, images with neither, and
    one image with more than COCO's 100 detections."""
    rng = np.random.default_rng(seed)
    truth, boxes, scores = [], [], []
    for i in range(n_images):
        n_true = int(rng.integers(1, 4)) if i % 2 == 0 else 0
        corner = rng.uniform(0, 400, (n_true, 2))
        true = np.hstack([corner, corner + rng.uniform(20, 120, (n_true, 2))]).astype(np.float32)
        found = [t + rng.normal(0, 0.08, 4) * np.tile(t[2:] - t[:2], 2) for t in true if rng.random() < 0.85]
        found += [t + 2 for t in true[:1] if rng.random() < 0.3]  # a second box on the same fracture
        n_false = int(rng.integers(0, 3)) if i % 7 else 0
        found += [np.r_[c, c + 50] for c in rng.uniform(0, 400, (n_false, 2))]
        # One decimal: scores tied across images. False boxes mostly score lower than found ones.
        score = np.r_[rng.uniform(0.4, 1.0, len(found) - n_false), rng.uniform(0.0, 0.7, n_false)]
        if i == 3:
            found += [np.r_[c, c + 30] for c in rng.uniform(0, 400, (105, 2))]
            score = np.r_[score, rng.uniform(0.0, 0.3, 105)]
        truth.append(true.reshape(-1, 4))
        boxes.append(np.array(found, dtype=np.float32).reshape(-1, 4))
        scores.append(np.round(score, 1))
    return Detections(boxes, scores), truth


@pytest.mark.filterwarnings("ignore:Encountered more than 100 detections")  # on purpose, on one image
def test_resampled_map_is_torchmetrics_on_the_resampled_images():
    """The bootstraps rank each image's matches, made once, for every resample: the same mAP@0.5
    and mAP@0.5:0.95 as torchmetrics' COCO evaluation of the resampled images themselves."""
    detections, truth = jittered_detections(40, seed=0)
    matched = MatchedImages.of(detections, truth)
    rng = np.random.default_rng(1)
    draws = [np.arange(40), rng.integers(0, 40, 40), rng.integers(0, 40, 40), np.array([3, 3, 0, 0, 5]),
             *(rng.integers(0, 40, 25) for _ in range(4))]
    figures = set()
    for idx in draws:
        expected = mean_average_precision(Detections([detections.boxes[i] for i in idx],
                                                     [detections.scores[i] for i in idx]), [truth[i] for i in idx])
        map_50, map_all = matched.maps(idx)
        # torchmetrics hands its result back as float32: equal to its last digit.
        assert map_50 == pytest.approx(expected["map_50"], rel=2e-7), idx
        assert map_all == pytest.approx(expected["map"], rel=2e-7), idx
        figures.add(round(map_all, 6))
    assert len(figures) == len(draws) and 0.1 < min(figures) and max(figures) < 0.95  # no resample trivial
    negatives = np.flatnonzero([len(t) == 0 for t in truth])
    assert matched.maps(negatives) == (-1.0, -1.0) == tuple(
        mean_average_precision(Detections([detections.boxes[i] for i in negatives],
                                          [detections.scores[i] for i in negatives]),
                               [truth[i] for i in negatives])[k] for k in ("map_50", "map"))


@pytest.mark.filterwarnings("ignore:Encountered more than 100 detections")  # on purpose, on one image
def test_linked_copies_count_once_in_the_map_interval():
    """Five linked copies of each of 20 X-rays are 20 pieces of evidence, not 100: resampled over
    their groups the mAP interval is as wide as the 20 X-rays' own; image by image, far narrower."""
    detections, truth = jittered_detections(20, seed=2)
    copies = np.repeat(np.arange(20), 5)
    copied = Detections([detections.boxes[i] for i in copies], [detections.scores[i] for i in copies])
    copied_truth, groups = [truth[i] for i in copies], [f"xray-{i}" for i in copies]

    def widths(*args, **kwargs) -> np.ndarray:
        return np.array([high - low for low, high in bootstrap_map(*args, 1000, seed=0, **kwargs).values()])

    own, grouped = widths(detections, truth), widths(copied, copied_truth, groups=groups)
    by_image = widths(copied, copied_truth)
    assert np.all((0.7 * own < grouped) & (grouped < 1.3 * own)), (own, grouped)
    assert np.all(by_image < 0.6 * grouped), (by_image, grouped)
    # The paired comparison draws whole groups too: against a detector ranking its boxes the other
    # way round, the interval of the difference is as wide as 20 X-rays make it, not 100.
    reversed_scores = Detections(copied.boxes, [np.round(1.0 - s, 1) for s in copied.scores])
    paired = [paired_bootstrap_map(copied_truth, copied, reversed_scores, 1000, seed=0, groups=g) for g in (groups, None)]
    assert paired[0].difference == paired[1].difference > 0.3
    assert paired[1].ci_high - paired[1].ci_low < 0.6 * (paired[0].ci_high - paired[0].ci_low), paired
    with pytest.raises(DetectionError, match="one group per image is needed: 3 groups for 100 images"):
        bootstrap_map(copied, copied_truth, 10, seed=0, groups=groups[:3])


def test_one_image_with_boxes_measures_no_difference_between_two_detectors():
    """With one test image with boxes (the rest empty), every stratified resample draws that image,
    so each resample's difference was the observed one: a "95% CI +1.0000 to +1.0000, p = 0.0198" on
    one image's evidence, and the gate promoted on it. Now nothing is measured: p = 1, -1 to 1; with
    two images (or, over groups, two groups) with boxes the bootstrap runs as before."""
    from fracture.detector_registry import beats_champion

    box = np.array([[10.0, 10.0, 50.0, 50.0]])
    none = np.zeros((0, 4))

    def found(hits: list[bool]) -> Detections:
        return Detections([box if hit else none for hit in hits], [np.array([0.9]) if hit else np.zeros(0) for hit in hits])

    truth = [box, none, none, none, none, none]
    paired = paired_bootstrap_map(truth, found([True] + [False] * 5), found([False] * 6), 200, seed=0)
    assert paired.difference == 1.0 and (paired.ci_low, paired.ci_high, paired.p_value) == (-1.0, 1.0, 1.0), paired
    assert not paired.measured
    check = beats_champion(paired, "1", 0.95)
    assert not check.passed and "nothing measured" in check.detail, check
    # Two copies of the one boxed X-ray, linked: still one piece of evidence.
    linked = paired_bootstrap_map([box, box, none, none], found([True, True, False, False]), found([False] * 4), 200,
                                  seed=0, groups=["x1", "x1", "x2", "x3"])
    assert not linked.measured and linked.p_value == 1.0
    two = paired_bootstrap_map([box, box, none, none], found([True, True, False, False]), found([False] * 4), 200, seed=0)
    assert two.measured and two.p_value < 0.05  # the bootstrap's own reading at two images, as paired_bootstrap_map says


def squares(tmp_path, n: int) -> tuple[list, list]:
    """``n`` synthetic X-rays, two of each three with a 40 px square fracture box moving across them: paths and boxes."""
    paths, truth = [], []
    for i in range(n):
        x, y = 20 + 7 * i, 30 + 5 * i
        box = (x, y, x + 40, y + 40) if i % 3 else None
        path = tmp_path / f"{i}.png"
        truth.append(xray_with_square(path, box=box, seed=i))
        paths.append(path)
    return paths, truth


def test_training_runs_and_keeps_the_best_val_epoch(tmp_path):
    paths, truth = squares(tmp_path, 12)
    train = BoxedImages(paths[:8], truth[:8], 128, flip=True)
    val = BoxedImages(paths[8:], truth[8:], 128)
    torch.manual_seed(0)
    model = build_detector(CONFIG, timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2).state_dict())
    seen = []
    stem, deep = model.backbone.body.conv_stem.weight.clone(), model.backbone.body.blocks[3][0].conv_pw.weight.clone()
    result = train_detector(model, train, val, truth[8:], epochs=2, batch_size=4, lr=1e-3, weight_decay=1e-4,
                            negatives_per_positive=1.0, seed=0, frozen=("conv_stem", "bn1", "blocks.0"),
                            warmup_epochs=1, on_epoch=seen.append)
    assert [row["epoch"] for row in result.history] == [1, 2] and seen == result.history
    # Frozen layers keep the classifier's weights; the rest of the backbone learns.
    assert result.state["backbone.body.conv_stem.weight"].equal(stem)
    assert not result.state["backbone.body.blocks.3.0.conv_pw.weight"].equal(deep)
    # Warm-up ends at the peak rate after the first epoch; the cosine then decays it to 0.
    assert result.history[0]["lr"] == pytest.approx(1e-3) and result.history[1]["lr"] == pytest.approx(0.0, abs=1e-9)
    assert all(np.isfinite(row["train_loss"]) for row in result.history)
    assert result.best_val_map_50 == max(row["val_map_50"] for row in result.history)
    assert result.best_epoch == 1 + int(np.argmax([row["val_map_50"] for row in result.history]))
    model.load_state_dict(result.state)
    found = detect(model, val)
    assert len(found.boxes) == 4
    # The kept epoch's val scores, saved for detect_evaluate's threshold, are the kept weights' own.
    np.testing.assert_allclose(result.val_scores, found.top_scores(), rtol=1e-5)
    for boxes in found.boxes:  # in the original 160 x 200 image's pixels
        assert boxes.shape[1:] == (4,) and (boxes[:, 2] <= 160 + 1e-3).all() and (boxes[:, 3] <= 200 + 1e-3).all()
    with pytest.raises(DetectionError, match="detect.frozen names a module the backbone lacks"):
        train_detector(model, train, val, truth[8:], epochs=1, batch_size=4, lr=1e-3, weight_decay=0,
                       negatives_per_positive=1, seed=0, frozen=("stem",))
    with pytest.raises(DetectionError, match="no image with a fracture box"):
        train_detector(model, BoxedImages(paths[:1], [np.zeros((0, 4))], 128), val, truth[8:], epochs=1,
                       batch_size=2, lr=1e-3, weight_decay=0, negatives_per_positive=1, seed=0)
    # A val split without boxes trained, logged val mAP@0.5 -1 for every epoch, and detect_evaluate then failed.
    boxless = [np.zeros((0, 4))] * len(truth[8:])
    with pytest.raises(DetectionError, match="the val split holds no image with a fracture box.*evaluate.boxes"):
        train_detector(model, train, BoxedImages(val.paths, boxless, 128), boxless, epochs=1, batch_size=4, lr=1e-3,
                       weight_decay=0, negatives_per_positive=1, seed=0)


def test_the_detector_keeps_the_epoch_with_the_best_val_map_not_the_first_or_the_last(tmp_path, monkeypatch):
    """Val mAP@0.5 0.1, 0.3, 0.2 over three epochs (scripted: a detector this small finds nothing in two
    epochs of synthetic X-rays): the weights kept are epoch 2's, with epoch 2's val scores."""
    from fracture import detection  # noqa: PLC0415 - patched in this test only

    paths, truth = squares(tmp_path, 8)
    scripted, found_per_epoch = iter([0.1, 0.3, 0.2]), []

    def planted(found, _truth):
        found_per_epoch.append(found.top_scores())
        value = next(scripted)
        return {"map_50": value, "map": value / 2, "mar_100": value}

    monkeypatch.setattr(detection, "mean_average_precision", planted)
    torch.manual_seed(0)
    model = build_detector(CONFIG, timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2).state_dict())
    states = []
    result = train_detector(model, BoxedImages(paths[:6], truth[:6], 96), BoxedImages(paths[6:], truth[6:], 96),
                            truth[6:], epochs=3, batch_size=3, lr=1e-3, weight_decay=0, negatives_per_positive=1.0,
                            seed=0, on_epoch=lambda _row: states.append(
                                {k: v.detach().clone() for k, v in model.state_dict().items()}))
    assert [row["val_map_50"] for row in result.history] == [0.1, 0.3, 0.2]
    assert (result.best_epoch, result.best_val_map_50) == (2, 0.3)
    assert all(result.state[k].equal(states[1][k]) for k in states[1])
    assert not all(result.state[k].equal(states[2][k]) for k in states[2])  # epoch 3 trained on
    np.testing.assert_array_equal(result.val_scores, found_per_epoch[1])


@pytest.mark.integration
@pytest.mark.slow  # three minutes on two cores: the whole flow twice, the detector included (make test-all)
def test_the_flow_trains_scores_and_registers_the_detector_when_params_enable_it(project, subset_source):
    """The retrain flow with ``detect.enabled`` on real X-rays and boxes: the classifier's pipeline, then
    ``detect/dvc.yaml`` through DVC, then the detector's own registered model; a second run changes nothing."""
    import mlflow.pyfunc

    from flows.report import render_report
    from flows.retrain import retrain
    from fracture.config import load_params
    from fracture.decoding import decode
    from fracture.stages.detect import load_trained_detector
    from fracture.workspace import Workspace

    shutil.copytree(REPO / "detect", project / "detect")
    shrink_params(project, detect__image_size=128, detect__epochs=1, detect__batch_size=4, detect__workers=0,
                  detect__fpn_channels=64, detect__bootstrap_resamples=40, detect__enabled=True, detect__floors={},
                  register__floors={})
    result = retrain(project_dir=str(project), source=str(subset_source))
    assert result.stages_ran == ["validate", "split", "prepare", "train", "evaluate", "detect_train", "detect_evaluate"]
    reg = result.detector.registration
    assert (reg.name, reg.version, reg.created, reg.champion) == ("fracture-detector", "1", True, True), reg.summary()
    assert [c.name for c in reg.checks] == ["beats champion", "load check"] and all(c.passed for c in reg.checks)
    assert result.registration.name == "fracture-classifier" and result.registration.champion
    report = render_report(result)
    assert "## Fracture detector" in report and f"fracture-detector version {reg.version}" in report

    out = project / "outputs" / "detect"
    described = json.loads((out / "model.json").read_text())
    classifier_run = json.loads((project / "outputs" / "train" / "run.json").read_text())["run_id"]
    assert described["backbone"] == "tf_efficientnet_lite0" and described["classifier_run_id"] == classifier_run
    assert described["best_epoch"] == 1 and len(json.loads((out / "history.json").read_text())) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    test = pd.read_csv(project / "outputs" / "split" / "test.csv")
    assert metrics["n_images"] == len(test) - metrics["n_excluded"] and metrics["n_fractured"] == test["label"].sum()
    assert 0 <= metrics["map_50_ci_low"] <= metrics["map_50_ci_high"] <= 1 and 0 <= metrics["image_roc_auc"] <= 1
    assert list(pd.read_csv(out / "excluded.csv").columns) == ["split", "image_id", "reason"]
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run_data = client.get_run(described["run_id"]).data
    assert run_data.tags["classifier_run_id"] == classifier_run
    assert run_data.metrics["test_map_50"] == pytest.approx(metrics["map_50"]) == reg.score
    assert result.detector.metrics == metrics
    assert "Data and pipelines are up to date" in dvc(project, "status", "detect/dvc.yaml")
    # A consumer loads the champion detector: boxes above the threshold, in the X-ray's own pixels.
    mv = client.get_model_version_by_alias("fracture-detector", "champion")
    assert mv.run_id == described["run_id"] and float(mv.tags["threshold"]) == metrics["image_threshold"]
    served = mlflow.pyfunc.load_model(client.get_model_version_download_uri("fracture-detector", mv.version))
    params = load_params(project)
    picked = pd.concat([test[test["label"] == 1].head(2), test[test["label"] == 0].head(1)])
    paths = [project / params.ingest.dest / path for path in picked["path"]]
    requests = pd.DataFrame({"image": [path.read_bytes() for path in paths]})
    every_box, listed = served.predict(requests, params={"min_score": 0.0}), served.predict(requests)
    # The trained weights through evaluation's own path (detect) find the same boxes, in the X-ray's pixels.
    _, _, trained = load_trained_detector(Workspace(project))
    found = detect(trained, BoxedImages(paths, [np.zeros((0, 4))] * len(paths), params.detect.image_size))
    threshold = metrics["image_threshold"]
    for path, everything, shown, boxes, scores in zip(
        paths, every_box.itertuples(), listed.itertuples(), found.boxes, found.scores, strict=True
    ):
        order = np.argsort(-scores, kind="stable")
        assert everything.error == shown.error == "" and len(order) > 0, path
        every = np.array(json.loads(everything.boxes)).reshape(-1, 5)
        np.testing.assert_allclose(every[:, :4], boxes[order], atol=0.01)
        np.testing.assert_allclose(every[:, 4], scores[order], atol=1e-4)
        width, height = decode(path.read_bytes()).size
        assert (every[:, [0, 2]] <= width + 0.01).all() and (every[:, [1, 3]] <= height + 0.01).all(), path
        # By default the list holds the boxes at or above the champion's threshold, and the label follows the top one.
        assert json.loads(shown.boxes) == [box for box in json.loads(everything.boxes) if box[4] >= threshold]
        assert shown.fracture_score == pytest.approx(scores.max(), abs=1e-4)
        assert shown.label == ("fractured" if scores.max() >= threshold else "not_fractured"), path

    again = retrain(project_dir=str(project), source=str(subset_source))
    assert again.stages_ran == [] and again.nothing_changed, again.stages_ran
    assert (again.detector.registration.version, again.detector.registration.created) == ("1", False)


def test_the_served_detector_returns_the_boxes_detect_finds_with_the_classifier_s_input_checks(tmp_path):
    import base64

    import mlflow.pyfunc
    from safetensors.torch import save_file

    from fracture.intake import InputPolicy
    from fracture.packaging import save_detector_pyfunc

    torch.manual_seed(0)
    model = build_detector(CONFIG, timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2).state_dict())
    save_file(model.state_dict(), str(tmp_path / "detector.safetensors"))
    described = CONFIG.to_dict() | {"threshold": 0.0, "input": InputPolicy().to_dict()}
    served = mlflow.pyfunc.load_model(str(save_detector_pyfunc(tmp_path / "pyfunc", tmp_path / "detector.safetensors", described)))
    truth = xray_with_square(tmp_path / "x.png", size=(160, 200))
    data = (tmp_path / "x.png").read_bytes()
    out = served.predict(pd.DataFrame({"image": [data, b"not an image", base64.b64encode(data).decode()]}))
    assert list(out.columns) == ["boxes", "fracture_score", "label", "threshold", "error", "note"]
    assert out["error"][0] == "" and out["error"][2] == "" and out["error"][1].startswith("row 1: the image ")
    assert np.isnan(out["fracture_score"][1]) and out["boxes"][1] == "[]" and out["label"][1] == ""
    boxes = np.array(json.loads(out["boxes"][0]))
    assert out["boxes"][0] == out["boxes"][2] and len(boxes) > 0  # threshold 0: every box the network keeps
    assert (np.diff(boxes[:, 4]) <= 0).all() and out["fracture_score"][0] == pytest.approx(boxes[0, 4], abs=1e-4)
    # The same boxes as evaluation's path (BoxedImages + detect), in the original 160 x 200 pixels.
    found = detect(model, BoxedImages([tmp_path / "x.png"], [truth], CONFIG.image_size))
    order = np.argsort(-found.scores[0], kind="stable")
    np.testing.assert_allclose(boxes[:, :4], found.boxes[0][order], atol=0.01)
    # Also when evaluation decodes a narrow X-ray together with a wide one: a batched forward would
    # pad the narrow one to the wide one's width, and its boxes would no longer be the served ones.
    narrow_truth = xray_with_square(tmp_path / "narrow.png", size=(70, 200), box=(15, 60, 55, 100), seed=1)
    wide_truth = xray_with_square(tmp_path / "wide.png", size=(240, 120), seed=3)
    narrow = np.array(json.loads(served.predict(pd.DataFrame({"image": [(tmp_path / "narrow.png").read_bytes()]}))["boxes"][0]))
    found = detect(model, BoxedImages([tmp_path / "narrow.png", tmp_path / "wide.png"], [narrow_truth, wide_truth],
                                      CONFIG.image_size), batch_size=2)
    order = np.argsort(-found.scores[0], kind="stable")
    assert len(narrow) == len(order) > 0
    np.testing.assert_allclose(narrow[:, :4], found.boxes[0][order], atol=0.01)
    np.testing.assert_allclose(narrow[:, 4], found.scores[0][order], atol=1e-4)
    assert (boxes[:, [0, 2]] <= 160 + 0.01).all() and (boxes[:, [1, 3]] <= 200 + 0.01).all()
    strict = mlflow.pyfunc.load_model(str(save_detector_pyfunc(tmp_path / "strict", tmp_path / "detector.safetensors",
                                                               described | {"threshold": 1.01})))
    row = strict.predict(pd.DataFrame({"image": [data]})).iloc[0]
    assert row["boxes"] == "[]" and row["label"] == "not_fractured" and row["threshold"] == 1.01
    # min_score 0 returns every box (as the gate's mAP needs them), the label still at the threshold.
    row = strict.predict(pd.DataFrame({"image": [data]}), params={"min_score": 0.0}).iloc[0]
    assert row["boxes"] == out["boxes"][0] and row["label"] == "not_fractured"
    with pytest.raises(Exception, match="min_score must be a number in"):
        strict.predict(pd.DataFrame({"image": [data]}), params={"min_score": 2.0})
    # A threshold at a box's own score (as val chooses it: one val image's top score): the box is listed with a
    # score at least the threshold; rounded to 4 places it was listed below it, and the gate's load check failed.
    top = float(out["fracture_score"][0])
    at_top = mlflow.pyfunc.load_model(str(save_detector_pyfunc(tmp_path / "at-top", tmp_path / "detector.safetensors",
                                                               described | {"threshold": top})))
    listed = np.array(json.loads(at_top.predict(pd.DataFrame({"image": [data]}))["boxes"][0]))
    assert len(listed) >= 1 and (listed[:, 4] >= top).all()



def test_the_served_detector_gives_a_dicom_s_boxes_in_its_stored_pixels_when_they_are_not_square(tmp_path):
    """A DICOM whose pixels are not square is resampled to square ones for the detector; its boxes
    come back on the file's own Columns x Rows grid (an overlay, or a DICOM SR or GSPS coordinate,
    uses that grid): the boxes of its square-pixel twin (a DICOM storing the resampled pixels), scaled."""
    import base64
    import io

    import mlflow.pyfunc
    from pydicom import dcmread
    from safetensors.torch import save_file

    from fracture.intake import InputPolicy, read_xray
    from fracture.packaging import save_detector_pyfunc
    from fracture.serving import RequestRefused
    from tests.dicom_files import dicom_from_jpeg, to_bytes

    torch.manual_seed(0)
    model = build_detector(CONFIG, timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2).state_dict())
    save_file(model.state_dict(), str(tmp_path / "detector.safetensors"))
    described = CONFIG.to_dict() | {"threshold": 0.0, "input": InputPolicy().to_dict()}
    served = mlflow.pyfunc.load_model(str(save_detector_pyfunc(tmp_path / "pyfunc", tmp_path / "detector.safetensors", described)))
    xray_with_square(tmp_path / "x.png", size=(160, 200))
    for spacing, shown in (([0.1, 0.2], (320, 200)), ([0.2, 0.1], (160, 400))):  # wider than tall, taller than wide
        ds = dcmread(io.BytesIO(dicom_from_jpeg(tmp_path / "x.png", "8-bit")))  # 160 columns x 200 rows
        ds.PixelSpacing = spacing
        spaced = to_bytes(ds)
        resampled = read_xray(spaced, InputPolicy()).image
        assert resampled.size == shown
        resampled.save(tmp_path / "twin.png")
        twin = dicom_from_jpeg(tmp_path / "twin.png", "8-bit")  # square pixels: the resampled image as stored
        out = served.predict(pd.DataFrame({"image": [spaced, twin]}))
        assert (out["error"] == "").all(), out["error"].tolist()
        boxes, twin_boxes = (np.array(json.loads(b)).reshape(-1, 5) for b in out["boxes"])
        assert len(boxes) == len(twin_boxes) > 0
        assert (boxes[:, :4] >= 0).all() and (boxes[:, [0, 2]] <= 160 + 0.01).all() and (boxes[:, [1, 3]] <= 200 + 0.01).all()
        scale = np.array([160 / shown[0], 200 / shown[1]] * 2)
        np.testing.assert_allclose(boxes[:, :4], twin_boxes[:, :4] * scale, atol=0.02)
        np.testing.assert_allclose(boxes[:, 4], twin_boxes[:, 4], atol=1e-4)
        assert out["note"][0].endswith("; boxes are in its stored 160 x 200 px") and out["note"][1] == ""
    # A dict of lists of text reaches the model as one row holding the list: refused, not answered as one row.
    text = base64.b64encode(twin).decode()
    with pytest.raises(RequestRefused, match=r"^row 0: 'image' holds 2 values in one row; give one file per row"):
        served.predict({"image": [text, text]})
