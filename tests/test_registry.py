"""The promotion gate and the registry against a real MLflow sqlite store and real models.

The gate decides on the metrics the evaluate stage logs into the training run, so the runs here
log chosen metrics next to a real (ImageNet-initialised, untrained) Lite0 model at 64 px; every
promotion loads the registered model back and predicts a real FracAtlas X-ray.
"""

from __future__ import annotations

import dataclasses
import shutil

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from safetensors.torch import save_file

from fracture.cli import main as cli
from fracture.config import ConfigError, RegisterParams, load_params, parse_params
from fracture.gate import EvaluatedSplit, Evaluation, gate, split_fingerprint
from fracture.imaging import DataConfig
from fracture.inference import ServingConfig
from fracture.packaging import REQUIREMENTS, requirements
from fracture.registry import RegistryError, register, rollback
from fracture.scoring import rescore
from fracture.stages.register import run_register
from fracture.workspace import EvaluateResult, TrainedModel, Workspace
from tests.conftest import REPO, pick_ids, untrained_model_files

NAME = "fracture-classifier"
SPLIT_A = "a" * 64
SPLIT_B = "b" * 64
DATA = "0123456789abcdef0123456789abcdef.dir"
PARAMS = RegisterParams(
    model_name=NAME,
    metric="test_roc_auc",
    experiment="t",
    margin=0.01,
    floors={"test_roc_auc": 0.80, "test_recall": 0.80},
)


# --- the gate's rules, on their own ---------------------------------------------------------------


def evaluation(auc: float, recall: float = 0.9, split: str | None = SPLIT_A, data: str | None = DATA, version=None):
    return Evaluation(version, {"test_roc_auc": auc, "test_recall": recall}, split, data)


def failed(checks) -> list[str]:
    return [c.name for c in checks if not c.passed]


def test_gate_floors_apply_even_without_a_champion():
    assert failed(gate(PARAMS, evaluation(0.90), None)) == []
    checks = gate(PARAMS, evaluation(0.79, recall=0.95), None)
    assert failed(checks) == ["floor test_roc_auc"]
    assert checks[0].detail == "0.7900 < 0.8"
    assert failed(gate(PARAMS, evaluation(0.95, recall=0.5), None)) == ["floor test_recall"]


@pytest.mark.parametrize(
    ("new", "old", "wins"),
    [(0.92, 0.90, True), (0.91, 0.90, True), (0.905, 0.90, False), (0.90, 0.90, False), (0.85, 0.90, False)],
)
def test_gate_needs_the_margin_over_the_champion(new, old, wins):
    checks = gate(PARAMS, evaluation(new), evaluation(old, version="1"))
    assert failed(checks) == ([] if wins else ["beats champion"])
    assert f"{new:.4f} vs champion v1's {old:.4f}" in checks[-1].detail


def test_gate_with_margin_zero_still_needs_a_higher_score():
    params = RegisterParams(NAME, "test_roc_auc", "t", margin=0.0)
    assert failed(gate(params, evaluation(0.9001), evaluation(0.90, version="1"))) == []
    assert failed(gate(params, evaluation(0.90), evaluation(0.90, version="1"))) == ["beats champion"]


@pytest.mark.parametrize(
    ("new", "old", "rule"),
    [
        (evaluation(0.99, split=SPLIT_B), evaluation(0.80, version="4"), "same test split"),
        (evaluation(0.99, data="ffff.dir"), evaluation(0.80, version="4"), "same data version"),
        (evaluation(0.99, data=None), evaluation(0.80, data=None, version="4"), "same data version"),
        (evaluation(0.99), evaluation(0.80, split=None, version="4"), "same test split"),
    ],
)
def test_gate_does_not_compare_evaluations_on_other_data(new, old, rule):
    checks = gate(PARAMS, new, old)
    assert failed(checks) == [rule, "beats champion"]
    assert "not compared with champion v4" in checks[-1].detail


def test_split_fingerprint_ignores_row_order_and_paths_but_not_images_or_labels(tmp_path):
    frame = pd.DataFrame({"image_id": ["b.jpg", "a.jpg"], "path": ["x/b.jpg", "x/a.jpg"], "label": [1, 0]})
    same = frame.iloc[::-1].assign(path=["y/a.jpg", "y/b.jpg"])
    assert split_fingerprint(frame) == split_fingerprint(same)
    assert split_fingerprint(frame) != split_fingerprint(frame.assign(label=[0, 0]))
    assert split_fingerprint(frame) != split_fingerprint(frame.assign(image_id=["b.jpg", "c.jpg"]))
    frame.to_csv(tmp_path / "test.csv", index=False)
    split = EvaluatedSplit.from_csv(tmp_path / "test.csv", tmp_path / "data")
    assert (split.fingerprint, split.images, split.check_image) == (split_fingerprint(frame), 2, tmp_path / "data/x/b.jpg")


def test_register_params_are_checked():
    raw = yaml_params()
    raw["register"]["floors"] = {"test_roc_auc": "high"}
    with pytest.raises(ConfigError, match="register.floors"):
        parse_params(raw)
    raw["register"].update(floors={}, margin=-0.1)
    with pytest.raises(ConfigError, match="register.margin"):
        parse_params(raw)
    real = load_params(REPO).register
    assert real.margin >= 0 and {"test_roc_auc", "test_recall"} <= set(real.floors)


def yaml_params() -> dict:
    import yaml

    return yaml.safe_load((REPO / "params.yaml").read_text())


# --- against a real registry ------------------------------------------------------------------------


@pytest.fixture()
def model_files(tmp_path):
    return untrained_model_files(tmp_path, 0.37)


@pytest.fixture()
def client(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("t", artifact_location=(tmp_path / "art").as_uri()))
    return MlflowClient(uri)


@pytest.fixture()
def xray(fracatlas):
    return fracatlas / "images/Fractured/IMG0000019.jpg"


def evaluated_run(auc: float, recall: float = 0.9, data: str = DATA) -> str:
    """A training run as the evaluate stage leaves it: test metrics and provenance tags."""
    tags = {"data_version": data, "git_commit": "c0ffee", "profile": "cpu"}
    with mlflow.start_run(tags=tags) as run:
        mlflow.log_metrics({"test_roc_auc": auc, "test_recall": recall, "test_specificity": 0.7})
    return run.info.run_id


def aliases(client) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(NAME).aliases.items()}


def test_gate_promotes_keeps_previous_champion_and_rolls_back(client, model_files, xray, tmp_path, monkeypatch, capsys):
    weights, config = model_files
    split = EvaluatedSplit(SPLIT_A, 10, xray)

    first = register(PARAMS, evaluated_run(0.85), weights, config, split, client)
    assert (first.version, first.created, first.decision, first.champion) == ("1", True, "promoted", True)
    assert first.reason == "first version to pass the gate"
    load = first.checks[-1]
    assert load.name == "load check" and load.passed and "models:/fracture-classifier/1 predicted IMG0000019.jpg" in load.detail
    tags = client.get_model_version(NAME, "1").tags
    assert tags["split_fingerprint"] == SPLIT_A and tags["data_version"] == DATA and tags["git_commit"] == "c0ffee"
    assert tags["profile"] == "cpu" and float(tags["threshold"]) == 0.37 and tags["gate_decision"] == "promoted"
    assert '"test_roc_auc": 0.85' in tags["metrics"]

    low = register(PARAMS, evaluated_run(0.95, recall=0.6), weights, config, split, client)
    assert (low.version, low.decision, low.champion) == ("2", "challenger", False)
    assert low.reason == "floor test_recall: 0.6000 < 0.8"
    assert "load check" not in [c.name for c in low.checks]  # never loaded: it could not win anyway
    assert aliases(client) == {"champion": "1", "challenger": "2"}
    assert client.get_model_version(NAME, "2").tags["gate_reason"] == low.reason

    better_run = evaluated_run(0.90)
    better = register(PARAMS, better_run, weights, config, split, client)
    assert (better.version, better.decision, better.previous_champion) == ("3", "promoted", "1")
    assert (better.champion_version, better.champion_score) == ("1", 0.85)
    assert better.reason == "test_roc_auc 0.9000 beats champion v1's 0.8500"
    assert aliases(client) == {"champion": "3", "previous-champion": "1", "challenger": "2"}
    assert "promoted - test_roc_auc 0.9000" in better.summary()

    # Registering the same run again creates nothing and changes nothing.
    again = register(PARAMS, better_run, weights, config, split, client)
    assert (again.version, again.created, again.decision, again.reason) == ("3", False, "unchanged", "already champion")
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 3

    # `fracture rollback` in a project directory, against the same registry.
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    cli(["rollback"])
    out = capsys.readouterr().out
    assert "champion rolled back from version 3 to version 1; previous-champion: none" in out
    assert aliases(client) == {"champion": "1", "challenger": "2"}
    assert client.get_model_version(NAME, "3").tags["rolled_back_to"] == "1"

    # The rolled-back run is not promoted again when the flow registers it once more.
    rerun = register(PARAMS, better_run, weights, config, split, client)
    assert (rerun.version, rerun.created, rerun.decision, rerun.champion) == ("3", False, "unchanged", False)
    assert "rolled back" in rerun.reason
    assert aliases(client)["champion"] == "1"

    with pytest.raises(SystemExit, match="no 'previous-champion' to roll back to"):
        cli(["rollback"])


def test_rollback_steps_back_through_the_champions(client, model_files, xray):
    weights, config = model_files
    split = EvaluatedSplit(SPLIT_A, 10, xray)
    params = RegisterParams(NAME, "test_roc_auc", "t", margin=0.0)
    with pytest.raises(RegistryError, match="no 'champion' alias"):
        rollback(NAME, client)
    for auc in (0.81, 0.82, 0.83):
        assert register(params, evaluated_run(auc), weights, config, split, client).decision == "promoted"
    assert aliases(client) == {"champion": "3", "previous-champion": "2"}
    assert client.get_model_version(NAME, "3").tags["replaced_version"] == "2"

    done = rollback(NAME, client)
    assert (done.demoted, done.champion, done.previous_champion) == ("3", "2", "1")
    assert aliases(client) == {"champion": "2", "previous-champion": "1"}
    done = rollback(NAME, client)
    assert (done.demoted, done.champion, done.previous_champion) == ("2", "1", None)
    assert aliases(client) == {"champion": "1"}
    with pytest.raises(RegistryError, match="no 'previous-champion'"):
        rollback(NAME, client)


def test_other_split_and_a_model_that_fails_to_load_are_not_promoted(client, model_files, xray, tmp_path):
    weights, config = model_files
    first = register(PARAMS, evaluated_run(0.85), weights, config, EvaluatedSplit(SPLIT_A, 10, xray), client)
    assert first.champion

    # Far better, but on another test split the champion cannot be scored on (no images given):
    # not compared, not promoted, and the report says so.
    other = register(PARAMS, evaluated_run(0.99), weights, config, EvaluatedSplit(SPLIT_B, 12, xray), client)
    assert other.checks[0].name == "champion re-scored" and not other.checks[0].passed
    assert "carries no image paths" in other.checks[0].detail
    no_rescore = dataclasses.replace(PARAMS, rescore_champion=False)
    other = register(no_rescore, evaluated_run(0.99), weights, config, EvaluatedSplit(SPLIT_B, 12, xray), client)
    assert (other.decision, other.champion, other.champion_score) == ("challenger", False, None)
    assert [c.name for c in other.checks if not c.passed] == ["same test split", "beats champion"]
    assert "differs from champion v1's" in other.reason and "not compared" in other.reason
    assert aliases(client) == {"champion": "1", "challenger": "3"}

    # Better on the same split, but its weights do not fit the architecture: it cannot load.
    import timm

    broken = tmp_path / "broken.safetensors"
    save_file(timm.create_model("tf_efficientnet_lite0", num_classes=3).state_dict(), str(broken))
    bad = register(PARAMS, evaluated_run(0.95), broken, config, EvaluatedSplit(SPLIT_A, 10, xray), client)
    assert (bad.version, bad.decision, bad.champion) == ("4", "challenger", False)
    assert bad.checks[-1].name == "load check" and not bad.checks[-1].passed
    assert bad.reason.startswith("load check: models:/fracture-classifier/4 failed on IMG0000019.jpg")
    assert "size mismatch" in bad.reason
    assert aliases(client) == {"champion": "1", "challenger": "4"}


def test_a_run_without_the_metrics_is_not_registered(client, model_files, xray):
    weights, config = model_files
    with mlflow.start_run() as run:
        mlflow.log_metric("test_roc_auc", 0.9)
    with pytest.raises(RegistryError, match="no metric 'test_recall' \\(named in register.floors\\); run the evaluate"):
        register(PARAMS, run.info.run_id, weights, config, EvaluatedSplit(SPLIT_A, 10, xray), client)
    assert client.search_model_versions(f"name = '{NAME}'") == []


def project_after_evaluate(root, weights, config: ServingConfig, run_id: str, xray) -> pd.DataFrame:
    """A project whose train, split and evaluate stages have run, written through the workspace.

    The test split holds ``xray`` and a row without a path; returns the split table.
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
    test = pd.DataFrame({"image_id": [xray.name, "IMG9.jpg"], "path": [f"images/Fractured/{xray.name}", ""], "label": [1, 0]})
    workspace.split_dir.mkdir(parents=True)
    test.to_csv(workspace.split_table("test"), index=False)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    return test


def test_the_register_stage_registers_the_workspace_model(client, model_files, xray, tmp_path):
    """run_register reads the run, weights, threshold and test split from the stages' outputs."""
    weights, config = model_files
    run_id = evaluated_run(0.9)
    test = project_after_evaluate(tmp_path, weights, config, run_id, xray)

    reg = run_register(load_params(tmp_path), Workspace(tmp_path))
    assert (reg.name, reg.version, reg.run_id, reg.decision) == (NAME, "1", run_id, "promoted")
    assert reg.split_fingerprint == split_fingerprint(test)
    tags = client.get_model_version(NAME, "1").tags
    assert float(tags["threshold"]) == config.threshold and tags["profile"] == "cpu"
    assert tags["split_fingerprint"] == split_fingerprint(test)


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


def test_a_champion_from_another_split_is_scored_on_the_new_split_before_comparing(
    client, model_files, fracatlas, tmp_path
):
    weights, config = model_files
    ids = pick_ids(fracatlas, 6, 6)
    frame = pd.DataFrame(
        {
            "image_id": ids,
            "path": [f"images/{'Fractured' if i < 6 else 'Non_fractured'}/{x}" for i, x in enumerate(ids)],
            "label": [1] * 6 + [0] * 6,
        }
    )
    frame.to_csv(tmp_path / "test.csv", index=False)
    new_split = EvaluatedSplit.from_csv(tmp_path / "test.csv", fracatlas)
    assert len(new_split.paths) == 12 and new_split.labels == (1,) * 6 + (0,) * 6
    old_split = EvaluatedSplit(SPLIT_A, 10, new_split.check_image)
    first = register(PARAMS, evaluated_run(0.99, data="old-version.dir"), weights, config, old_split, client)
    assert first.champion

    # What the champion scores on the new split, computed here the way the evaluate stage does.
    scored = rescore(NAME, "1", new_split)
    assert 0.0 <= scored["test_roc_auc"] <= 1.0 and scored["test_n_images"] == 12

    # The new version's recorded 0.99 would lose to the champion's recorded 0.99; on the new
    # split the champion is scored afresh and the comparison uses that number.
    candidate = register(PARAMS, evaluated_run(0.99), weights, config, new_split, client)
    rescored = candidate.checks[0]
    assert rescored.name == "champion re-scored" and rescored.passed
    assert f"test_roc_auc {scored['test_roc_auc']:.4f} (recorded 0.9900 on its own split)" in rescored.detail
    assert candidate.champion_score == pytest.approx(scored["test_roc_auc"])
    assert all(c.passed for c in candidate.checks if c.name.startswith("same "))
    wins = 0.99 - scored["test_roc_auc"] >= PARAMS.margin
    assert candidate.decision == ("promoted" if wins else "challenger")


def test_a_model_trained_with_an_enhancement_requires_its_library():
    def config(enhance: str) -> ServingConfig:
        data = DataConfig((3, 64, 64), "bicubic", (0.5,) * 3, (0.5,) * 3, enhance=enhance)  # type: ignore[arg-type]
        return ServingConfig("tf_efficientnet_lite0", data, 0.5)

    assert requirements(config("none")) == REQUIREMENTS
    assert "opencv-contrib-python-headless" in requirements(config("clahe"))
    assert "opencv-contrib-python-headless" in requirements(config("canny"))
    assert "SimpleITK" in requirements(config("anisotropic_diffusion"))
