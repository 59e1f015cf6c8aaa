"""The detector's own registered model and promotion gate: a paired bootstrap of mAP@0.5 on the same images."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import fracture
from fracture import detector_registry, registry
from fracture.cli import main as cli
from fracture.config import DetectParams
from fracture.consumer import ConsumerAnswer, predict_as_consumer
from fracture.detection import (
    BoxedImages,
    Detections,
    DetectorTraining,
    build_detector,
    detect,
    paired_bootstrap_map,
)
from fracture.detector_registry import (
    DetectorTestSplit,
    register_detector,
    served_detections,
)
from fracture.gate import split_fingerprint
from fracture.intake import InputPolicy
from fracture.localisation import BoxesError
from fracture.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS_CHAMPION,
    RegistryError,
    history,
)
from fracture.seen import SEEN_ARTIFACT, SeenImages
from tests.conftest import REPO, write_trained_classifier
from tests.synthetic import make_dataset, training_frame
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


def test_a_p_value_at_the_confidence_s_own_level_does_not_pass():
    """1 - 0.95 is 0.05000000000000004 in floating point: p = 0.05 (the least 39 resamples can give)
    passed "p must be < 0.05"."""
    from fracture.gate import paired_verdict

    assert paired_verdict(0.3, 0.05, 0.95) == (False, "higher, but not with 95% confidence (p must be < 0.05)")
    assert paired_verdict(0.3, 0.0499, 0.95)[0] and not paired_verdict(0.3, 0.01, 0.99)[0]


def test_the_gate_asks_a_detector_for_no_more_rows_at_once_than_it_takes(tmp_path, monkeypatch, split):
    """With serve.max_rows below 16, every request of 16 was refused, and no detector could ever be compared."""
    from fracture.detection import Detections

    sizes: list[int] = []

    class Served:
        policy = InputPolicy(max_rows=4)

        def unwrap_python_model(self):
            return self

        def predict(self, frame, params=None):
            sizes.append(len(frame))
            return pd.DataFrame({"boxes": "[]", "fracture_score": 0.0, "label": "not_fractured", "threshold": 0.5,
                                 "error": "", "note": ""}, index=range(len(frame)))

    class Loaded:
        def __enter__(self):
            return Served()

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(detector_registry, "loaded_version", lambda uri: Loaded())
    found, threshold = detector_registry.served_detections("fracture-detector", "1", split)
    assert sizes == [4, 2] and isinstance(found, Detections) and threshold == 0.5


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
    params = dataclasses.replace(DetectParams(), floors={"test_map_50": 0.1}, bootstrap_resamples=40)
    run_id, weights, described = detector_run(tmp_path, 0, 0.4)
    described |= {"threshold": 0.9}  # above some of the untrained detector's boxes

    first = register_detector(params, run_id, weights, described, split)
    assert first.decision == "promoted" and first.champion and first.created and first.score == 0.4
    assert [c.name for c in first.checks] == ["floor test_map_50", "beats champion", "load check"]
    assert all(c.passed for c in first.checks), first.summary()
    mv = client.get_model_version("fracture-detector", first.version)
    assert mv.tags["split_fingerprint"] == split.fingerprint and mv.tags["classifier_run_id"] == "c1"
    assert mv.tags["git_commit"] == "c0ffee" and "git_dirty_files" not in mv.tags
    assert "mAP@0.5 0.400" in mv.description

    # Served as a registry consumer gets it: every box with min_score 0, in the images' pixels, as
    # evaluation's own path (detect) finds them with the same weights, highest score first.
    found, threshold = served_detections("fracture-detector", first.version, split)
    assert threshold == 0.9 and len(found.boxes) == 6 and sum(len(b) for b in found.boxes) > 0
    network = build_detector(CONFIG)
    network.load_state_dict(load_file(str(weights)))
    expected = detect(network, BoxedImages(list(split.paths), [np.zeros((0, 4))] * 6, CONFIG.image_size))
    for boxes, scores, want, want_scores in zip(found.boxes, found.scores, expected.boxes, expected.scores, strict=True):
        order = np.argsort(-want_scores, kind="stable")
        np.testing.assert_allclose(boxes, want[order], atol=0.01)
        np.testing.assert_allclose(scores, want_scores[order], atol=1e-4)
    assert min(scores.min() for scores in found.scores if len(scores)) < threshold  # not only those above it

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


def test_fracture_rollback_detector_demotes_the_detector_and_its_run_is_not_promoted_again(
    client, split, tmp_path, monkeypatch, capsys
):
    """``fracture rollback`` acted on register.model_name alone: an operator rolled the detector back
    by moving its alias in the MLflow UI, which tags nothing, and the next scheduled run that
    registered the demoted version's run promoted it again. ``--detector`` gives the detector the
    classifier's rollback: the version to return to loaded in a consumer's Python first, the demoted
    version and its run tagged, and the history of both."""
    params, first, better_id, weights, described = champion_and_contender(
        split, tmp_path, monkeypatch, {0}, {0, 1, 2, 3}, 0.9
    )
    second = register_detector(params, better_id, weights, described, split, isolated=False)
    assert second.decision == "promoted"
    name = params.model_name

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="registered model 'fracture-classifier'"):  # the classifier, as before
        cli(["rollback", "--reason", "boxes drawn off the fracture on wrist X-rays"])
    # The version returned to is loaded as a consumer loads it: the detector's pyfunc, in its own Python.
    loaded = []
    monkeypatch.setattr(registry, "predict_as_consumer", lambda uri, files: loaded.append(uri) or predict_as_consumer(uri, files))
    cli(["rollback", "--detector", "--reason", "boxes drawn off the fracture on wrist X-rays"])
    assert loaded == [f"models:/{name}/{first.version}"]
    out = capsys.readouterr().out
    assert (f"{name}: champion rolled back from version {second.version} to version {first.version}; "
            "previous-champion: none") in out
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == first.version
    assert not client.get_model_version(name, second.version).aliases
    demoted = client.get_model_version(name, second.version).tags
    assert demoted["rolled_back_to"] == first.version
    assert demoted["rolled_back_reason"] == "boxes drawn off the fracture on wrist X-rays"
    run_tags = client.get_run(better_id).data.tags
    assert (run_tags["rolled_back_version"], run_tags["rolled_back_to"]) == (second.version, first.version)
    restored = client.get_model_version(name, first.version).tags
    assert restored["gate_decision"] == "restored"
    assert restored["gate_reason"].startswith(f"restored by rollback from version {second.version} at ")
    assert history(client, name, second.version)[-1]["event"] == "rolled back"
    assert history(client, name, first.version)[-1]["event"] == "restored"

    # The next scheduled run registers the demoted version's run again: held back, not promoted.
    again = register_detector(params, better_id, weights, described, split, isolated=False)
    assert (again.version, again.created, again.decision, again.champion) == (second.version, False, "unchanged", False)
    assert f"version {second.version} was rolled back from champion" in again.reason
    # ... and says how to serve it again with the detector's command, not the classifier's
    assert f'choose it by hand: fracture rollback --detector --to {second.version} --reason "..."' in again.reason
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == first.version

    # A refusal's suggested commands act on the detector too, not on the classifier.
    with pytest.raises(SystemExit, match=r"fracture rollback: registered model 'fracture-detector' has no "
                                         r"'previous-champion' .*fracture rollback --detector --to <version>"):
        cli(["rollback", "--detector", "--reason", "again"])


def test_with_the_detector_champion_deleted_the_gate_compares_with_previous_champion(
    client, split, tmp_path, monkeypatch
):
    """Deleting the detector's champion version removes its alias; previous-champion remains. The
    next detector must beat that one, as the classifier's gate has it, where it was promoted as the
    "first version to pass the gate", compared with nothing, however much worse it found boxes."""
    params, first, better_id, weights, described = champion_and_contender(
        split, tmp_path, monkeypatch, {0}, {0, 1, 2, 3}, 0.9
    )
    name, truth = params.model_name, list(split.truth)
    second = register_detector(params, better_id, weights, described, split, isolated=False)
    assert second.decision == "promoted"
    client.delete_model_version(name, second.version)
    # previous-champion's own run registered again is left as it is: restoring it is a rollback's.
    kept = register_detector(params, first.run_id, weights, described, split, isolated=False)
    assert (kept.version, kept.decision) == (first.version, "unchanged")
    assert 'this version is previous-champion: `fracture rollback --detector --reason "..."` restores it' in kept.reason
    assert client.get_model_version(name, first.version).tags["gate_decision"] == "promoted"

    worse_id, _, _ = detector_run(tmp_path, 3, 0.9)
    better_again_id, _, _ = detector_run(tmp_path, 4, 0.9)
    answers = {first.version: finds(truth, {0}, seed=0), "3": finds(truth, set(), seed=0),
               "4": finds(truth, {0, 1, 2, 3}, seed=0)}
    monkeypatch.setattr(detector_registry, "served_detections", lambda name_, version, s: (answers[version], 0.05))
    worse = register_detector(params, worse_id, weights, described, split, isolated=False)
    assert (worse.version, worse.decision, worse.champion) == ("3", "challenger", False), worse.summary()
    assert worse.reason.startswith("no version holds champion (the champion version was deleted from the registry, "
                                   f"or its alias removed): compared with previous-champion v{first.version}")
    assert f'`fracture rollback --detector --reason "..."` restores v{first.version} as champion' in worse.reason
    assert client.get_model_version(name, "3").tags["gate_compared_with"] == first.version
    assert {a: str(v) for a, v in client.get_registered_model(name).aliases.items()} == {
        PREVIOUS_CHAMPION: first.version, CHALLENGER: "3"}

    better = register_detector(params, better_again_id, weights, described, split, isolated=False)
    assert (better.version, better.decision) == ("4", "promoted"), better.summary()
    assert f"compared with previous-champion v{first.version}" in better.reason
    assert "higher with 95% confidence" in better.reason
    assert {a: str(v) for a, v in client.get_registered_model(name).aliases.items()} == {
        CHAMPION: "4", PREVIOUS_CHAMPION: first.version, CHALLENGER: "3"}


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


def test_a_detector_version_whose_registration_has_not_finished_is_refused_before_the_gate(
    client, split, tmp_path, monkeypatch
):
    """A version a registry plugin or an asynchronous copy left PENDING_REGISTRATION has no model to
    serve: the detector's registration refuses it as the classifier's does, where it went through
    the gate and could be made champion."""
    import sqlite3
    from contextlib import closing

    run_id, weights, described = detector_run(tmp_path, 0, 0.4)
    recorded = detector_registry._record_provenance

    def left_pending(client, mv, tags):
        database = mlflow.get_tracking_uri().removeprefix("sqlite:///")
        with closing(sqlite3.connect(database)) as con, con:
            con.execute("update model_versions set status = 'PENDING_REGISTRATION' where version = ?", (int(mv.version),))
        return recorded(client, mv, tags)

    monkeypatch.setattr(detector_registry, "_record_provenance", left_pending)
    monkeypatch.setattr(detector_registry, "_gate", lambda *a, **k: pytest.fail("went through the gate"))
    with pytest.raises(RegistryError, match=r"fracture-detector version 1 is PENDING_REGISTRATION, not READY: the "
                                            r"gate cannot score it, and it cannot be made champion"):
        register_detector(DetectParams(), run_id, weights, described, split, isolated=False)
    assert not client.get_registered_model("fracture-detector").aliases


class Registering(Exception):
    """Raised where registration would create the version: the run passed every check before it."""


def _registering(*args, **kwargs):
    raise Registering


def test_a_detector_run_whose_figures_are_another_thresholds_than_the_served_one_is_refused(client, split, tmp_path,
                                                                                            monkeypatch):
    """As the classifier's: DVC can restore an earlier detect_evaluate's outputs (and the served
    image threshold) from its run cache without logging their figures to the run. Refused before
    anything is registered; the run holding this threshold's figures goes on to registration."""
    run_id, weights, described = detector_run(tmp_path, 0, 0.4)
    client.log_metric(run_id, "test_image_threshold", 0.2)
    with pytest.raises(RegistryError, match=r"taken at image threshold 0\.2, but the detector would be served at "
                                            r"0\.05 .*dvc repro --force detect/dvc\.yaml:detect_evaluate"):
        register_detector(DetectParams(), run_id, weights, described, split)
    assert not client.search_model_versions("name = 'fracture-detector'")

    monkeypatch.setattr(detector_registry, "_ensure_version", _registering)
    client.log_metric(run_id, "test_image_threshold", 0.05)
    with pytest.raises(Registering):
        register_detector(DetectParams(), run_id, weights, described, split)


def test_a_detector_run_evaluated_on_another_test_split_is_refused(client, split, tmp_path, monkeypatch):
    """The main job drew the split again (new data) and detect/dvc.yaml was not rerun: the detector's
    figures were the old split's, and the gate scored it on images it had trained on. Refused, as
    the classifier's run is, before anything is registered; the run of this split goes on."""
    run_id, weights, described = detector_run(tmp_path, 0, 0.4)
    client.set_tag(run_id, "split_fingerprint", "5b8b9ee4a7ea" + "0" * 52)
    with pytest.raises(RegistryError, match=rf"detector run {run_id} was evaluated on another test split than the one "
                                            rf"given \(fingerprint {split.fingerprint[:12]}, the run's 5b8b9ee4a7ea.*"
                                            r"dvc repro detect/dvc\.yaml\), then register"):
        register_detector(DetectParams(), run_id, weights, described, split)
    assert not client.search_model_versions("name = 'fracture-detector'")

    monkeypatch.setattr(detector_registry, "_ensure_version", _registering)
    client.set_tag(run_id, "split_fingerprint", split.fingerprint)
    with pytest.raises(Registering):
        register_detector(DetectParams(), run_id, weights, described, split)


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


@pytest.mark.parametrize(("row", "problem"), [
    ({"threshold": 0.5}, "threshold 0.5 instead of 0.05"),
    ({"boxes": "[[1.0, 2.0, 30.0, 40.0]]"}, "boxes not [x0, y0, x1, y1, score >= threshold]: [[1.0, 2.0, 30.0, 40.0]]"),
    ({"boxes": "[[1.0, 2.0, 30.0, 40.0, 0.01]]"},
     "boxes not [x0, y0, x1, y1, score >= threshold]: [[1.0, 2.0, 30.0, 40.0, 0.01]]"),
    ({"label": "not_fractured"}, "label 'not_fractured' for score 0.9000"),
    ({"error": "row 0: the image is not a PNG"}, "error 'row 0: the image is not a PNG'"),
])
def test_the_detectors_load_check_fails_an_answer_not_in_the_served_format(tmp_path, monkeypatch, row, problem):
    """A version that loads but answers out of its format (another threshold, a box without its score or
    under the threshold, a label that does not follow the top score, an error) does not pass."""
    image = tmp_path / "fractured.png"
    good = {"boxes": "[[1.0, 2.0, 30.0, 40.0, 0.9]]", "fracture_score": 0.9, "label": "fractured", "threshold": 0.05,
            "error": ""}
    answer = ConsumerAnswer(pd.DataFrame([good | row]), "/models/v2/code/fracture/__init__.py", files=(str(image),))
    monkeypatch.setattr(detector_registry, "predict_as_consumer", lambda uri, files: answer)
    check = detector_registry.load_check("fracture-detector", "2", image, 0.05)
    assert not check.passed and check.detail == f"models:/fracture-detector/2 on fractured.png: {problem}"


# --- the images a champion learnt from --------------------------------------------------------------


def listing(split: DetectorTestSplit) -> DetectorTestSplit:
    """The split as ``detect-register`` builds it: each image's id, content hash and group (images 0
    and 1 are near-duplicates, one group)."""
    ids = tuple(p.name for p in split.paths)
    return dataclasses.replace(split, image_ids=ids, sha256=tuple(f"sha-{i}" for i in ids),
                               groups=("g0", "g0", "g2", "g3", "g4", "g5"))


def learnt_from(run_id: str, ids: list[str], sha256: list[str]) -> None:
    """Run ``run_id`` lists ``ids`` (and files with the contents ``sha256``) as the images it learnt from."""
    frame = pd.DataFrame({"image_id": ids + [f"renamed-{h}.png" for h in sha256],
                          "sha256": [f"sha-{i}" for i in ids] + sha256})
    with mlflow.start_run(run_id=run_id):
        mlflow.log_text(SeenImages.table({"train": frame}), SEEN_ARTIFACT)


def answering(truth: list[np.ndarray], paths: tuple[Path, ...], hits: dict[str, set[int]], scored: list):
    """``served_detections`` where version ``v`` finds the boxes of the images ``hits[v]`` (by their
    place in the whole split), answering for the images it is sent; ``scored`` records them."""
    everything = {v: finds(truth, found, seed=0) for v, found in hits.items()}

    def served(name, version, s):
        scored.append((str(version), [p.name for p in s.paths]))
        at = [paths.index(p) for p in s.paths]
        found = everything[str(version)]
        return Detections([found.boxes[i] for i in at], [found.scores[i] for i in at]), 0.05

    return served


def test_test_images_the_champion_detector_learnt_from_are_left_out_of_the_comparison(client, split, tmp_path,
                                                                                       monkeypatch):
    """After a grown export's split is drawn afresh, the champion is not scored on what it learnt:
    image 0 by name, its near-duplicate 1 with it, and image 4 under another name (by content)."""
    split = listing(split)
    params, first, second_id, weights, described = champion_and_contender(
        split, tmp_path, monkeypatch, {0, 1}, {2, 3}, 0.9
    )
    learnt_from(first.run_id, [split.image_ids[0], "IMG-not-in-this-split.png"], [split.sha256[4]])
    # Memorised: the champion finds the boxes of the images it trained on, and only those.
    truth, scored = list(split.truth), []
    second = str(int(first.version) + 1)
    monkeypatch.setattr(detector_registry, "served_detections",
                        answering(truth, split.paths, {first.version: {0, 1}, second: {2, 3}}, scored))

    new = register_detector(params, second_id, weights, described, split, isolated=False)
    unseen = [split.image_ids[i] for i in (2, 3, 5)]
    assert scored == [(second, unseen), (first.version, unseen)]  # neither scored on the other 3
    check = next(c for c in new.checks if c.name == "scored with champion")
    assert check.passed and check.detail == (
        f"v{second} and champion v{first.version} found boxes through the registry on 3 of this test split's 6 images "
        f"(2 with boxes): the other 3, which champion v{first.version} was trained or validated on (or which are "
        "linked to such an image), are left out")
    assert new.decision == "promoted", new.summary()
    tags = client.get_model_version("fracture-detector", new.version).tags
    assert (tags["gate_images"], tags["gate_images_left_out"]) == ("3", "3")
    # Its figures are those of the 3 images alone, where the champion finds no fracture.
    found = {v: finds(truth, hits, seed=0) for v, hits in ((second, {2, 3}), (first.version, {0, 1}))}
    kept = [truth[i] for i in (2, 3, 5)]
    ours, theirs = (Detections([found[v].boxes[i] for i in (2, 3, 5)], [found[v].scores[i] for i in (2, 3, 5)])
                    for v in (second, first.version))
    expected = paired_bootstrap_map(kept, ours, theirs, 100, seed=0)
    assert tags["gate_map_50_difference"] == f"{expected.difference:.4f}" and expected.map_b == 0


def test_a_champion_detector_that_learnt_every_fractured_test_image_is_not_compared_and_stays(client, split, tmp_path,
                                                                                              monkeypatch):
    split = listing(split)
    params, first, second_id, weights, described = champion_and_contender(
        split, tmp_path, monkeypatch, {0, 1, 2, 3}, {0, 1, 2, 3}, 0.9
    )
    learnt_from(first.run_id, list(split.image_ids[:4]), [])
    scored = []
    monkeypatch.setattr(detector_registry, "served_detections", lambda *a: scored.append(a) or pytest.fail("scored"))

    new = register_detector(params, second_id, weights, described, split, isolated=False)
    assert new.decision == "challenger" and not scored
    assert str(client.get_model_version_by_alias("fracture-detector", CHAMPION).version) == first.version
    check = new.checks[-1]
    assert check.name == "compared with champion" and not check.passed
    assert check.detail.startswith(f"champion v{first.version} was trained or validated on 4 of this test split's 6 "
                                   "images (or on images linked to them), and the other 2 hold no fracture box: "
                                   "mAP@0.5 cannot rank the two, so they are not compared, and the champion stays")
    tags = client.get_model_version("fracture-detector", new.version).tags
    assert not {"gate_images", "gate_images_left_out"} & set(tags), tags


def test_the_detector_run_lists_what_it_and_its_backbone_learnt_from_and_register_knows_each_test_image(
    client, tmp_path, monkeypatch
):
    """The train and val tables it learns from, and what the classifier whose weights it starts from
    learnt besides (here a test image: the classifier was trained before ``dvc repro split`` drew
    the split again); ``detect-register`` then gives the gate each test image's id, hash and group."""
    from fracture.config import load_params
    from fracture.stages import detect as stage
    from fracture.workspace import Workspace

    params = load_params(REPO)
    params = dataclasses.replace(params, detect=dataclasses.replace(params.detect, image_size=128, fpn_channels=64))
    root = tmp_path / "project"
    dataset = root / params.ingest.dest
    make_dataset(dataset, 6, 6)
    frame = training_frame(dataset).assign(sha256=lambda f: "h" + f["image_id"], group=lambda f: f["image_id"])
    frame.loc[frame["image_id"] == "IMG0000005.jpg", "group"] = "IMG0000004.jpg"  # near-duplicates
    tables = {"train": [0, 1, 6, 7], "val": [2, 8, 9], "test": [3, 4, 5, 10, 11]}
    workspace = Workspace(root)
    workspace.write_split({k: frame.iloc[rows] for k, rows in tables.items()}, {})
    boxed = [i for i in range(6) if i != 3]  # IMG0000003.jpg: fractured, but no box
    coco = {"images": [{"id": i, "file_name": f"IMG{i:07d}.jpg", "width": 80, "height": 96} for i in boxed],
            "annotations": [{"id": i, "image_id": i, "bbox": [10, 10, 30, 30]} for i in boxed]}
    (dataset / params.evaluate.boxes).parent.mkdir(parents=True)
    (dataset / params.evaluate.boxes).write_text(json.dumps(coco))

    with mlflow.start_run() as classifier:
        before = frame.iloc[[0, 1, 6, 7, 4]]  # IMG0000004.jpg was in the train split it trained on
        mlflow.log_text(SeenImages.table({"train": before, "val": frame.iloc[[2, 8, 9]]}), SEEN_ARTIFACT)
    write_trained_classifier(workspace, classifier.info.run_id, classifier.info.experiment_id)

    def trained(model, train, val, val_truth, **kwargs):  # the recipe's own test, not this one's
        return DetectorTraining(model.state_dict(), 1, 0.0, [{"epoch": 1, "val_map_50": 0.0}], 0.0, np.zeros(len(val)))

    monkeypatch.setattr(stage, "train_detector", trained)
    described = stage.run_detect_train(params, workspace)

    listed = pd.read_csv(Path(client.download_artifacts(str(described["run_id"]), SEEN_ARTIFACT, str(tmp_path))))
    assert listed.groupby("split")["image_id"].apply(sorted).to_dict() == {
        "backbone": ["IMG0000004.jpg"],
        "train": ["IMG0000000.jpg", "IMG0000001.jpg", "IMG0000006.jpg", "IMG0000007.jpg"],
        "val": ["IMG0000002.jpg", "IMG0000008.jpg", "IMG0000009.jpg"],
    }

    # detect_evaluate tags the run with the test split it scored, which registration checks the split against.
    metrics = stage.run_detect_evaluate(params, workspace)
    evaluated_on = client.get_run(str(described["run_id"])).data.tags["split_fingerprint"]
    # The top box as an image classifier carries the classifier's intervals, drawn over the test groups.
    for name in ("image_roc_auc", "image_sensitivity", "image_specificity"):
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"], name
    assert metrics["image_sensitivity_ci_high"] - metrics["image_sensitivity_ci_low"] > 0.3  # 2 fractured images
    (workspace.detect_metrics).write_text(json.dumps({"image_threshold": 0.5}))
    given = []
    monkeypatch.setattr(stage, "register_detector", lambda *args: given.append(args[4]))
    stage.run_detect_register(params, workspace)
    test = given[0]
    assert test.fingerprint == evaluated_on
    assert test.image_ids == ("IMG0000004.jpg", "IMG0000005.jpg", "IMG0000010.jpg", "IMG0000011.jpg")
    assert test.sha256 == tuple(f"h{i}" for i in test.image_ids)
    assert test.groups == ("IMG0000004.jpg", "IMG0000004.jpg", "IMG0000010.jpg", "IMG0000011.jpg")
    # As champion, the detector is not scored on IMG0000004.jpg, which its backbone learnt, nor on its near-duplicate.
    seen = SeenImages.from_table(listed.to_csv(index=False), "")
    assert test.seen_by(seen).tolist() == [True, True, False, False]
    # Boxes drawn on another frame than the image shows (here width and height swapped, as a tool that
    # ignores a JPEG's EXIF orientation states them) were scaled onto it as they were: refused, named.
    coco["images"][0] |= {"width": 96, "height": 80}
    (dataset / params.evaluate.boxes).write_text(json.dumps(coco))
    with pytest.raises(BoxesError, match=r"IMG0000000\.jpg: its boxes in .* are for a 96 x 80 px image, but "
                                         r".*IMG0000000\.jpg shows 80 x 96 px"):
        stage.run_detect_train(params, workspace)
