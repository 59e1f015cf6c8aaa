"""A snapshot ensemble (``profiles.<p>.snapshots``): the networks at the ends of the cosine cycles, as one model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score

from fracture import checkpoint
from fracture.config import ConfigError, parse_params
from fracture.ensemble import SeedEnsemble
from fracture.imaging import Preprocessor
from fracture.inference import load_network, probabilities
from fracture.recipe import cycle_epochs, learning_rate
from fracture.training import train
from tests.conftest import REPO
from tests.test_checkpoint import Killed
from tests.test_ensemble import FROZEN
from tests.test_training import tiny_run


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """Two snapshots of 2 epochs (cycles of one epoch) on 13 synthetic images (val: the same images), and
    single-network runs of the same schedule (T_0 1) to compare them with: one of 1 epoch, one of 2."""
    tmp_path = tmp_path_factory.mktemp("snapshots")
    params, profile, config, data = tiny_run(tmp_path, 6, 7, image_size=64, epochs=2, frozen=FROZEN, snapshots=2)
    train_params = dataclasses.replace(params.train, lr=1e-3, batch_size=4)
    fit = train(data, data, config, profile, train_params)
    one_cycle = dataclasses.replace(train_params, t_0=1)
    first = train(data, data, config, dataclasses.replace(profile, snapshots=1, epochs=1), one_cycle)
    # A single network of the same two cycles: its checkpoint after epoch 2 holds the last epoch's weights
    # whichever epoch val picked.
    train(data, data, config, dataclasses.replace(profile, snapshots=1), one_cycle,
          checkpoint_dir=tmp_path / "single", checkpoint_key="k")
    last = checkpoint.load(tmp_path / "single", "k")
    return {"fit": fit, "first": first, "last": last, "data": data, "config": config, "profile": profile,
            "params": train_params, "tmp": tmp_path}


def test_the_snapshots_are_the_network_at_each_cycles_end_sharing_the_frozen_layers(snapshots):
    fit = snapshots["fit"]
    ensemble = fit.model
    assert isinstance(ensemble, SeedEnsemble) and len(ensemble.members) == 2 and int(ensemble.shared) == 2
    assert fit.member_best_epochs == (1, 2) and fit.best_epoch == 2
    # The schedule restarts every epoch: each epoch's last step is at the same point of its own cosine
    # cycle, near its end (one cycle over both epochs would end the first at three quarters of the rate).
    base = learning_rate(snapshots["profile"], snapshots["params"])
    assert fit.history[0]["lr"] == pytest.approx(fit.history[1]["lr"]) and fit.history[0]["lr"] < 0.5 * base
    first, second = (m.state_dict() for m in ensemble.members)
    for name, tensor in snapshots["first"].model.state_dict().items():
        assert torch.equal(first[name], tensor), name  # after epoch 1: a one-epoch run of the same schedule
    assert snapshots["last"].epoch == 2
    for name, tensor in snapshots["last"].model_state.items():
        assert torch.equal(second[name], tensor), name  # after epoch 2: the same run's last weights
    assert not torch.equal(first["blocks.3.0.conv_pw.weight"], second["blocks.3.0.conv_pw.weight"])


def test_its_val_figures_are_the_mean_of_the_snapshots_and_what_the_saved_model_scores(snapshots):
    fit, data = snapshots["fit"], snapshots["data"]
    labels = data.tensors[1].numpy()
    mean = np.mean(np.stack(fit.member_final_val_probabilities), axis=0)
    np.testing.assert_allclose(fit.best_val_probabilities, mean)
    np.testing.assert_allclose(fit.final_val_probabilities, mean)
    assert fit.best_val_roc_auc == pytest.approx(roc_auc_score(labels, mean))
    path = snapshots["tmp"] / "model.safetensors"
    save_file(fit.model.state_dict(), str(path))
    loaded = load_network(path, snapshots["profile"].model)
    scored = probabilities(loaded, data.tensors[0], Preprocessor(snapshots["config"]), torch.device("cpu"), 8,
                           snapshots["profile"].tta)  # as the profile scores (the CPU profile: with the mirror)
    np.testing.assert_allclose(scored, mean, atol=1e-5)


def test_a_run_killed_after_the_first_snapshot_resumes_and_ends_with_both(snapshots, monkeypatch):
    fit, data, config, profile, params = (snapshots[k] for k in ("fit", "data", "config", "profile", "params"))
    folder = snapshots["tmp"] / "killed"
    save = checkpoint.save

    def die_saving_epoch_two(*args, **kwargs) -> None:
        if kwargs["epoch"] == 2:
            raise Killed
        save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", die_saving_epoch_two)
    with pytest.raises(Killed):
        train(data, data, config, profile, params, checkpoint_dir=folder, checkpoint_key="k")
    monkeypatch.setattr(checkpoint, "save", save)
    assert len(checkpoint.load(folder, "k").snapshot_states) == 1
    resumed = train(data, data, config, profile, params, checkpoint_dir=folder, checkpoint_key="k")
    assert resumed.resumed_from == 1 and resumed.member_best_epochs == (1, 2)
    for ours, theirs in zip(resumed.model.members, fit.model.members, strict=True):
        for name, tensor in theirs.state_dict().items():
            assert torch.allclose(ours.state_dict()[name].float(), tensor.float(), atol=1e-5), name
    # The first snapshot's val scores were not kept across the restart: the ensemble was scored again.
    assert resumed.member_final_val_probabilities == ()
    np.testing.assert_allclose(resumed.best_val_probabilities, fit.best_val_probabilities, atol=1e-5)


@pytest.mark.parametrize(("changes", "message"), [
    ({"profiles.cpu.snapshots": 0}, r"profiles\.cpu\.snapshots must be a whole number of at least 1"),
    ({"profiles.cpu.snapshots": 2, "profiles.cpu.epochs": 3}, r"snapshots 2 must divide its epochs 3"),
    ({"profiles.cpu.snapshots": 3, "train.T_0": 3}, r"set train\.T_0 to null and train\.T_mult to 1"),
    ({"profiles.cpu.snapshots": 3, "train.T_mult": 2}, r"set train\.T_0 to null and train\.T_mult to 1"),
    ({"profiles.cpu.snapshots": 3, "profiles.cpu.members": 2}, r"sets both members 2 and snapshots 3"),
])
def test_snapshots_that_do_not_fit_the_schedule_are_refused_by_name(changes, message):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["profiles"]["cpu"]["epochs"] = 3
    for key, value in changes.items():
        section, *rest = key.split(".")
        target = raw[section]
        for part in rest[:-1]:
            target = target[part]
        target[rest[-1]] = value
    with pytest.raises(ConfigError, match=message):
        parse_params(raw)


def test_three_snapshots_of_three_epochs_restart_the_schedule_every_epoch():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["profiles"]["cpu"].update(epochs=3, snapshots=3, members=1)  # snapshots of one network
    params = parse_params(raw)
    assert cycle_epochs(params.profiles["cpu"], params.train) == 1
    assert cycle_epochs(params.profiles["paper"], params.train) == params.profiles["paper"].epochs


def test_the_stages_train_evaluate_and_cross_validate_a_snapshot_ensemble(tmp_path, monkeypatch):
    import json  # noqa: PLC0415

    import mlflow  # noqa: PLC0415
    import pandas as pd  # noqa: PLC0415

    from fracture.stages.crossval import run_crossval  # noqa: PLC0415
    from fracture.stages.evaluate import run_evaluate  # noqa: PLC0415
    from fracture.stages.train import run_train  # noqa: PLC0415
    from tests.test_crossval import tiny_ensemble_project  # noqa: PLC0415

    params, workspace = tiny_ensemble_project(tmp_path, monkeypatch, folds=2, snapshots=2)
    trained = run_train(params, workspace)
    assert trained is not None
    model = json.loads((workspace.train_dir / "model.json").read_text())
    assert (model["members"], model["snapshots"], model["member_best_epochs"]) == (2, 2, [1, 2])
    assert isinstance(load_network(workspace.weights, model["architecture"]), SeedEnsemble)
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(trained.run_id).data
    assert (run.metrics["snapshot_1_epoch"], run.metrics["snapshot_2_epoch"]) == (1, 2)
    run_evaluate(params, workspace)
    card = (workspace.evaluate_dir / "model_card.md").read_text()
    assert "2 snapshots of one network, taken at the ends of its cosine cycles (after epochs 1, 2)" in card
    assert "CosineAnnealingWarmRestarts, T_0 1, T_mult 1" in card
    run_crossval(params, workspace)
    oof = pd.read_csv(workspace.crossval_dir / "oof.csv")
    np.testing.assert_allclose(oof["probability"], oof[["probability_member_1", "probability_member_2"]].mean(axis=1),
                               atol=1e-6)
