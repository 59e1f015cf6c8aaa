"""The promotion gate and the registry against a real MLflow sqlite store and real models.

The floors read the metrics the evaluate stage logs into the training run, so the runs here log
chosen metrics next to a real Lite0 model at 64 px. The comparison with the champion scores both
models through the registry on the same real FracAtlas X-rays: the models here rank those images
well, badly or at random (:func:`tests.conftest.ranking_model_files`). The paired test itself is
checked on hand-made score vectors whose answer is known.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import REQUEST_LIMIT_EXCEEDED
from safetensors.torch import save_file

import fracture
from fracture import registry as registry_module
from fracture import scoring as scoring_module
from fracture.cli import main as cli
from fracture.config import ConfigError, RegisterParams, load_params, parse_params
from fracture.consumer import ConsumerAnswer, ConsumerError, predict_as_consumer
from fracture.data_config import DataConfig
from fracture.evaluation import delong_paired
from fracture.gate import (
    EvaluatedSplit,
    PairedScores,
    SplitTableError,
    against_champion,
    compare,
    floors,
    split_fingerprint,
)
from fracture.inference import ServingConfig
from fracture.intake import InputPolicy
from fracture.packaging import REQUIREMENTS, requirements
from fracture.registry import RegistryError
from fracture.registry import register as register_isolated
from fracture.registry import rollback as rollback_isolated
from fracture.scoring import load_check, served_scores
from fracture.seen import SEEN_ARTIFACT, SeenImages, SeenListError
from fracture.stages import register as stage_register
from fracture.stages.register import input_policy, run_register
from fracture.workspace import EvaluateResult, TrainedModel, Workspace
from tests.conftest import REPO, pick_ids, ranking_model_files, untrained_model_files

NAME = "fracture-classifier"
SPLIT_A = "a" * 64


def register(*args, **kwargs):
    """The gate's rules, with each version loaded and scored in this process: a consumer's Python
    of its own per version (the product's default, tested apart below) costs 10-20 s each."""
    return register_isolated(*args, **{"isolated": False} | kwargs)


def rollback(*args, **kwargs):
    return rollback_isolated(*args, **{"isolated": False} | kwargs)


SPLIT_B = "b" * 64
DATA = "0123456789abcdef0123456789abcdef.dir"
PARAMS = RegisterParams(
    model_name=NAME,
    experiment="t",
    confidence=0.95,
    sensitivity_tolerance=0.05,
    floors={"test_roc_auc": 0.80, "test_recall": 0.80},
)


# --- the gate's rules, on their own ---------------------------------------------------------------


def failed(checks) -> list[str]:
    return [c.name for c in checks if not c.passed]


def test_floors_read_the_run_metrics():
    assert failed(floors(PARAMS, {"test_roc_auc": 0.90, "test_recall": 0.9})) == []
    checks = floors(PARAMS, {"test_roc_auc": 0.79, "test_recall": 0.95})
    assert failed(checks) == ["floor test_roc_auc"]
    assert checks[0].detail == "0.7900 < 0.8"
    assert failed(floors(PARAMS, {"test_roc_auc": 0.95, "test_recall": 0.5})) == ["floor test_recall"]


def test_a_floor_check_shows_the_metric_on_the_side_of_the_floor_it_is_on():
    # Four decimals round 0.84996 to the floor: "0.8500 < 0.85" read as a contradiction.
    params = dataclasses.replace(PARAMS, floors={"test_roc_auc": 0.85, "test_recall": 0.8, "test_specificity": 0.60004})
    auc, recall, specificity = floors(params, {"test_roc_auc": 0.84996, "test_recall": 0.8, "test_specificity": 0.60004})
    assert not auc.passed and auc.detail == "0.84996 < 0.85"
    assert recall.passed and recall.detail == "0.8000 >= 0.8"
    assert specificity.passed and specificity.detail == "0.60004 >= 0.60004"  # 0.6000 would read as below it
    (close,) = floors(dataclasses.replace(PARAMS, floors={"test_recall": 0.8}), {"test_recall": 0.8 - 1e-12})
    assert close.detail == "0.799999999999 < 0.8"


def test_delong_agrees_with_a_paired_stratified_bootstrap():
    """The DeLong standard error of an AUC difference is what resampling the images gives."""
    from sklearn.metrics import roc_auc_score
    from sklearn.utils import resample

    rng = np.random.default_rng(3)
    y = np.r_[np.ones(90), np.zeros(400)].astype(int)
    a = rng.normal(size=len(y)) + 1.6 * y
    b = 0.6 * a + 0.8 * rng.normal(size=len(y)) + 0.4 * y  # correlated with a, as two models of one task are
    result = delong_paired(y, a, b)
    assert result.auc_a == pytest.approx(roc_auc_score(y, a)) and result.auc_b == pytest.approx(roc_auc_score(y, b))
    state = np.random.RandomState(0)
    diffs = []
    for _ in range(500):
        yy, aa, bb = resample(y, a, b, stratify=y, random_state=state)
        diffs.append(roc_auc_score(yy, aa) - roc_auc_score(yy, bb))
    delong_se = (result.ci_high - result.ci_low) / 2 / 1.959964
    assert delong_se == pytest.approx(np.std(diffs), rel=0.15)
    # The same pair the other way round: the difference flips, the evidence does not change.
    swapped = delong_paired(y, b, a)
    assert swapped.difference == pytest.approx(-result.difference) and swapped.p_value == pytest.approx(result.p_value)


def test_where_delong_has_no_spread_to_estimate_a_randomisation_test_decides():
    """A perfect separation against constant scores leaves DeLong's variance at zero whether or not
    the difference is real (p = 0 let a random model beat a constant one in 1 draw of 6 at 2 images
    a class). Swapping each image's two scores at random gives the evidence instead: none at 2
    images a class, overwhelming at 10 when one model ranks every image right and the other wrong."""
    y = np.array([1, 1, 0, 0])
    small = delong_paired(y, np.array([0.9, 0.8, 0.2, 0.1]), np.full(4, 0.5))
    assert small.difference == pytest.approx(0.5) and small.p_value > 0.1
    y = np.r_[np.ones(10), np.zeros(10)].astype(int)
    right = np.r_[np.linspace(0.9, 0.6, 10), np.linspace(0.4, 0.1, 10)]
    large = delong_paired(y, right, 1 - right)
    assert (large.difference, large.ci_low, large.ci_high) == (1.0, 1.0, 1.0) and large.p_value < 0.001
    same = delong_paired(y, right, right * 0.5)
    assert (same.difference, same.p_value) == (0.0, 1.0)
    # Random models against a constant one at 2 images a class: "beats" at p < 0.05 rarely, not 1 in 6.
    rng = np.random.default_rng(0)
    y = np.array([1, 1, 0, 0])
    wins = sum(delong_paired(y, rng.random(4), np.full(4, 0.5)).p_value < 0.05 for _ in range(60))
    assert wins == 0


def hand_made(champion: np.ndarray, candidate: np.ndarray, y: np.ndarray, thresholds=(0.5, 0.5)) -> PairedScores:
    return PairedScores(y, candidate, thresholds[0], champion, thresholds[1], "1")


def scores_of_a_task(seed: int = 0):
    """Labels and a champion's scores: 60 fractured of 360, AUC about 0.76."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(60), np.zeros(300)].astype(int)
    return y, 1 / (1 + np.exp(-(rng.normal(size=len(y)) + 1.0 * y - 1.0))), rng


def test_identical_models_are_not_promoted():
    y, champion, _ = scores_of_a_task()
    comparison = compare(hand_made(champion, champion.copy(), y), 0.95)
    a = comparison.auc
    assert (a.difference, a.ci_low, a.ci_high, a.p_value) == (0.0, 0.0, 0.0, 1.0)
    beats, sensitivity, specificity = against_champion(PARAMS, comparison)
    assert not beats.passed and beats.detail.endswith("not higher")
    assert sensitivity.passed and "+0.0000" in sensitivity.detail
    assert specificity.passed and "+0.0000" in specificity.detail


def test_a_clearly_better_model_is_promoted():
    y, champion, rng = scores_of_a_task()
    better = 1 / (1 + np.exp(-(rng.normal(size=len(y)) + 3.0 * y - 1.5)))
    comparison = compare(hand_made(champion, better, y), 0.95)
    a = comparison.auc
    assert a.difference > 0.1 and a.ci_low > 0 and a.p_value < 1e-6
    checks = against_champion(PARAMS, comparison)
    assert failed(checks) == []
    assert "higher with 95% confidence" in checks[0].detail and "on the same 360 images" in checks[0].detail
    assert comparison.tags()["gate_compared_with"] == "1" and float(comparison.tags()["gate_p_value"]) < 1e-6


def test_a_model_better_only_by_noise_is_not_promoted():
    """One fractured image moved above one non-fractured image: higher, but by chance alone."""
    y, champion, _ = scores_of_a_task()
    candidate = champion.copy()
    fractured = np.flatnonzero(y == 1)
    lowest = fractured[np.argmin(champion[fractured])]
    above = np.sort(champion[y == 0])
    candidate[lowest] = above[np.searchsorted(above, champion[lowest])] + 1e-9  # past the next negative
    comparison = compare(hand_made(champion, candidate, y), 0.95)
    a = comparison.auc
    assert a.difference == pytest.approx(1 / (60 * 300)) and a.p_value > 0.05 and a.ci_low < 0 < a.ci_high
    beats, *_ = against_champion(PARAMS, comparison)
    assert not beats.passed and "higher, but not with 95% confidence" in beats.detail
    assert beats.detail.endswith("(p must be < 0.05)")
    # Most of a grown export's test split was the champion's training images: the few left say little.
    beats, *_ = against_champion(PARAMS, dataclasses.replace(comparison, left_out=361))
    assert "on the same 360 images, 361 it was trained or validated on left out: " in beats.detail
    assert beats.detail.endswith("; with most of the test split left out, weigh the newcomer by its cross-validated "
                                 "(out-of-fold) figures too")
    # With no confidence asked for, any gain is enough.
    lenient = RegisterParams(NAME, "t", confidence=0.0)
    assert against_champion(lenient, comparison)[0].passed


def test_a_better_ranking_that_costs_sensitivity_at_the_served_threshold_is_not_promoted():
    y, champion, rng = scores_of_a_task()
    better = 1 / (1 + np.exp(-(rng.normal(size=len(y)) + 3.0 * y - 1.5)))
    fractured = np.sort(better[y == 1])
    # The candidate serves at a threshold that misses a quarter of the fractures; the champion at one that misses none.
    comparison = compare(hand_made(champion, better, y, thresholds=(fractured[15], 0.0)), 0.95)
    assert comparison.candidate_sensitivity == pytest.approx(0.75) and comparison.champion_sensitivity == 1.0
    beats, sensitivity, specificity = against_champion(PARAMS, comparison)
    assert beats.passed and not sensitivity.passed and specificity.passed
    assert "-0.2500, beyond the tolerance 0.05" in sensitivity.detail


def test_a_better_ranking_whose_threshold_costs_specificity_is_not_promoted():
    """The threshold bought sensitivity with false alarms: readers clear a tenth more normal X-rays."""
    y, champion, rng = scores_of_a_task()
    better = 1 / (1 + np.exp(-(rng.normal(size=len(y)) + 3.0 * y - 1.5)))
    negatives = np.sort(better[y == 0])
    theirs = np.sort(champion[y == 0])
    # The champion's threshold flags 30 of the 300 normal X-rays, the candidate's 60: it alarms twice as often.
    thresholds = ((negatives[239] + negatives[240]) / 2, (theirs[269] + theirs[270]) / 2)
    comparison = compare(hand_made(champion, better, y, thresholds=thresholds), 0.95)
    assert comparison.candidate_specificity == pytest.approx(0.8) and comparison.champion_specificity == pytest.approx(0.9)
    beats, sensitivity, specificity = against_champion(PARAMS, comparison)
    assert beats.passed and sensitivity.passed and not specificity.passed
    assert specificity.detail == (
        "specificity 0.8000 vs champion v1's 0.9000 at their served thresholds: -0.1000, beyond the tolerance 0.05"
    )
    assert comparison.tags()["gate_specificity_change"] == "-0.1000"


def test_previous_champion_standing_in_for_the_champion_is_named_as_what_it_is():
    y, champion, rng = scores_of_a_task()
    better = 1 / (1 + np.exp(-(rng.normal(size=len(y)) + 3.0 * y - 1.5)))
    comparison = compare(hand_made(champion, better, y), 0.95, "previous-champion")
    assert comparison.against == "previous-champion"
    details = [c.detail for c in against_champion(PARAMS, comparison)]
    assert all(" vs previous-champion v1's " in d for d in details), details
    # Within a looser tolerance it passes.
    assert against_champion(RegisterParams(NAME, "t", specificity_tolerance=0.1), comparison)[2].passed


def test_one_image_of_a_class_shows_no_difference_however_the_aucs_differ():
    """With one fractured image DeLong's variance cannot be estimated; reading it as 0 would make
    any higher AUC a certain one, and the gate would promote on it."""
    y = np.array([1, 0, 0, 0, 0])
    result = delong_paired(y, np.array([0.9, 0.1, 0.2, 0.3, 0.4]), np.array([0.35, 0.1, 0.2, 0.3, 0.4]))
    assert result.difference == pytest.approx(0.25)
    assert (result.ci_low, result.ci_high, result.p_value) == (-1.0, 1.0, 1.0)


def test_a_pair_of_unequal_lengths_or_one_class_is_refused():
    with pytest.raises(ValueError, match="differ in length"):
        delong_paired(np.array([0, 1]), np.array([0.1, 0.9]), np.array([0.2]))
    with pytest.raises(ValueError, match="needs both classes: 0 fractured"):
        delong_paired(np.array([0, 0]), np.array([0.1, 0.9]), np.array([0.2, 0.3]))


def test_split_fingerprint_ignores_row_order_and_paths_but_not_images_or_labels(tmp_path):
    frame = pd.DataFrame({"image_id": ["b.jpg", "a.jpg"], "path": ["x/b.jpg", "x/a.jpg"], "label": [1, 0]})
    same = frame.iloc[::-1].assign(path=["y/a.jpg", "y/b.jpg"])
    assert split_fingerprint(frame) == split_fingerprint(same)
    assert split_fingerprint(frame) != split_fingerprint(frame.assign(label=[0, 0]))
    assert split_fingerprint(frame) != split_fingerprint(frame.assign(image_id=["b.jpg", "c.jpg"]))
    frame.to_csv(tmp_path / "test.csv", index=False)
    split = EvaluatedSplit.from_csv(tmp_path / "test.csv", tmp_path / "data")
    assert (split.fingerprint, split.images, split.check_image) == (split_fingerprint(frame), 2, tmp_path / "data/x/b.jpg")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"path": ""}, r"1 row\(s\) with no image path \(lines 3\)"),
        ({"label": ""}, r"1 row\(s\) with a label other than 0 or 1 \(lines 3\)"),
        ({"label": 2}, r"1 row\(s\) with a label other than 0 or 1 \(lines 3\)"),
    ],
)
def test_a_test_split_table_with_a_row_lacking_its_image_or_label_is_refused_naming_the_lines(tmp_path, row, message):
    """The split's fingerprint covers every row, so every row must be scored by the gate."""
    frame = pd.DataFrame({"image_id": ["a.jpg", "b.jpg", "c.jpg"], "path": ["a.jpg", "b.jpg", "c.jpg"], "label": [1, 0, 0]})
    for column, value in row.items():
        frame[column] = frame[column].astype(object)
        frame.loc[1, column] = value
    frame.to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(SplitTableError, match=f"test.csv: {message}; rebuild it with `dvc repro split`"):
        EvaluatedSplit.from_csv(tmp_path / "test.csv", tmp_path)


def test_register_params_are_checked():
    raw = yaml_params()
    raw["register"]["floors"] = {"test_roc_auc": "high"}
    with pytest.raises(ConfigError, match="register.floors"):
        parse_params(raw)
    raw["register"].update(floors={}, confidence=1.0)
    with pytest.raises(ConfigError, match="register.confidence must be a number in \\[0, 1\\)"):
        parse_params(raw)
    raw["register"].update(confidence=0.95, sensitivity_tolerance=-0.1)
    with pytest.raises(ConfigError, match="register.sensitivity_tolerance"):
        parse_params(raw)
    raw["register"].update(sensitivity_tolerance=0.02, specificity_tolerance="5%")
    with pytest.raises(ConfigError, match=r"register.specificity_tolerance must be a number in \[0, 1\], e.g. 0.05; got '5%'"):
        parse_params(raw)
    real = load_params(REPO).register
    assert 0.9 <= real.confidence < 1 and {"test_roc_auc", "test_recall"} <= set(real.floors)


@pytest.mark.parametrize("section", ["register", "detect"])
@pytest.mark.parametrize(("name", "message"), [
    ("st-mary's-fracture", "apostrophe, which MLflow's search filters"),
    ("radiology/fracture", "'/' or ':', which MLflow refuses"),
    ("..fracture", "resolve to another when treated as a file path"),
    (" ", "must be a registered model's name"),
])
def test_a_model_name_mlflow_or_its_search_filters_cannot_take_is_refused_naming_the_field(section, name, message):
    """A hospital's name with an apostrophe passed, and registration then failed at MLflow's first
    search with a filter parse error; '/' and ':' failed only when MLflow registered the model."""
    raw = yaml_params()
    raw[section]["model_name"] = name
    with pytest.raises(ConfigError, match=rf"params.yaml: {section}.model_name .*{re.escape(message)}"):
        parse_params(raw)
    raw[section]["model_name"] = f"st-marys-fracture-{section}"
    assert getattr(parse_params(raw), section).model_name == f"st-marys-fracture-{section}"


def yaml_params() -> dict:
    import yaml

    return yaml.safe_load((REPO / "params.yaml").read_text())


# --- against a real registry ------------------------------------------------------------------------


@pytest.fixture()
def model_files(tmp_path):
    return untrained_model_files(tmp_path, 0.37)


@pytest.fixture()
def xray(fracatlas):
    return fracatlas / "images/Fractured/IMG0000019.jpg"


def evaluated_run(auc: float, recall: float = 0.9, data: str = DATA, code: dict[str, str] | None = None) -> str:
    """A training run as the evaluate stage leaves it: test metrics and provenance tags (``code``:
    its git tags, a clean commit unless given)."""
    tags = {"data_version": data, "profile": "cpu"} | (code or {"git_commit": "c0ffee"})
    with mlflow.start_run(tags=tags) as run:
        mlflow.log_metrics({"test_roc_auc": auc, "test_recall": recall, "test_specificity": 0.7})
    return run.info.run_id


def aliases(client) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(NAME).aliases.items()}


@pytest.fixture(scope="module")
def ranked(fracatlas, tmp_path_factory):
    """A test split of 10 fractured and 10 other real X-rays, and models that rank them well, badly, at random.

    Returns the split and ``{"good": ..., "bad": ..., "random": ...}`` of (weights, serving config),
    each served at threshold 0.5. Built once for the module: every test only reads them.
    """
    folder = tmp_path_factory.mktemp("ranked")
    ids = pick_ids(fracatlas, 10, 10)
    frame = pd.DataFrame(
        {
            "image_id": ids,
            "path": [f"images/{'Fractured' if i < 10 else 'Non_fractured'}/{x}" for i, x in enumerate(ids)],
            "label": [1] * 10 + [0] * 10,
        }
    )
    frame.to_csv(folder / "test.csv", index=False)
    split = EvaluatedSplit.from_csv(folder / "test.csv", fracatlas)
    labels = list(split.labels)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the untrained model's new head
        models = {
            "good": ranking_model_files(folder, 0.5, list(split.paths), labels, 1.0),
            "bad": ranking_model_files(folder, 0.5, list(split.paths), labels, -1.0),
            "random": untrained_model_files(folder, 0.5),
        }
    return split, models


def test_gate_promotes_keeps_previous_champion_and_rolls_back(client, ranked, tmp_path, monkeypatch, capsys):
    split, models = ranked
    bad, good = models["bad"], models["good"]

    first = register(PARAMS, evaluated_run(0.85), *bad, split, client)
    assert (first.version, first.created, first.decision, first.champion) == ("1", True, "promoted", True)
    assert first.reason == "first version to pass the gate" and first.comparison is None
    load = first.checks[-1]
    assert load.name == "load check" and load.passed and "models:/fracture-classifier/1 predicted" in load.detail
    tags = client.get_model_version(NAME, "1").tags
    assert tags["split_fingerprint"] == split.fingerprint and tags["data_version"] == DATA and tags["git_commit"] == "c0ffee"
    assert tags["profile"] == "cpu" and float(tags["threshold"]) == 0.5 and tags["gate_decision"] == "promoted"
    assert '"test_roc_auc": 0.85' in tags["metrics"] and "git_dirty_files" not in tags

    # Trained from uncommitted code: the version names the files no commit holds, as its run does.
    dirty = {"git_commit": "c0ffee-dirty", "git_dirty_files": "fracture/training.py"}
    low = register(PARAMS, evaluated_run(0.95, recall=0.6, code=dirty), *good, split, client)
    assert {k: client.get_model_version(NAME, "2").tags[k] for k in dirty} == dirty
    assert (low.version, low.decision, low.champion) == ("2", "challenger", False)
    assert low.reason == "floor test_recall: 0.6000 < 0.8"
    # Neither scored against the champion nor loaded: it could not win anyway.
    assert [c.name for c in low.checks] == ["floor test_roc_auc", "floor test_recall"] and low.comparison is None
    assert aliases(client) == {"champion": "1", "challenger": "2"}
    assert client.get_model_version(NAME, "2").tags["gate_reason"] == low.reason

    better_run = evaluated_run(0.90)
    better = register(PARAMS, better_run, *good, split, client)
    assert (better.version, better.decision, better.previous_champion, better.champion_version) == ("3", "promoted", "1", "1")
    a = better.comparison.auc
    assert (a.auc_a, a.auc_b, a.n_images) == (1.0, 0.0, 20) and a.ci_low > 0 and a.p_value < 0.05
    assert better.reason.startswith("ROC AUC 1.0000 beats champion v1's 0.0000 on the same 20 images by +1.0000")
    assert [c.name for c in better.checks] == [
        "floor test_roc_auc", "floor test_recall", "scored with champion", "beats champion", "sensitivity held",
        "specificity held", "load check",
    ]
    tags = client.get_model_version(NAME, "3").tags
    assert (tags["gate_compared_with"], tags["gate_images"], tags["gate_auc_difference"]) == ("1", "20", "1.0000")
    # A perfect ranking against its inverse: DeLong's variance is 0, so no interval; the p-value is the
    # paired randomisation test's, and the reason names it.
    assert float(tags["gate_p_value"]) < 0.05 and tags["gate_auc_difference_ci"] == "none (no variance)"
    assert "paired randomisation test p = " in better.reason and "DeLong p" not in better.reason
    assert float(tags["gate_sensitivity_change"]) == pytest.approx(better.comparison.sensitivity_change)
    assert float(tags["gate_specificity_change"]) == pytest.approx(better.comparison.specificity_change)
    assert aliases(client) == {"champion": "3", "previous-champion": "1", "challenger": "2"}
    assert "promoted - ROC AUC 1.0000" in better.summary()

    # Registering the same run again creates nothing and changes nothing.
    again = register(PARAMS, better_run, *good, split, client)
    assert (again.version, again.created, again.decision, again.reason) == ("3", False, "unchanged", "already champion")
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 3

    # The same weights trained again (another run): identical scores, no promotion.
    same = register(PARAMS, evaluated_run(0.90), *good, split, client)
    assert (same.decision, same.comparison.auc.difference, same.comparison.auc.p_value) == ("challenger", 0.0, 1.0)
    assert "beats champion:" in same.reason and "not higher" in same.reason
    assert aliases(client) == {"champion": "3", "previous-champion": "1", "challenger": "4"}

    # `fracture rollback` in a project directory, against the same registry.
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="--reason must say why"):
        cli(["rollback", "--reason", " "])
    cli(["rollback", "--reason", "wrist X-rays from the new detector scored low"])
    out = capsys.readouterr().out
    assert "champion rolled back from version 3 to version 1; previous-champion: none" in out
    assert aliases(client) == {"champion": "1", "challenger": "4"}
    demoted, restored = client.get_model_version(NAME, "3").tags, client.get_model_version(NAME, "1").tags
    assert demoted["rolled_back_to"] == "1" and demoted["rolled_back_reason"] == "wrist X-rays from the new detector scored low"
    assert restored["gate_decision"] == "restored"
    assert restored["gate_reason"].startswith("restored by rollback from version 3 at ")
    assert restored["gate_reason"].endswith(": wrist X-rays from the new detector scored low")

    # The rolled-back run is not promoted again when the flow registers it once more.
    rerun = register(PARAMS, better_run, *good, split, client)
    assert (rerun.version, rerun.created, rerun.decision, rerun.champion) == ("3", False, "unchanged", False)
    assert "rolled back" in rerun.reason
    assert aliases(client)["champion"] == "1"

    with pytest.raises(SystemExit, match="no 'previous-champion' to roll back to"):
        cli(["rollback", "--reason", "again"])

    # The champion's version deleted (its alias goes with it): --to makes a version champion, and says
    # that none was demoted.
    client.delete_model_version(NAME, "1")
    cli(["rollback", "--to", "4", "--reason", "signed off by the reading radiologists"])
    assert ("no version held champion; version 4 is champion now, chosen by hand; previous-champion: none"
            in capsys.readouterr().out)
    assert aliases(client) == {"champion": "4"}


def test_a_challenger_registered_again_keeps_its_decision_until_the_champion_or_the_rules_change(
        client, ranked, monkeypatch):
    """A scheduled run that finds nothing new registers its run again. A challenger already decided
    against this champion, on this split, under these rules, is not scored again (minutes on the
    full test split): the same inputs decide the same. A new champion or new rules decide again."""
    split, models = ranked
    register(PARAMS, evaluated_run(0.90), *models["good"], split, client)
    loser = evaluated_run(0.80)
    first = register(PARAMS, loser, *models["bad"], split, client)
    assert (first.version, first.decision) == ("2", "challenger") and first.comparison is not None
    assert client.get_model_version(NAME, "2").tags["gate_basis"]

    scored = []
    real_decide = registry_module._decide
    monkeypatch.setattr(registry_module, "_decide", lambda *a, **k: scored.append(a[3]) or real_decide(*a, **k))
    again = register(PARAMS, loser, *models["bad"], split, client)
    assert scored == [] and (again.version, again.created, again.decision, again.champion) == ("2", False, "unchanged", False)
    assert again.reason.startswith("already decided against champion v1, on this test split and these rules: stays "
                                   f"challenger ({first.reason})")
    assert aliases(client) == {"champion": "1", "challenger": "2"}

    # Other rules: decided again (and lost again).
    stricter = RegisterParams(NAME, "t", confidence=0.99, sensitivity_tolerance=PARAMS.sensitivity_tolerance,
                              floors=PARAMS.floors)
    assert register(stricter, loser, *models["bad"], split, client).decision == "challenger" and len(scored) == 1

    # A registration stopped after the decision but before its basis was written is decided again.
    client.delete_model_version_tag(NAME, "2", "gate_basis")
    assert register(PARAMS, loser, *models["bad"], split, client).decision == "challenger" and len(scored) == 2
    assert register(PARAMS, loser, *models["bad"], split, client).decision == "unchanged" and len(scored) == 2

    # Decided by an earlier gate, which scored a champion on the images it learnt from too: decided again.
    basis = json.loads(client.get_model_version(NAME, "2").tags["gate_basis"])
    client.set_model_version_tag(NAME, "2", "gate_basis", json.dumps(basis | {"gate": 1}, sort_keys=True))
    assert register(PARAMS, loser, *models["bad"], split, client).decision == "challenger" and len(scored) == 3
    assert json.loads(client.get_model_version(NAME, "2").tags["gate_basis"])["gate"] == registry_module.GATE_VERSION

    # Another champion: decided again, against it.
    register(PARAMS, evaluated_run(0.95), *models["random"], split, client)  # version 3, against v1
    client.set_registered_model_alias(NAME, "champion", "3")
    redone = register(PARAMS, loser, *models["bad"], split, client)
    assert redone.champion_version == "3" and str(scored[-1].version) == "3" and redone.decision == "challenger"
    assert '"champion": "3"' in client.get_model_version(NAME, "2").tags["gate_basis"]  # what it was decided against


def test_rollback_steps_back_through_the_champions(client, ranked):
    split, models = ranked
    # Any gain promotes here: the test is about the aliases, not the evidence.
    params = RegisterParams(NAME, "t", confidence=0.0, sensitivity_tolerance=1.0)
    with pytest.raises(RegistryError, match="no 'champion' alias"):
        rollback(NAME, client)
    for model in ("bad", "random", "good"):  # each ranks these images better than the one before
        assert register(params, evaluated_run(0.9), *models[model], split, client).decision == "promoted"
    assert aliases(client) == {"champion": "3", "previous-champion": "2"}
    assert client.get_model_version(NAME, "3").tags["replaced_version"] == "2"

    done = rollback(NAME, client)
    assert (done.demoted, done.champion, done.previous_champion) == ("3", "2", "1")
    assert aliases(client) == {"champion": "2", "previous-champion": "1"}
    done = rollback(NAME, client)
    assert (done.demoted, done.champion, done.previous_champion) == ("2", "1", None)
    assert aliases(client) == {"champion": "1"}
    with pytest.raises(RegistryError, match=r"no 'previous-champion'.*to choose a version by hand: fracture rollback --to"):
        rollback(NAME, client)


def test_a_champion_moved_by_another_registration_while_scoring_is_the_one_compared_with(client, ranked, monkeypatch):
    """Two registrations against one registry: while version 3 is scored against champion 1,
    another moves champion to version 2. Version 3 is then scored against 2 before any alias
    moves, and loses to it, where it would have replaced 2 unseen."""
    split, models = ranked
    # Any gain promotes, above one floor.
    params = RegisterParams(NAME, "t", confidence=0.0, sensitivity_tolerance=1.0, floors={"test_recall": 0.8})
    register(params, evaluated_run(0.9), *models["bad"], split, client)
    register(params, evaluated_run(0.9, recall=0.5), *models["good"], split, client)  # v2: below a floor
    assert aliases(client) == {"champion": "1", "challenger": "2"}
    real_decide, compared_with = registry_module._decide, []

    def another_registration_promotes_version_2(client_, params_, candidate, current, *rest):
        compared_with.append(str(current.version))
        if len(compared_with) == 1:
            client_.set_registered_model_alias(NAME, "champion", "2")
        return real_decide(client_, params_, candidate, current, *rest)

    monkeypatch.setattr(registry_module, "_decide", another_registration_promotes_version_2)
    third = register(params, evaluated_run(0.9), *models["random"], split, client)
    assert compared_with == ["1", "2"]
    assert (third.decision, third.champion_version) == ("challenger", "2")
    assert aliases(client)["champion"] == "2"


def test_a_champion_moved_by_another_registration_while_promoting_is_not_overwritten(client, ranked, monkeypatch):
    """The other registration's promotion lands after this one decided but before its champion
    alias moves: this one sees it, is scored against the new champion, and loses to it."""
    split, models = ranked
    params = RegisterParams(NAME, "t", confidence=0.0, sensitivity_tolerance=1.0, floors={"test_recall": 0.8})
    register(params, evaluated_run(0.9), *models["bad"], split, client)
    register(params, evaluated_run(0.9, recall=0.5), *models["good"], split, client)  # v2: below a floor
    assert aliases(client) == {"champion": "1", "challenger": "2"}
    real_tag = registry_module._tag_version
    moved = []

    def another_registration_promotes_version_2(client_, name, version, tags):
        real_tag(client_, name, version, tags)
        if tags.get("gate_decision") == "promoted" and not moved:
            moved.append(version)
            client_.set_registered_model_alias(NAME, "champion", "2")

    monkeypatch.setattr(registry_module, "_tag_version", another_registration_promotes_version_2)
    third = register(params, evaluated_run(0.9), *models["random"], split, client)
    assert moved == ["3"]
    assert (third.decision, third.champion_version) == ("challenger", "2")
    assert aliases(client)["champion"] == "2"
    third_tags = client.get_model_version(NAME, "3").tags
    assert third_tags["gate_decision"] == "challenger" and "replaced_version" not in third_tags


@contextmanager
def stopped_when_moving(client, alias: str, after: bool = False) -> Iterator[None]:
    """The block stops (as Ctrl-C or a killed worker would) when ``alias`` is about to move, or,
    ``after``, just after it moved (before the command tidies the tags around it)."""
    real_set = client.set_registered_model_alias

    def stopped(name, moving, version):
        if moving == alias and not after:
            raise KeyboardInterrupt
        real_set(name, moving, version)
        if moving == alias:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(client, "set_registered_model_alias", stopped)
        yield


def test_a_promotion_stopped_between_its_alias_moves_is_completed_when_the_run_is_registered_again(client, ranked):
    split, models = ranked
    params = RegisterParams(NAME, "t", confidence=0.0, sensitivity_tolerance=1.0)
    register(params, evaluated_run(0.9), *models["bad"], split, client)
    register(params, evaluated_run(0.9), *models["random"], split, client)
    assert aliases(client) == {"champion": "2", "previous-champion": "1"}
    run = evaluated_run(0.9)
    with stopped_when_moving(client, "previous-champion"):
        register(params, run, *models["good"], split, client)
    # Champion moved; previous-champion still names the version before the one replaced. The
    # version already carries its decision: it was written before champion moved.
    assert aliases(client) == {"champion": "3", "previous-champion": "1"}
    assert client.get_model_version(NAME, "3").tags["gate_decision"] == "promoted"
    again = register(params, run, *models["good"], split, client)
    assert (again.version, again.decision) == ("3", "unchanged")
    assert aliases(client) == {"champion": "3", "previous-champion": "2"}
    assert rollback(NAME, client).champion == "2"


@pytest.mark.parametrize("first", [True, False], ids=["first replacement", "later replacement"])
def test_a_rollback_after_a_stopped_promotion_returns_to_the_version_it_replaced(client, ranked, first):
    """A promotion stopped between its alias moves left previous-champion on the version before
    the one replaced (or on none, the first time): a rollback then skipped a champion, or refused
    for want of a previous one. The champion's record names the version it replaced, and a
    rollback, or the registration of any other run, returns previous-champion to it."""
    split, models = ranked
    params = RegisterParams(NAME, "t", confidence=0.0, sensitivity_tolerance=1.0)
    register(params, evaluated_run(0.9), *models["bad"], split, client)
    if not first:
        register(params, evaluated_run(0.9), *models["random"], split, client)
    before = aliases(client)
    replaced = before["champion"]
    with stopped_when_moving(client, "previous-champion"):
        register(params, evaluated_run(0.9), *models["good"], split, client)
    new = str(len(client.search_model_versions(f"name = '{NAME}'")))
    assert aliases(client) == {**before, "champion": new}  # previous-champion where it was, or none
    if first:
        done = rollback(NAME, client)
        assert (done.demoted, done.champion) == (new, replaced)
        assert aliases(client) == {"champion": replaced}
        return
    # Another run's registration (a losing one) puts it right before any rollback is asked for.
    loser = register(params, evaluated_run(0.9, recall=0.5), *models["random"], split, client)
    assert loser.decision == "challenger"
    assert aliases(client) == {"champion": new, "previous-champion": replaced, "challenger": loser.version}
    done = rollback(NAME, client)
    assert (done.demoted, done.champion, done.previous_champion) == (new, replaced, "1")


def test_a_promotion_landing_while_a_rollback_loads_its_version_is_not_displaced(client, ranked, monkeypatch):
    """Loading the version to return to takes seconds; a registration that promotes another
    version meanwhile is seen, and the rollback (or hand pick) changes nothing, where it moved
    champion over the new one and left it without an alias, still tagged promoted."""
    split, models = ranked
    params = RegisterParams(NAME, "t", confidence=0.0, sensitivity_tolerance=1.0)
    for model in ("bad", "random", "good"):
        register(params, evaluated_run(0.9), *models[model], split, client)
    client.set_registered_model_alias(NAME, "champion", "2")
    client.set_registered_model_alias(NAME, "previous-champion", "1")
    state = aliases(client)

    def promoted_meanwhile(*args, **kwargs):
        client.set_registered_model_alias(NAME, "champion", "3")  # another registration's promotion lands

    for how in ({}, {"to": 1}):
        client.set_registered_model_alias(NAME, "champion", "2")
        with monkeypatch.context() as patch:
            patch.setattr(registry_module, "_require_loadable", promoted_meanwhile)
            patch.setattr(registry_module, "_load_failure", lambda *a, **k: promoted_meanwhile())
            with pytest.raises(RegistryError, match="champion of 'fracture-classifier' moved from version 2 to 3 while "
                                                    "version 1 was loaded.*nothing was changed"):
                rollback(NAME, client, **how)
        assert aliases(client) == {**state, "champion": "3"}
        for version in ("1", "2", "3"):
            assert "rolled_back_at" not in client.get_model_version(NAME, version).tags


@pytest.mark.parametrize("first", [False, True], ids=["replacing a champion", "the first champion"])
def test_a_version_two_registrations_of_its_run_promote_at_once_keeps_its_record(client, ranked, monkeypatch, first):
    """Both registrations of one run decide to promote the version against the same champion; the
    other's promotion lands between this one's last read and its own: this one took it for
    another champion, tagged the champion "pending" and dropped the version it replaced."""
    split, models = ranked
    params = RegisterParams(NAME, "t", confidence=0.0, sensitivity_tolerance=1.0)
    if not first:
        register(params, evaluated_run(0.9), *models["bad"], split, client)
    run = evaluated_run(0.9)
    real_tag = registry_module._tag_version

    def the_other_registration_lands(client_, name, version, tags):
        real_tag(client_, name, version, tags)
        if tags.get("gate_decision") == "promoted":
            client_.set_registered_model_alias(NAME, "champion", version)  # and stops before previous-champion

    with monkeypatch.context() as patch:
        patch.setattr(registry_module, "_tag_version", the_other_registration_lands)
        done = register(params, run, *models["good"], split, client)
    version = "1" if first else "2"
    assert (done.version, done.decision, done.champion) == (version, "promoted", True)
    assert aliases(client) == ({"champion": "1"} if first else {"champion": "2", "previous-champion": "1"})
    tags = client.get_model_version(NAME, version).tags
    assert tags["gate_decision"] == "promoted" and tags.get("replaced_version") == (None if first else "1")


def test_a_registry_error_while_reading_the_champion_is_raised_not_read_as_no_champion(client, ranked, monkeypatch):
    split, models = ranked
    params = RegisterParams(NAME, "t", confidence=0.0, sensitivity_tolerance=1.0)
    register(params, evaluated_run(0.9), *models["good"], split, client)
    assert aliases(client) == {"champion": "1"}
    real = {m: getattr(client, m) for m in ("get_registered_model", "get_model_version_by_alias")}

    def overloaded(method):
        def read(*args, **kwargs):
            # The gate's own reads of the aliases fail, as they would with the tracking server
            # overloaded; MLflow's internal checks (when an alias is set) still get through.
            if sys._getframe(1).f_code.co_filename == registry_module.__file__:
                raise MlflowException("the tracking server is overloaded", error_code=REQUEST_LIMIT_EXCEEDED)
            return real[method](*args, **kwargs)

        return read

    with monkeypatch.context() as patch:
        for method in real:
            patch.setattr(client, method, overloaded(method))
        with pytest.raises(MlflowException, match="overloaded"):
            register(params, evaluated_run(0.9), *models["bad"], split, client)
    # The worse model was not promoted as if there were no champion.
    assert aliases(client)["champion"] == "1"
    assert "gate_decision" not in client.get_model_version(NAME, "2").tags


def test_a_rollback_stopped_after_champion_moved_is_finished_by_the_next_rollback(client, ranked):
    split, models = ranked
    params = RegisterParams(NAME, "t", confidence=0.0, sensitivity_tolerance=1.0)
    runs = {}
    for model in ("bad", "random", "good"):
        runs[model] = evaluated_run(0.9)
        register(params, runs[model], *models[model], split, client)
    assert aliases(client) == {"champion": "3", "previous-champion": "2"}
    with stopped_when_moving(client, "previous-champion"):
        rollback(NAME, client)
    assert aliases(client) == {"champion": "2", "previous-champion": "2"}
    # The demoted version is already marked: registering its run again does not promote it back.
    assert client.get_model_version(NAME, "3").tags["rolled_back_to"] == "2"
    again = register(params, runs["good"], *models["good"], split, client)
    assert again.decision == "unchanged" and "rolled back" in again.reason
    # Rolling back again finishes the stopped rollback rather than failing or stepping further.
    done = rollback(NAME, client)
    assert (done.demoted, done.champion, done.previous_champion) == ("3", "2", "1")
    assert aliases(client) == {"champion": "2", "previous-champion": "1"}


def test_a_registry_error_while_finishing_a_rollback_is_raised_not_read_as_a_deleted_version(client, ranked, monkeypatch):
    split, models = ranked
    params = RegisterParams(NAME, "t", confidence=0.0, sensitivity_tolerance=1.0)
    for model in ("bad", "random", "good"):
        register(params, evaluated_run(0.9), *models[model], split, client)
    assert aliases(client) == {"champion": "3", "previous-champion": "2"}
    real = client.get_model_version

    def overloaded(name, version):
        # Version 1, the one previous-champion steps back to, cannot be read for the moment.
        if str(version) == "1":
            raise MlflowException("the tracking server is overloaded", error_code=REQUEST_LIMIT_EXCEEDED)
        return real(name, version)

    with monkeypatch.context() as patch:
        patch.setattr(client, "get_model_version", overloaded)
        with pytest.raises(MlflowException, match="overloaded"):
            rollback(NAME, client)
    # previous-champion was not deleted as if version 1 were gone: the next rollback finishes the step.
    assert aliases(client)["champion"] == "2" and "previous-champion" in aliases(client)
    done = rollback(NAME, client)
    assert (done.demoted, done.champion, done.previous_champion) == ("3", "2", "1")


def test_a_decision_without_a_comparison_leaves_no_figures_of_an_earlier_one(client, ranked):
    split, models = ranked
    params = RegisterParams(NAME, "t", confidence=0.95, sensitivity_tolerance=0.05)
    register(params, evaluated_run(0.9), *models["good"], split, client)
    run = evaluated_run(0.9)
    lost = register(params, run, *models["bad"], split, client)
    assert lost.decision == "challenger"
    tags = client.get_model_version(NAME, "2").tags
    assert tags["gate_compared_with"] == "1" and float(tags["gate_auc_difference"]) < 0 and "gate_basis" in tags
    # The champion is deleted by hand; the run registered again is decided with no champion to compare with.
    client.delete_model_version(NAME, "1")
    again = register(params, run, *models["bad"], split, client)
    assert again.decision == "promoted" and aliases(client) == {"champion": "2"}
    tags = client.get_model_version(NAME, "2").tags
    assert tags["gate_decision"] == "promoted"
    assert not {k for k in tags if k.startswith("gate_")} - {"gate_decision", "gate_reason"}, tags


def test_a_pair_that_cannot_be_scored_and_a_model_that_fails_to_load_are_not_promoted(client, ranked, tmp_path, xray):
    split, models = ranked
    bad, good = models["bad"], models["good"]

    # Without a champion, only the load check can stop it: weights that do not fit cannot load.
    import timm

    broken = tmp_path / "broken.safetensors"
    save_file(timm.create_model("tf_efficientnet_lite0", num_classes=3).state_dict(), str(broken))
    first = register(PARAMS, evaluated_run(0.95), broken, good[1], split, client)
    assert (first.version, first.decision, first.champion) == ("1", "challenger", False)
    assert first.checks[-1].name == "load check" and not first.checks[-1].passed
    assert first.reason.startswith("load check: models:/fracture-classifier/1 failed on ")
    assert "size mismatch" in first.reason

    assert register(PARAMS, evaluated_run(0.85), *bad, split, client).champion
    # Far better, but the test split it was evaluated on carries no images to score both on:
    # not compared, not promoted, and the report says so.
    blind = EvaluatedSplit(SPLIT_B, 12, xray)
    other = register(PARAMS, evaluated_run(0.99), *good, blind, client)
    assert (other.decision, other.champion, other.comparison) == ("challenger", False, None)
    assert failed(other.checks) == ["scored with champion"]
    assert "could not both be scored" in other.reason and "carries no image paths" in other.reason
    assert aliases(client) == {"champion": "2", "challenger": "3"}

    # Better ranking, but its weights do not fit: it cannot be scored, so it is not compared.
    broken_run = register(PARAMS, evaluated_run(0.95), broken, good[1], split, client)
    assert failed(broken_run.checks) == ["scored with champion"] and "size mismatch" in broken_run.reason
    assert aliases(client) == {"champion": "2", "challenger": "4"}
    # A model that could not be loaded or scored may have met a passing fault (the tracking server,
    # the network): its decision records no basis, so registering its run again tries again.
    assert all("gate_basis" not in client.get_model_version(NAME, v).tags for v in ("1", "3", "4"))


def test_a_run_without_the_metrics_is_not_registered(client, model_files, xray):
    weights, config = model_files
    with mlflow.start_run() as run:
        mlflow.log_metric("test_roc_auc", 0.9)
    with pytest.raises(RegistryError, match="no metric 'test_recall' \\(named in register.floors\\); run the evaluate"):
        register(PARAMS, run.info.run_id, weights, config, EvaluatedSplit(SPLIT_A, 10, xray), client)
    assert client.search_model_versions(f"name = '{NAME}'") == []


def project_after_evaluate(root, weights, config: ServingConfig, run_id: str, xray) -> pd.DataFrame:
    """A project whose train, split and evaluate stages have run, written through the workspace.

    The test split holds ``xray`` and a second row whose file is absent: with no champion to
    compare with, only the load check reads an image, the first one. Returns the split table.
    """
    workspace = Workspace(root)
    trained = TrainedModel(config.architecture, "cpu", list(config.extra["classes"]), config.data_config, 1, 0.9)
    workspace.write_train(trained, run_id, mlflow.get_run(run_id).info.experiment_id, [])
    shutil.copy(weights, workspace.weights)
    confusion = {"tn": 1, "fp": 0, "fn": 0, "tp": 1}
    workspace.write_evaluate(EvaluateResult({"threshold": config.threshold, "roc_auc": 0.9}, confusion), {})
    dataset = root / load_params(REPO).ingest.dest
    (dataset / "images/Fractured").mkdir(parents=True)
    shutil.copy(xray, dataset / "images/Fractured" / xray.name)
    test = pd.DataFrame({"image_id": [xray.name, "IMG9.jpg"], "path": [f"images/Fractured/{xray.name}", "images/Non_fractured/IMG9.jpg"], "label": [1, 0]})
    workspace.split_dir.mkdir(parents=True)
    test.to_csv(workspace.split_table("test"), index=False)
    workspace.split_report.write_text("{}\n")  # the split stage writes it after its tables
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    return test


def test_the_register_stage_registers_the_workspace_model(client, model_files, xray, tmp_path, monkeypatch):
    """run_register reads the run, weights, threshold and test split from the stages' outputs."""
    weights, config = model_files
    run_id = evaluated_run(0.9)
    test = project_after_evaluate(tmp_path, weights, config, run_id, xray)
    # Registered in this process; `fracture register` loads it in a consumer's Python
    # (test_fracture_register_prints_the_decision).
    monkeypatch.setattr(stage_register, "register", register)

    reg = run_register(load_params(tmp_path), Workspace(tmp_path))
    assert (reg.name, reg.version, reg.run_id, reg.decision) == (NAME, "1", run_id, "promoted")
    assert reg.split_fingerprint == split_fingerprint(test)
    version = client.get_model_version(NAME, "1")
    tags = version.tags
    assert float(tags["threshold"]) == config.threshold and tags["profile"] == "cpu"
    assert tags["split_fingerprint"] == split_fingerprint(test)
    # The served model carries the input checks params.yaml sets (serve, validate).
    served = mlflow.pyfunc.load_model(f"models:/{NAME}/1").unwrap_python_model()
    assert served.policy == input_policy(load_params(tmp_path))


def test_a_new_version_describes_itself_for_the_registry_page(client, model_files, xray):
    weights, config = model_files
    config = dataclasses.replace(config, threshold=0.0607)  # served at the threshold its figures were taken at
    metrics = {"test_roc_auc": 0.907, "test_roc_auc_ci_low": 0.866, "test_roc_auc_ci_high": 0.944,
               "test_recall": 0.814, "test_recall_ci_low": 0.733, "test_recall_ci_high": 0.884,
               "test_specificity": 0.838, "test_specificity_ci_low": 0.802, "test_specificity_ci_high": 0.873,
               "test_threshold": 0.0607, "test_n_images": 494, "test_n_fractured": 86}
    source = "fixed at evaluate.threshold 0.5"
    dataset = "the hospital export in `data/north` (ingest.layout: csv)"
    with mlflow.start_run(tags={"data_version": DATA, "profile": "cpu", "threshold_source": source,
                                "dataset": dataset}) as run:
        mlflow.log_metrics(metrics)
    register(PARAMS, run.info.run_id, weights, config, EvaluatedSplit(SPLIT_A, 10, xray), client)
    description = client.get_model_version(NAME, "1").description
    # How the threshold was chosen comes from the evaluate stage's run, not a fixed phrase.
    assert f"at the decision threshold 0.0607 ({source})." in description and "validation" not in description
    assert f"{config.architecture} (cpu profile), 64×64 px (squash)" in description
    assert f"fine-tuned from ImageNet weights on {dataset} (DVC data version `{DATA}`)" in description
    assert "Test split (494 images, 86 fractured): ROC AUC 0.907 (95% CI 0.866–0.944); sensitivity 0.814 " in description
    assert "(95% CI 0.733–0.884); specificity 0.838 (95% CI 0.802–0.873); at the decision threshold 0.0607" in description
    assert f"`evaluation/model_card.md` of run `{run.info.run_id}`" in description
    # The model's own page in the registry says what it is and how its champion is chosen; a team's own stays.
    page = client.get_registered_model(NAME).description
    assert page.startswith("Fractured / not fractured classifier") and f"`models:/{NAME}@champion`" in page
    client.update_registered_model(NAME, description="Ours: see the wiki.")
    with mlflow.start_run(tags={"data_version": DATA, "profile": "cpu"}) as second:
        mlflow.log_metrics(metrics)
    register(PARAMS, second.info.run_id, weights, config, EvaluatedSplit(SPLIT_A, 10, xray), client)
    assert client.get_registered_model(NAME).description == "Ours: see the wiki."


def test_fracture_register_prints_the_decision(client, model_files, xray, tmp_path, monkeypatch, capsys):
    """`fracture register` in a project whose train, split and evaluate stages have run."""
    weights, config = model_files
    run_id = evaluated_run(0.9)
    test = project_after_evaluate(tmp_path, weights, config, run_id, xray)
    monkeypatch.chdir(tmp_path)

    cli(["register"])
    out = capsys.readouterr().out
    assert out.startswith(f"{NAME} version 1 (new, run {run_id}): promoted - first version to pass the gate")
    assert "[pass] floor test_roc_auc: 0.9000 >= 0.85" in out
    assert f"[pass] load check: models:/{NAME}/1 predicted {xray.name}" in out
    assert client.get_model_version(NAME, "1").tags["split_fingerprint"] == split_fingerprint(test)


def test_a_champion_evaluated_on_another_split_is_compared_on_the_new_one(client, ranked, fracatlas):
    """What a champion recorded on its own split never decides; both are scored on the new split's images."""
    split, models = ranked
    old_split = EvaluatedSplit(SPLIT_A, 10, split.check_image)
    # The champion recorded a far better AUC on its own split and data version than the challenger's.
    first = register(PARAMS, evaluated_run(0.99, data="old-version.dir"), *models["random"], old_split, client)
    assert first.champion

    # On the new split's images, scored as a consumer of the registry scores them.
    probs, threshold = served_scores(NAME, "1", split, isolated=False)
    assert probs.shape == (20,) and probs.dtype == np.float64 and threshold == 0.5
    champion_auc = delong_paired(np.array(split.labels), probs, probs).auc_a

    # The untrained champion calls most of these images fractured at 0.5, the challenger misses
    # one fracture of ten: allowed here, so the AUC decides.
    params = RegisterParams(NAME, "t", confidence=0.95, sensitivity_tolerance=0.15, floors=PARAMS.floors)
    candidate = register(params, evaluated_run(0.90), *models["good"], split, client)
    assert candidate.comparison.candidate_sensitivity == 0.9
    scored = candidate.checks[2]
    assert scored.name == "scored with champion" and scored.passed
    assert "on this test split's 20 images (10 fractured)" in scored.detail
    assert "evaluated on another test split or data version" in scored.detail
    assert candidate.comparison.auc.auc_b == pytest.approx(champion_auc)
    assert candidate.decision == "promoted" and candidate.champion


def test_an_image_the_champion_saw_leaves_its_whole_group_out_of_the_comparison():
    """Seen by name or by content (a renamed copy); a near-duplicate or the same patient's image goes with it."""
    split = EvaluatedSplit(
        "f" * 64, 6, Path("a.jpg"),
        groups=("a", "a", "c", "d", "d", "f"),
        image_ids=("a", "b", "c", "d", "e", "f"),
        sha256=("1", "2", "3", "4", "5", "6"),
    )
    seen = SeenImages(frozenset({"a", "z"}), frozenset({"5", "9"}))  # "e" was trained on under another name
    assert split.seen_by(seen).tolist() == [True, True, False, True, True, False]
    assert not split.seen_by(SeenImages(frozenset({"x"}), frozenset({"0"}))).any()
    assert EvaluatedSplit("f" * 64, 6, Path("a.jpg")).seen_by(seen) is None  # no ids: cannot be told

    table = SeenImages.table({
        "train": pd.DataFrame({"image_id": ["a"], "sha256": ["1"], "label": [1]}),
        "val": pd.DataFrame({"image_id": ["b"], "sha256": ["2"], "label": [0]}),
        "test": pd.DataFrame({"image_id": ["c"], "sha256": ["3"], "label": [0]}),
    })
    assert SeenImages.from_table(table, "t") == SeenImages(frozenset({"a", "b"}), frozenset({"1", "2"}))
    with pytest.raises(SeenListError, match="run r's artifact: columns image_id and sha256 expected"):
        SeenImages.from_table("image_id\na\n", "run r's artifact")


def champion_that_trained_on(ids: list[str], data: str = "old-version.dir") -> str:
    """A training run evaluated on an older split and data version, whose train split held ``ids``."""
    run_id = evaluated_run(0.99, data=data)
    table = SeenImages.table({"train": pd.DataFrame({"image_id": ids, "sha256": [f"sha-{i}" for i in ids]})})
    with mlflow.start_run(run_id=run_id):
        mlflow.log_text(table, SEEN_ARTIFACT)
    return run_id


def test_test_images_the_champion_trained_on_are_left_out_of_the_comparison(client, ranked):
    """After a grown export's split is drawn afresh, the champion is not scored on what it learnt."""
    split, models = ranked
    learnt = [split.image_ids[i] for i in (0, 1, 2, 10, 11, 12)]  # 3 fractured, 3 not
    first = register(PARAMS, champion_that_trained_on([*learnt, "IMG-not-in-this-split.jpg"]), *models["random"],
                     EvaluatedSplit(SPLIT_A, 10, split.check_image), client)
    assert first.champion

    params = RegisterParams(NAME, "t", confidence=0.95, sensitivity_tolerance=0.15, floors=PARAMS.floors)
    candidate = register(params, evaluated_run(0.90), *models["good"], split, client)
    scored = candidate.checks[2]
    assert scored.name == "scored with champion" and scored.passed
    assert ("on this test split's 20 images (10 fractured); 6 of them, which champion v1 was trained or validated "
            "on (or which are linked to such an image), are left out: the two are compared on the other 14 (7 fractured)"
            ) in scored.detail
    c = candidate.comparison
    assert (c.auc.n_images, c.left_out) == (14, 6)
    # What the flow's log shows, the decision's reason and the gate's check, names them too.
    beats = next(check for check in candidate.checks if check.name == "beats champion")
    assert "on the same 14 images (14 groups of linked images), 6 it was trained or validated on left out:" in beats.detail
    assert candidate.decision == "promoted"
    assert "on the same 14 images (6 it was trained or validated on left out) by" in candidate.reason
    # The champion's AUC is its AUC on the 14 it never saw, scored as a consumer scores it.
    keep = ~np.isin(np.array(split.image_ids), learnt)
    probs, _ = served_scores(NAME, "1", split, isolated=False)
    assert c.auc.auc_b == pytest.approx(delong_paired(np.array(split.labels)[keep], probs[keep], probs[keep]).auc_a)
    tags = client.get_model_version(NAME, candidate.version).tags
    assert (tags["gate_images"], tags["gate_images_left_out"]) == ("14", "6")


def test_a_champion_whose_list_is_damaged_is_scored_on_every_image_with_a_warning(client, ranked, caplog):
    """A list that cannot be read does not stop every weekly registration: the gate compares as it
    did before runs recorded one, and says so."""
    split, models = ranked
    run_id = evaluated_run(0.99, data="old-version.dir")
    with mlflow.start_run(run_id=run_id):
        mlflow.log_text("", SEEN_ARTIFACT)
    register(PARAMS, run_id, *models["random"], EvaluatedSplit(SPLIT_A, 10, split.check_image), client)
    with caplog.at_level("WARNING", logger="fracture.registry"):
        candidate = register(PARAMS, evaluated_run(0.90), *models["good"], split, client)
    assert f"run {run_id}'s artifact {SEEN_ARTIFACT}: not a csv of image_id and sha256" in caplog.text
    assert "scores it on every one, which may favour it" in caplog.text
    assert candidate.comparison.auc.n_images == 20 and candidate.comparison.left_out == 0
    assert "(its run does not list the images it trained on, or the list could not be read)" in candidate.checks[2].detail


def test_a_champion_that_trained_on_every_fractured_test_image_is_not_compared_and_stays(client, ranked):
    split, models = ranked
    register(PARAMS, champion_that_trained_on(list(split.image_ids[:10])), *models["random"],
             EvaluatedSplit(SPLIT_A, 10, split.check_image), client)
    candidate = register(PARAMS, evaluated_run(0.90), *models["good"], split, client)
    assert candidate.decision == "challenger" and aliases(client)["champion"] == "1"
    scored = candidate.checks[2]
    assert scored.name == "compared with champion" and not scored.passed
    assert "the other 10 (0 fractured) cannot rank the two: they are not compared, and the champion stays" in scored.detail
    tags = client.get_model_version(NAME, candidate.version).tags
    # Settled, unlike a pair that could not be scored: the next run does not score the two again.
    assert "gate_images" not in tags and tags["gate_basis"]


def test_a_run_evaluated_on_another_split_than_the_workspace_holds_is_not_registered(client, ranked):
    """After `dvc repro split` alone, the run's test figures are another split's: refused, nothing registered."""
    split, models = ranked
    with mlflow.start_run(tags={"data_version": DATA, "split_fingerprint": SPLIT_A}) as run:
        mlflow.log_metrics({"test_roc_auc": 0.9, "test_recall": 0.9, "test_specificity": 0.7})
    with pytest.raises(RegistryError, match="evaluated on another test split.*dvc repro"):
        register(PARAMS, run.info.run_id, *models["good"], split, client)
    assert not client.search_model_versions(f"name = '{NAME}'")
    # The same run evaluated on this split registers.
    client.set_tag(run.info.run_id, "split_fingerprint", split.fingerprint)
    assert register(PARAMS, run.info.run_id, *models["good"], split, client).version == "1"


def test_a_run_whose_test_figures_are_another_thresholds_than_the_served_one_is_not_registered(client, ranked):
    """DVC can restore an earlier evaluation's outputs (metrics.json, and the threshold served from
    it) from its run cache without running the command that logs the figures to the run: the gate
    judged the floors on figures taken at another threshold than the version serves. Refused,
    nothing registered; the run holding this threshold's figures registers."""
    split, models = ranked
    weights, config = models["good"]
    with mlflow.start_run(tags={"data_version": DATA, "split_fingerprint": split.fingerprint}) as run:
        mlflow.log_metrics({"test_roc_auc": 0.9, "test_recall": 0.9, "test_specificity": 0.7, "test_threshold": 0.2})
    assert config.threshold == 0.5
    with pytest.raises(RegistryError, match=r"taken at threshold 0\.2, but the model would be served at 0\.5 "
                                            r".*dvc repro --force evaluate"):
        register(PARAMS, run.info.run_id, weights, config, split, client)
    assert not client.search_model_versions(f"name = '{NAME}'")
    client.log_metric(run.info.run_id, "test_threshold", 0.5)  # the evaluation at the served threshold, logged
    assert register(PARAMS, run.info.run_id, weights, config, split, client).version == "1"


def test_a_model_trained_with_an_enhancement_requires_its_library():
    def config(enhance: str) -> ServingConfig:
        data = DataConfig((3, 64, 64), "bicubic", (0.5,) * 3, (0.5,) * 3, enhance=enhance)  # type: ignore[arg-type]
        return ServingConfig("tf_efficientnet_lite0", data, 0.5)

    assert requirements(config("none")) == REQUIREMENTS
    assert "opencv-contrib-python-headless" in requirements(config("clahe"))
    assert "opencv-contrib-python-headless" in requirements(config("canny"))
    assert "SimpleITK" in requirements(config("anisotropic_diffusion"))


def _break_artifacts(client, version: str) -> None:
    """Removes a registered version's model files, as a cleaned-up artifact store leaves them."""
    source = client.get_model_version(NAME, version).source  # models:/<logged model id>
    location = mlflow.get_logged_model(source.removeprefix("models:/")).artifact_location
    shutil.rmtree(location.removeprefix("file://"))


def test_a_rollback_to_a_version_that_cannot_be_loaded_is_refused_and_champion_stays(client, ranked):
    split, models = ranked
    params = RegisterParams(NAME, "t", confidence=0.0, sensitivity_tolerance=1.0)
    for model in ("bad", "good"):
        assert register(params, evaluated_run(0.9), *models[model], split, client).decision == "promoted"
    _break_artifacts(client, "1")
    with pytest.raises(RegistryError, match=r"previous-champion fracture-classifier version 1 cannot be loaded"):
        rollback(NAME, client, "checking the refusal")
    assert aliases(client) == {"champion": "2", "previous-champion": "1"}
    assert "rolled_back_at" not in client.get_model_version(NAME, "2").tags


def test_a_champion_that_cannot_be_loaded_fails_the_registration_loudly(client, ranked):
    """Before, the gate read "could not both be scored" as a failed check: every new version became a
    challenger while no consumer could load @champion, and the flow ended as if all was well."""
    split, models = ranked
    register(PARAMS, evaluated_run(0.85), *models["bad"], split, client)
    _break_artifacts(client, "1")
    with pytest.raises(RegistryError, match=r"champion fracture-classifier version 1 cannot be loaded from the registry"):
        register(PARAMS, evaluated_run(0.90), *models["good"], split, client)
    assert aliases(client) == {"champion": "1"}  # the new version earned nothing


# --- a version chosen by hand (`fracture rollback --to`) -------------------------------------------

ANY_GAIN = RegisterParams(NAME, "t", confidence=0.0, sensitivity_tolerance=1.0)  # the aliases, not the evidence
ROLLED_BACK = ("rolled_back_at", "rolled_back_to", "rolled_back_reason")


def three_champions(client, split, models) -> dict[str, str]:
    """Versions 1, 2 and 3, each promoted over the one before: champion 3, previous-champion 2."""
    runs = {}
    for model in ("bad", "random", "good"):  # each ranks these images better than the one before
        runs[model] = evaluated_run(0.9)
        assert register(ANY_GAIN, runs[model], *models[model], split, client).decision == "promoted"
    assert aliases(client) == {"champion": "3", "previous-champion": "2"}
    return runs


def test_a_version_chosen_by_hand_replaces_the_champion_and_a_rollback_undoes_the_pick(client, ranked):
    """Two versions back by hand: the replaced champion is tagged as a rollback tags it and becomes
    previous-champion, so its run is not promoted again and a plain rollback returns to it."""
    split, models = ranked
    runs = three_champions(client, split, models)

    done = rollback(NAME, client, "clinical sign-off of version 1", to=1)
    assert (done.demoted, done.champion, done.previous_champion, done.chosen) == ("3", "1", "3", True)
    assert aliases(client) == {"champion": "1", "previous-champion": "3"}
    demoted, chosen = client.get_model_version(NAME, "3").tags, client.get_model_version(NAME, "1").tags
    assert demoted["rolled_back_at"] and demoted["rolled_back_to"] == "1"
    assert demoted["rolled_back_reason"] == "clinical sign-off of version 1"
    assert (chosen["gate_decision"], chosen["replaced_version"]) == ("chosen", "3")
    assert chosen["gate_reason"].startswith("chosen by hand in place of version 3 at ")
    assert chosen["gate_reason"].endswith(": clinical sign-off of version 1")

    # The flow registering the replaced champion's run again does not promote it back.
    again = register(ANY_GAIN, runs["good"], *models["good"], split, client)
    assert (again.version, again.decision, again.champion) == ("3", "unchanged", False) and "rolled back" in again.reason
    assert aliases(client) == {"champion": "1", "previous-champion": "3"}

    # A plain rollback undoes the pick: back to version 3, returned to on purpose, so it loses its
    # rolled_back_* tags; previous-champion steps back to the version 3 replaced.
    done = rollback(NAME, client, "the sign-off was withdrawn")
    assert (done.demoted, done.champion, done.previous_champion, done.chosen) == ("1", "3", "2", False)
    assert aliases(client) == {"champion": "3", "previous-champion": "2"}
    restored = client.get_model_version(NAME, "3").tags
    assert restored["gate_decision"] == "restored" and not set(ROLLED_BACK) & set(restored)
    assert client.get_model_version(NAME, "1").tags["rolled_back_to"] == "3"

    # Version 1, rolled back since, chosen again on purpose: its own rolled_back_* tags go.
    rollback(NAME, client, "signed off again", to=1)
    assert aliases(client) == {"champion": "1", "previous-champion": "3"}
    assert not set(ROLLED_BACK) & set(client.get_model_version(NAME, "1").tags)
    assert client.get_model_version(NAME, "3").tags["rolled_back_reason"] == "signed off again"


def test_a_hand_pick_of_a_missing_current_or_broken_version_is_refused_and_champion_stays(client, ranked):
    split, models = ranked
    params = RegisterParams(NAME, "t", confidence=0.0, sensitivity_tolerance=1.0, floors={"test_recall": 0.8})
    register(params, evaluated_run(0.9), *models["bad"], split, client)
    register(params, evaluated_run(0.9, recall=0.5), *models["good"], split, client)  # v2: below a floor
    register(params, evaluated_run(0.9), *models["random"], split, client)
    assert aliases(client) == {"champion": "3", "previous-champion": "1", "challenger": "2"}
    assert client.get_model_version(NAME, "2").tags["gate_basis"]

    with pytest.raises(RegistryError, match=r"has no version '7' \(its versions: 1, 2, 3\); champion stays at version 3"):
        rollback(NAME, client, "a typo", to=7)
    with pytest.raises(RegistryError, match=r"version 3 of 'fracture-classifier' already is champion"):
        rollback(NAME, client, "already", to=3)
    _break_artifacts(client, "1")
    with pytest.raises(RegistryError, match=r"version 1 cannot be loaded from the registry .*champion stays at version 3"):
        rollback(NAME, client, "its files are gone", to=1)
    assert aliases(client) == {"champion": "3", "previous-champion": "1", "challenger": "2"}
    assert not set(ROLLED_BACK) & set(client.get_model_version(NAME, "3").tags)
    assert client.get_model_version(NAME, "1").tags["gate_decision"] == "promoted"

    # The challenger, chosen by hand, is champion and challenger no more.
    rollback(NAME, client, "signed off despite its recall", to=2)
    assert aliases(client) == {"champion": "2", "previous-champion": "3"}
    tags = client.get_model_version(NAME, "2").tags
    assert tags["gate_decision"] == "chosen" and "gate_basis" not in tags


def test_a_hand_pick_stopped_before_previous_champion_moves_is_finished_by_the_next_rollback(client, ranked):
    split, models = ranked
    three_champions(client, split, models)
    with stopped_when_moving(client, "previous-champion"):
        rollback(NAME, client, "sign-off", to=1)
    assert aliases(client) == {"champion": "1", "previous-champion": "2"}
    assert client.get_model_version(NAME, "3").tags["rolled_back_to"] == "1"
    # A plain rollback finishes the pick, then undoes it as it would a finished one.
    done = rollback(NAME, client, "undo")
    assert (done.demoted, done.champion, done.previous_champion) == ("1", "3", "2")
    assert aliases(client) == {"champion": "3", "previous-champion": "2"}

    with stopped_when_moving(client, "previous-champion"):
        rollback(NAME, client, "sign-off", to=1)
    assert aliases(client) == {"champion": "1", "previous-champion": "2"}
    # The same pick run again finishes it rather than refusing a version that already is champion.
    done = rollback(NAME, client, "sign-off", to=1)
    assert (done.demoted, done.champion, done.previous_champion, done.chosen) == ("3", "1", "3", True)
    assert aliases(client) == {"champion": "1", "previous-champion": "3"}
    assert not set(ROLLED_BACK) & set(client.get_model_version(NAME, "1").tags)
    with pytest.raises(RegistryError, match="already is champion"):
        rollback(NAME, client, "sign-off", to=1)


def test_a_version_of_the_champions_run_chosen_by_hand_keeps_no_rollback_when_the_flow_registers_the_run_again(
    client, ranked
):
    """After `serve` changed, the champion's run is a new version; chosen by hand (as docs/registry.md
    says), the version it replaced is tagged rolled back, but the run is not: the next flow run
    finds the chosen champion as it is, not tagged rolled back."""
    split, models = ranked
    weights, config = models["good"]
    run_id = evaluated_run(0.90)
    assert register(PARAMS, run_id, weights, config, split, client).champion
    tightened = dataclasses.replace(config, input=InputPolicy(max_rows=4, modalities=("DX",)))
    assert register(PARAMS, run_id, weights, tightened, split, client).version == "2"
    rollback(NAME, client, "serve the new checks", to=2)
    again = register(PARAMS, run_id, weights, tightened, split, client)
    assert (again.version, again.reason) == ("2", "already champion")
    assert not set(ROLLED_BACK) & set(client.get_model_version(NAME, "2").tags)
    assert aliases(client) == {"champion": "2", "previous-champion": "1"}


def test_a_hand_pick_stopped_before_champion_moves_is_not_undone_by_a_plain_rollback(client, ranked):
    """The champion is already tagged as replaced by the pick: a plain rollback would demote a
    champion the pick never replaced. It refuses, naming the pick to finish; the pick run again does."""
    split, models = ranked
    three_champions(client, split, models)
    with stopped_when_moving(client, "champion"):
        rollback(NAME, client, "sign-off of version 1", to=1)
    assert aliases(client) == {"champion": "3", "previous-champion": "2"}
    with pytest.raises(RegistryError, match=r"a hand pick of version 1 in place of champion version 3 was stopped "
                                            r"before champion moved: finish it with `fracture rollback --to 1"):
        rollback(NAME, client, "undo")
    assert aliases(client) == {"champion": "3", "previous-champion": "2"}
    done = rollback(NAME, client, "sign-off of version 1", to=1)
    assert (done.demoted, done.champion, done.previous_champion) == ("3", "1", "3")
    assert aliases(client) == {"champion": "1", "previous-champion": "3"}


def test_another_version_picked_after_a_stopped_pick_leaves_the_first_without_its_choice(client, ranked):
    """A pick of version 1 stopped before champion moved, then version 2 picked instead: version 1
    never became champion, so it no longer says it was chosen in place of the champion."""
    split, models = ranked
    three_champions(client, split, models)
    with stopped_when_moving(client, "champion"):
        rollback(NAME, client, "sign-off of version 1", to=1)
    assert client.get_model_version(NAME, "1").tags["gate_decision"] == "chosen"
    done = rollback(NAME, client, "sign-off of version 2 instead", to=2)
    assert (done.demoted, done.champion) == ("3", "2")
    first = client.get_model_version(NAME, "1").tags
    assert "replaced_version" not in first and first.get("gate_decision") != "chosen"
    assert "chosen by hand" not in first.get("gate_reason", "")
    second = client.get_model_version(NAME, "2").tags
    assert second["gate_decision"] == "chosen" and second["replaced_version"] == "3"
    assert client.get_model_version(NAME, "3").tags["rolled_back_to"] == "2"


def test_fracture_rollback_to_chooses_a_version_by_hand(client, ranked, tmp_path, monkeypatch, capsys):
    split, models = ranked
    for model in ("bad", "good"):
        register(ANY_GAIN, evaluated_run(0.9), *models[model], split, client)
    assert aliases(client) == {"champion": "2", "previous-champion": "1"}
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stage_register, "rollback", rollback)  # loaded in this process (the default: test above)

    with pytest.raises(SystemExit, match=r"fracture rollback: registered model 'fracture-classifier' has no version '5'"):
        cli(["rollback", "--to", "5", "--reason", "a typo"])
    cli(["rollback", "--to", "1", "--reason", "clinical sign-off"])
    out = capsys.readouterr().out
    assert ("fracture-classifier: champion moved from version 2 to version 1, chosen by hand; previous-champion: "
            "version 2, tagged rolled_back_at") in out
    assert aliases(client) == {"champion": "1", "previous-champion": "2"}
    assert client.get_model_version(NAME, "2").tags["rolled_back_reason"] == "clinical sign-off"
    cli(["rollback", "--reason", "sign-off withdrawn"])
    assert "champion rolled back from version 1 to version 2; previous-champion: none" in capsys.readouterr().out
    assert aliases(client) == {"champion": "2"}


def test_a_run_whose_evaluation_changed_is_registered_as_a_new_version(client, ranked, tmp_path):
    """The evaluate stage ran again (another threshold rule): the run's version serves the old
    threshold, so the run is registered again, and the gate decides on the new version."""
    import dataclasses

    split, models = ranked
    weights, config = models["good"]
    run_id = evaluated_run(0.90)

    def evaluate_card(threshold: float, folder: Path) -> None:  # as the evaluate stage logs its card into the run
        folder.mkdir()
        card = folder / "model_card.md"
        card.write_text(f"# Model card\n- Decision threshold {threshold}\n")
        with mlflow.start_run(run_id=run_id):
            mlflow.log_artifact(str(card), artifact_path="evaluation")

    def packed_card(version: str) -> str:
        folder = mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version}")
        return (Path(folder) / "artifacts" / "model_card.md").read_text()

    evaluate_card(0.5, (tmp_path / "first"))
    first = register(PARAMS, run_id, weights, config, split, client)
    assert (first.version, first.created) == ("1", True)
    assert register(PARAMS, run_id, weights, config, split, client).created is False  # nothing changed
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({"test_recall": 0.95, "test_specificity": 0.6})
    evaluate_card(0.2, (tmp_path / "again"))
    again = register(PARAMS, run_id, weights, dataclasses.replace(config, threshold=0.2), split, client)
    assert (again.version, again.created) == ("2", True)
    tags = client.get_model_version(NAME, "2").tags
    assert float(tags["threshold"]) == 0.2 and '"test_recall": 0.95' in tags["metrics"]
    # The same network against itself: no evidence, so the champion stays, and says why.
    assert again.decision == "challenger" and "beats champion" in again.reason
    assert float(client.get_model_version(NAME, "1").tags["threshold"]) == 0.5
    # Each version keeps the card of the evaluation it was registered with, which its description
    # names; the run's own card is the latest evaluation's.
    assert packed_card("1").endswith("Decision threshold 0.5\n") and packed_card("2").endswith("Decision threshold 0.2\n")
    for version in ("1", "2"):
        assert "`artifacts/model_card.md` among this version's model files" in client.get_model_version(NAME, version).description


def test_a_run_registered_again_under_other_input_checks_is_a_new_version_that_serves_them(client, ranked):
    """params.yaml's serve section changed (fewer rows a request, DX only) and `make main` ran
    again: the version registered before serves the checks it was logged with, so reusing it would
    leave the champion serving them as if the change had been applied."""
    import dataclasses

    from fracture.intake import InputPolicy

    split, models = ranked
    weights, config = models["good"]
    run_id = evaluated_run(0.90)
    assert register(PARAMS, run_id, weights, config, split, client).created
    tightened = dataclasses.replace(config, input=InputPolicy(max_rows=4, modalities=("DX",)))
    again = register(PARAMS, run_id, weights, tightened, split, client)
    assert (again.version, again.created) == ("2", True)
    policy = json.loads(client.get_model_version(NAME, "2").tags["input_policy"])
    assert (policy["max_rows"], policy["modalities"]) == (4, ["DX"])
    assert json.loads(client.get_model_version(NAME, "1").tags["input_policy"])["max_rows"] == 64
    assert register(PARAMS, run_id, weights, tightened, split, client).created is False  # nothing changed since


def test_one_run_registered_twice_at_once_keeps_one_version(client, ranked, monkeypatch):
    """Two checkouts sharing a registry registered the same run at the same moment: both found no
    version and both registered one. The run keeps the first; the later one is removed."""
    split, models = ranked
    real = registry_module.mlflow.register_model

    def another_checkout_registers_it_first(uri, name, **kwargs):
        real(uri, name, **kwargs)  # the other registration, between our search and ours
        return real(uri, name, **kwargs)

    monkeypatch.setattr(registry_module.mlflow, "register_model", another_checkout_registers_it_first)
    run_id = evaluated_run(0.9)
    done = register(PARAMS, run_id, *models["good"], split, client)
    assert (done.version, done.created) == ("1", False)
    assert [str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")] == ["1"]


def test_a_test_split_that_cannot_rank_is_refused_before_anything_is_registered(client, ranked):
    split, models = ranked
    with pytest.raises(RegistryError, match=r"has test_roc_auc nan: its test split cannot rank the model"):
        register(PARAMS, evaluated_run(float("nan")), *models["good"], split, client)
    assert client.search_model_versions(f"name = '{NAME}'") == []


def _break_packaged_code(monkeypatch) -> None:
    """Every version logged from now on carries a copy of the code whose serving module cannot be
    imported, as a packaging mistake leaves it; this installation's code is untouched."""
    real = registry_module.log_pyfunc

    def logged_broken(*args, **kwargs):
        uri = real(*args, **kwargs)
        root = Path(mlflow.get_logged_model(uri.removeprefix("models:/")).artifact_location.removeprefix("file://"))
        (serving,) = root.rglob("code/fracture/serving.py")
        serving.write_text(serving.read_text() + "\nraise ImportError('a module left out of the package')\n")
        return uri

    monkeypatch.setattr(registry_module, "log_pyfunc", logged_broken)


def test_the_load_check_reads_a_consumers_answer_as_strictly_as_its_own_load(tmp_path, monkeypatch):
    """Given the version's answer from its scoring, the load check judges the check image's row
    by the same rules; an answer that does not hold the image is not trusted, the version loads."""
    image = tmp_path / "xray.jpg"
    image.write_bytes(b"not read: the answer holds its row")
    other = tmp_path / "other.jpg"

    def answer(**row) -> ConsumerAnswer:
        rows = pd.DataFrame([{"fracture_probability": 0.2, "label": "fractured", "threshold": 0.5, "error": ""},
                             {"fracture_probability": 0.7, "label": "fractured", "threshold": 0.5, "error": ""} | row])
        return ConsumerAnswer(rows, "/models/v2/code/fracture/__init__.py", files=(str(other), str(image.resolve())))

    assert load_check(NAME, "2", image, 0.5, answer=answer()).passed  # the second row, the image's
    wrong = load_check(NAME, "2", image, 0.3, answer=answer())
    assert not wrong.passed and "threshold 0.5 instead of 0.3" in wrong.detail
    refused = load_check(NAME, "2", image, 0.5, answer=answer(error="not an X-ray", label="not_fractured"))
    assert not refused.passed and "error 'not an X-ray'" in refused.detail
    ours = ConsumerAnswer(answer().rows, str(Path(fracture.__file__)), files=answer().files)
    assert "ran this installation's code" in load_check(NAME, "2", image, 0.5, answer=ours).detail
    loads = []

    def load(uri, files, *args, **kwargs):
        loads.append((uri, files))
        raise ConsumerError(f"{uri} failed in a consumer's Python (exit 1): no such version here")

    monkeypatch.setattr(scoring_module, "predict_as_consumer", load)
    assert load_check(NAME, "2", image, 0.5, answer=answer()).passed and loads == []
    elsewhere = ConsumerAnswer(answer().rows, answer().code, files=(str(other),))
    loaded = load_check(NAME, "2", image, 0.5, answer=elsewhere)
    assert loads == [(f"models:/{NAME}/2", [image])]
    assert not loaded.passed and loaded.detail.startswith(f"models:/{NAME}/2 failed on xray.jpg: ConsumerError")


def test_a_champion_logged_before_per_row_errors_is_scored_from_its_answer_without_them(tmp_path, monkeypatch):
    """A version logged up to 2026-11-30 answers fracture_probability, label and threshold only: the
    gate stopped on KeyError 'error' at every run, and the new version stayed challenger."""
    paths = [tmp_path / f"{i}.jpg" for i in range(3)]
    rows = pd.DataFrame({"fracture_probability": [0.1, 0.8, 0.4], "label": ["n", "f", "n"], "threshold": [0.5] * 3})
    monkeypatch.setattr(scoring_module, "predict_as_consumer",
                        lambda uri, files: ConsumerAnswer(rows, "/models/v1/code/fracture/__init__.py", files=()))
    probs, threshold = served_scores(NAME, "1", EvaluatedSplit("s" * 64, 3, paths[0], tuple(paths)))
    assert probs.tolist() == [0.1, 0.8, 0.4] and threshold == 0.5
    # A version of today's that refused a file still fails the scoring, naming it.
    monkeypatch.setattr(scoring_module, "predict_as_consumer", lambda uri, files: ConsumerAnswer(
        rows.assign(error=["", "not an X-ray", ""]), "/models/v2/code/fracture/__init__.py", files=()))
    with pytest.raises(ConsumerError, match="refused 1 of the test split's 3 images, e.g. 1.jpg: not an X-ray"):
        served_scores(NAME, "2", EvaluatedSplit("s" * 64, 3, paths[0], tuple(paths)))


def test_a_version_whose_packaged_code_is_broken_fails_the_load_check_in_a_consumers_python(client, ranked, monkeypatch):
    """The load check ran in the pipeline's process, whose installed code the version then used, so
    a version with broken packaged code passed it and became champion while no consumer could load
    it. Loaded in a Python of its own, with its own code, it fails, and earns no alias."""
    split, models = ranked
    _break_packaged_code(monkeypatch)
    run_id = evaluated_run(0.90)
    assert register(PARAMS, run_id, *models["good"], split, client).champion  # in this process: not caught
    client.delete_registered_model_alias(NAME, "champion")
    fresh = register_isolated(PARAMS, evaluated_run(0.90), *models["good"], split, client)
    assert (fresh.version, fresh.decision, fresh.champion) == ("2", "challenger", False)
    load = fresh.checks[-1]
    assert load.name == "load check" and not load.passed
    assert "failed in a consumer's Python" in load.detail and "a module left out of the package" in load.detail


def test_versions_load_and_score_with_their_own_code_in_a_consumers_python(client, ranked, monkeypatch):
    """The default gate: the champion and the version each scored in a Python of their own, with
    the code packaged with them, giving the scores this process gives with the same code. A
    challenge starts two such Pythons: the load check reads the version's answer from its scoring."""
    split, models = ranked
    started, answers = [], {}

    def counted(uri, files, *args, **kwargs):
        started.append((uri, len(files)))
        answers[uri] = predict_as_consumer(uri, files, *args, **kwargs)
        return answers[uri]

    monkeypatch.setattr(scoring_module, "predict_as_consumer", counted)
    first = register_isolated(PARAMS, evaluated_run(0.85), *models["bad"], split, client)
    assert first.champion and "predicted" in first.checks[-1].detail
    assert started == [(f"models:/{NAME}/1", 1)]  # a first version: its load check alone
    started.clear()
    better = register_isolated(PARAMS, evaluated_run(0.90), *models["good"], split, client)
    assert (better.decision, better.champion) == ("promoted", True)
    assert started == [(f"models:/{NAME}/2", len(split.paths)), (f"models:/{NAME}/1", len(split.paths))]
    load = better.checks[-1]
    assert load.name == "load check" and load.passed
    assert load.detail.startswith(f"models:/{NAME}/2 predicted {split.check_image.name}: fracture_probability ")
    assert (better.comparison.auc.auc_a, better.comparison.auc.auc_b) == (1.0, 0.0)
    # The gate's scores of version 2 in its consumer's Python are this process's scores of it.
    ours, threshold = served_scores(NAME, "2", split, isolated=False)
    theirs = answers[f"models:/{NAME}/2"].rows
    np.testing.assert_allclose(theirs["fracture_probability"], ours, rtol=0, atol=1e-6)
    assert threshold == 0.5 and set(theirs["threshold"]) == {0.5}
    # A rollback's load in a consumer's Python: `fracture rollback` in the gate's end-to-end test.


@pytest.mark.parametrize("stopped", ["plain rollback", "pick of version 3"])
def test_a_pick_that_became_champion_keeps_its_record_when_a_later_change_stopped_midway(client, ranked, stopped):
    """Version 1, chosen by hand, served as champion; a rollback (or a pick of 3) back to version 3
    stopped just after champion moved leaves 3 tagged as rolled back to 1. Neither a plain rollback
    nor a pick of version 2 then takes version 1 for a pick that never became champion."""
    split, models = ranked
    three_champions(client, split, models)
    rollback(NAME, client, "sign-off of version 1", to=1)
    with stopped_when_moving(client, "champion", after=True):
        rollback(NAME, client, "withdrawn", **({} if stopped == "plain rollback" else {"to": 3}))
    assert aliases(client)["champion"] == "3"
    if stopped == "plain rollback":
        rollback(NAME, client, "the rollback again")  # finishes it rather than refusing for a stopped pick of 1
        assert aliases(client)["champion"] == "3"
    rollback(NAME, client, "sign-off of version 2", to=2)
    first = client.get_model_version(NAME, "1").tags
    assert first["gate_decision"] == "chosen" and first["replaced_version"] == "3"
    assert aliases(client)["champion"] == "2"
