"""An ensemble of seeds (``profiles.<p>.members``): trained, saved, served, explained and read by the detector."""

from __future__ import annotations

import dataclasses
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score

from fracture.config import ConfigError, load_params, parse_params
from fracture.detection import build_detector
from fracture.ensemble import SeedEnsemble, ensemble_size
from fracture.explain import grad_cam
from fracture.inference import Classifier, ServingConfig, load_network
from fracture.model import data_config
from fracture.packaging import save_pyfunc
from fracture.training import fit_members, train
from tests.conftest import REPO
from tests.test_detection import CONFIG
from tests.test_serving import xray_paths
from tests.test_training import counting_stem, tiny_run

FROZEN = ("conv_stem", "bn1", "blocks.0", "blocks.1")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Two members fitted on 13 synthetic images (val: the same images), the stem's images counted,
    and the one network that ``members: 1`` trains on the same data."""
    from fracture import training  # noqa: PLC0415 - the model factory is wrapped below

    tmp_path = tmp_path_factory.mktemp("ensemble")
    params, profile, config, data = tiny_run(tmp_path, 6, 7, image_size=64, epochs=2, frozen=FROZEN, members=2)
    train_params = dataclasses.replace(params.train, lr=1e-3, batch_size=4)
    stem_images: list[int] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "create_classifier", counting_stem(stem_images))
        logged: list[tuple[int, dict]] = []
        fit = fit_members(data, data, config, profile, train_params, on_epoch=lambda e, m: logged.append((e, m)))
        stem = sum(stem_images)
    one = train(data, data, config, dataclasses.replace(profile, members=1), train_params)
    return {"fit": fit, "one": one, "data": data, "config": config, "stem": stem, "logged": logged,
            "profile": profile}


def test_member_one_is_the_single_network_and_the_frozen_layers_run_once_per_image(fitted):
    fit, one = fitted["fit"], fitted["one"]
    ensemble = fit.model
    assert isinstance(ensemble, SeedEnsemble) and len(ensemble.members) == 2 and int(ensemble.shared) == 2
    first, second = (m.state_dict() for m in ensemble.members)
    for name, tensor in one.model.state_dict().items():
        assert torch.equal(first[name], tensor), name  # member 1 is what members: 1 trains, bit for bit
    assert not torch.equal(first["blocks.3.0.conv_pw.weight"], second["blocks.3.0.conv_pw.weight"])  # another seed
    assert torch.equal(first["blocks.1.0.conv_pw.weight"], second["blocks.1.0.conv_pw.weight"])  # frozen, shared
    # 13 images, each the training set's and val's: the stem saw each once as a training image
    # (a lone last one may wait an epoch) and once as a val image (and its mirror, under the CPU
    # profile's tta: hflip), over both members' 4 epochs.
    val = 13 * (2 if fitted["profile"].tta == "hflip" else 1)
    assert 12 + val <= fitted["stem"] <= 13 + val
    assert [h["member"] for h in fit.history] == [1, 1, 2, 2]
    assert [e for e, _ in fitted["logged"]] == [0, 1, 2, 3]  # numbered on across the members
    assert fit.member_best_epochs[0] == fit.best_epoch == one.best_epoch and len(fit.member_best_epochs) == 2


def test_each_member_keeps_its_own_best_epoch_and_the_ensemble_scores_those(tmp_path, monkeypatch):
    """Member 1's val ROC AUC peaks at epoch 2 and member 2's at epoch 1 (scripted): each keeps its
    own, and the ensemble's val figures are the mean of those epochs' probabilities."""
    from fracture import training  # noqa: PLC0415 - patched in this test only

    params, profile, config, data = tiny_run(tmp_path, 6, 7, image_size=64, epochs=2, frozen=FROZEN, members=2,
                                             snapshots=1, ema_decay=0.0)
    scripted, scored = iter([0.6, 0.9, 0.8, 0.5]), []

    def val_auc(labels, probabilities):  # each member's epochs in turn, then the ensemble's own (computed)
        scored.append(np.array(probabilities))
        return next(scripted, None) or roc_auc_score(labels, probabilities)

    monkeypatch.setattr(training, "roc_auc_score", val_auc)
    fit = fit_members(data, data, config, profile, dataclasses.replace(params.train, lr=1e-3, batch_size=4))
    assert [h["val_roc_auc"] for h in fit.history] == [0.6, 0.9, 0.8, 0.5]
    assert fit.member_best_epochs == (2, 1) and fit.best_epoch == 2
    best = (scored[1] + scored[2]) / 2  # member 1 after epoch 2, member 2 after epoch 1
    np.testing.assert_allclose(fit.best_val_probabilities, best, rtol=1e-6)
    assert fit.best_val_roc_auc == pytest.approx(roc_auc_score(data.tensors[1].numpy(), best))
    np.testing.assert_allclose(fit.final_val_probabilities, (scored[1] + scored[3]) / 2, rtol=1e-6)


def test_the_ensemble_scores_the_mean_of_its_members_probabilities(fitted):
    fit, data = fitted["fit"], fitted["data"]
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        mean = torch.stack([m(x).softmax(1) for m in fit.model.members]).mean(0)
        assert torch.allclose(fit.model(x).softmax(1), mean, atol=1e-6)
    labels = data.tensors[1].numpy()
    assert fit.best_val_roc_auc == pytest.approx(roc_auc_score(labels, fit.best_val_probabilities))
    # The val scores are the ensemble's own: scored again through it, the same within float rounding.
    classifier = Classifier(fit.model, ServingConfig("tf_efficientnet_lite0", fitted["config"], 0.5))
    from fracture.inference import probabilities  # noqa: PLC0415

    again = probabilities(fit.model, data.tensors[0], classifier.preprocessor, torch.device("cpu"), 8,
                          fitted["profile"].tta)
    np.testing.assert_allclose(again, fit.best_val_probabilities, atol=1e-5)


def test_saved_weights_load_back_as_the_ensemble_and_members_that_differ_where_shared_are_refused(fitted, tmp_path):
    ensemble = fitted["fit"].model
    state = ensemble.state_dict()
    assert ensemble_size(state) == 2 and ensemble_size(fitted["one"].model.state_dict()) == 0
    save_file(state, str(tmp_path / "model.safetensors"))  # safetensors takes it: no tensor is stored twice
    loaded = load_network(tmp_path / "model.safetensors", "tf_efficientnet_lite0")
    assert isinstance(loaded, SeedEnsemble) and int(loaded.shared) == 2
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), ensemble(x), atol=1e-6)  # frozen batch norm and plain: float rounding
    state["members.1.blocks.0.0.conv_dw.weight"] = state["members.1.blocks.0.0.conv_dw.weight"] + 1
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"member 2's frozen layers differ from member 1's \(first: blocks\.0\.0\.conv_dw"):
        load_network(tmp_path / "bad.safetensors", "tf_efficientnet_lite0")
    with pytest.raises(ValueError, match="at least two members"):
        SeedEnsemble([ensemble.members[0]], 2)


def test_the_served_ensemble_scores_an_xray_as_in_process(fitted, tmp_path):
    config = ServingConfig("tf_efficientnet_lite0", data_config(fitted["fit"].model.members[0], 64), 0.5,
                           {"profile": "cpu", "classes": ["not_fractured", "fractured"]})
    save_file(fitted["fit"].model.state_dict(), str(tmp_path / "model.safetensors"))
    served = mlflow.pyfunc.load_model(str(save_pyfunc(tmp_path / "pyfunc", tmp_path / "model.safetensors", config)))
    jpeg = xray_paths()[0]
    out = served.predict(pd.DataFrame({"image": [jpeg.read_bytes()]}))
    classifier = Classifier.load(tmp_path / "model.safetensors", config)
    expected = classifier.probabilities([classifier.preprocessor.open(jpeg, allow_truncated=False)])[0]
    assert out["error"][0] == "" and abs(out["fracture_probability"][0] - expected) <= 1e-6


def test_grad_cam_of_the_ensemble_is_the_mean_of_its_members_maps(fitted):
    ensemble = fitted["fit"].model
    classifier = Classifier(ensemble, ServingConfig("tf_efficientnet_lite0", fitted["config"], 0.5))
    batch = classifier.batch([classifier.preprocessor.open(xray_paths()[0], allow_truncated=False)])
    for target in (0, 1):
        maps = [grad_cam(m, batch, target) for m in ensemble.members]
        mean = np.mean(maps, axis=0)
        np.testing.assert_allclose(grad_cam(ensemble, batch, target), mean / mean.max(), atol=1e-6)
        if target == 0:  # on this X-ray both members' maps have a peak, and they differ
            assert [m.max() for m in maps] == [1, 1] and np.abs(maps[0] - maps[1]).max() > 0.1


def test_the_detector_takes_the_first_members_network_as_its_backbone(fitted):
    ensemble = fitted["fit"].model
    body = build_detector(CONFIG, ensemble.state_dict()).backbone.body
    assert torch.equal(body.blocks[3][0].conv_pw.weight, ensemble.members[0].blocks[3][0].conv_pw.weight)


def test_members_must_be_a_whole_number_of_at_least_one():
    import yaml  # noqa: PLC0415

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert load_params(REPO).profiles["paper"].members == 1
    for bad in (0, 1.5, "two"):
        raw["profiles"]["cpu"]["members"] = bad
        with pytest.raises(ConfigError, match=r"profiles\.cpu\.members must be a whole number of at least 1"):
            parse_params(raw)


def test_a_rerun_whose_members_all_checkpointed_restores_them_and_scores_the_ensemble_once(tmp_path):
    params, profile, config, data = tiny_run(tmp_path, 6, 7, image_size=64, epochs=2, frozen=FROZEN, members=2)
    train_params = dataclasses.replace(params.train, lr=1e-3, batch_size=4)
    first = fit_members(data, data, config, profile, train_params, checkpoint_dir=tmp_path / "ckpt", checkpoint_key="k")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["member-1", "member-2"]
    again = fit_members(data, data, config, profile, train_params, checkpoint_dir=tmp_path / "ckpt", checkpoint_key="k")
    assert again.resumed_from == 4 and again.final_val_probabilities is None
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor), name
    assert again.best_val_roc_auc == pytest.approx(first.best_val_roc_auc, abs=1e-6)
    np.testing.assert_allclose(again.best_val_probabilities, first.best_val_probabilities, atol=1e-5)


def test_the_stages_train_evaluate_and_cross_validate_an_ensemble(tmp_path, monkeypatch):
    from fracture.stages.crossval import run_crossval  # noqa: PLC0415
    from fracture.stages.evaluate import run_evaluate  # noqa: PLC0415
    from fracture.stages.train import run_train  # noqa: PLC0415
    from tests.test_crossval import tiny_ensemble_project  # noqa: PLC0415

    params, workspace = tiny_ensemble_project(tmp_path, monkeypatch, members=2)
    trained = run_train(params, workspace)
    assert trained is not None
    model = json.loads((workspace.train_dir / "model.json").read_text())
    assert model["members"] == 2 and len(model["member_best_epochs"]) == 2
    history = json.loads((workspace.train_dir / "history.json").read_text())
    assert [h["member"] for h in history] == [1, 1, 2, 2]
    # dvc.yaml plots the history over each row's MLflow step: the two networks' epochs apart, not over one another.
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]
    (plot,) = stage["plots"]
    assert plot["outputs/train/history.json"]["x"] == "step"
    assert isinstance(load_network(workspace.weights, model["architecture"]), SeedEnsemble)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(trained.run_id).data
    assert run.metrics["member_1_best_epoch"] == model["member_best_epochs"][0]
    assert sorted(m.step for m in client.get_metric_history(trained.run_id, "val_roc_auc")) == [1, 2, 3, 4]
    evaluated = run_evaluate(params, workspace)
    assert 0 <= evaluated.metrics["roc_auc"] <= 1
    card = (workspace.evaluate_dir / "model_card.md").read_text()
    assert "2 networks trained under seeds train.seed onwards" in card
    folds = run_crossval(params, workspace)
    oof = pd.read_csv(workspace.crossval_dir / "oof.csv")
    assert list(oof.columns) == ["image_id", "fold", "label", "probability", "group", "probability_member_1",
                                 "probability_member_2"]
    np.testing.assert_allclose(oof["probability"], oof[["probability_member_1", "probability_member_2"]].mean(axis=1),
                               atol=1e-6)
    for fold in folds.folds:
        held = oof[oof["fold"] == fold.fold]
        assert fold.roc_auc == pytest.approx(roc_auc_score(held["label"], held["probability"]))
