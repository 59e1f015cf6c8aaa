"""Per-epoch checkpoints: a killed run resumes after its last epoch and ends as an uninterrupted one."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from fracture import checkpoint
from fracture.config import load_params
from fracture.model import profile_data_config
from fracture.seen import SEEN_ARTIFACT, SeenImages
from fracture.stages.train import run_key
from fracture.training import member_checkpoint, train
from tests.conftest import REPO, dvc, make_subset, pick_ids, run, shrink_params
from tests.synthetic import make_dataset, training_frame
from tests.test_prepare import tensor_data


class Killed(Exception):
    """Stands in for the process dying in the middle of an epoch."""


def _setup(tmp_path: Path):
    make_dataset(tmp_path, 8, 8)
    params = load_params(REPO)
    profile = dataclasses.replace(params.profiles["cpu"], image_size=64, epochs=3, augment="light")
    config = profile_data_config(profile)
    data = tensor_data(tmp_path, training_frame(tmp_path), config)
    return data, config, profile, dataclasses.replace(params.train, lr=1e-3, batch_size=4)


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_a_run_killed_in_its_second_epoch_resumes_and_ends_as_an_uninterrupted_run(tmp_path, monkeypatch, ema_decay):
    data, config, profile, params = _setup(tmp_path)
    profile = dataclasses.replace(profile, ema_decay=ema_decay)  # 0.9: the weights' average resumes too
    whole = train(data, data, config, profile, params, checkpoint_dir=tmp_path / "a", checkpoint_key="k")

    save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", _killed_at(save, tmp_path / "b", 2, saved=False))  # epoch 2 trained
    with pytest.raises(Killed):
        train(data, data, config, profile, params, checkpoint_dir=tmp_path / "b", checkpoint_key="k")
    monkeypatch.setattr(checkpoint, "save", save)
    state = json.loads((tmp_path / "b" / checkpoint.STATE).read_text())
    assert state["epoch"] == 1 and [h["epoch"] for h in state["history"]] == [1]

    seen: list[int] = []
    resumed = train(data, data, config, profile, params, on_epoch=lambda e, m: seen.append(e + 1),
                    checkpoint_dir=tmp_path / "b", checkpoint_key="k")
    assert resumed.resumed_from == 1
    assert seen == [2, 3]  # only the epochs that were not done yet
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for a, b in zip(whole.history, resumed.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_roc_auc"] == pytest.approx(b["val_roc_auc"], abs=1e-6)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    assert resumed.best_epoch == whole.best_epoch
    for name, tensor in whole.model.state_dict().items():
        assert torch.allclose(tensor.float(), resumed.model.state_dict()[name].float(), atol=1e-5), name


def test_a_run_killed_between_writing_a_checkpoints_two_files_is_not_resumed_from_a_mixed_pair(tmp_path, monkeypatch):
    """The tensors of epoch 2 written, the state of epoch 1 still in place: resuming would train
    epoch 2 again on top of its own weights. The pair is refused and training starts over."""
    data, config, profile, params = _setup(tmp_path)
    replace = os.replace

    def killed_before_the_state_of_epoch_two(src, dst):
        if Path(dst).name == checkpoint.STATE and json.loads(Path(src).read_text())["epoch"] == 2:
            raise Killed
        replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", killed_before_the_state_of_epoch_two)
    with pytest.raises(Killed):
        train(data, data, config, profile, params, checkpoint_dir=tmp_path / "m", checkpoint_key="k")
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    assert json.loads((tmp_path / "m" / checkpoint.STATE).read_text())["epoch"] == 1
    assert checkpoint.load(tmp_path / "m", "k") is None
    resumed = train(data, data, config, profile, params, checkpoint_dir=tmp_path / "m", checkpoint_key="k")
    assert resumed.resumed_from == 0 and [h["epoch"] for h in resumed.history] == [1, 2, 3]


@pytest.mark.parametrize("damage", ["state emptied", "state cut short", "state lacks a key", "state not a mapping",
                                    "tensors emptied", "tensors cut short", "tensors changed inside"])
def test_a_damaged_checkpoint_is_ignored_with_a_warning_and_training_starts_over(tmp_path, caplog, damage):
    """A checkpoint file emptied or cut short (a full disk, a machine that lost power before the
    writes reached the disk) raised a bare JSONDecodeError or SafetensorError that named no file,
    on every rerun until someone found the folder and removed it. Now it is ignored, as another
    run's checkpoint is, with a warning naming the folder, and training starts over."""
    data, config, profile, params = _setup(tmp_path)
    short = dataclasses.replace(profile, epochs=1)
    folder = tmp_path / "c"
    train(data, data, config, short, params, checkpoint_dir=folder, checkpoint_key="k")
    assert checkpoint.load(folder, "k") is not None
    state, tensors = folder / checkpoint.STATE, folder / checkpoint.TENSORS
    if damage == "state emptied":
        state.write_bytes(b"")
    elif damage == "state cut short":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "state lacks a key":
        state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "history"}))
    elif damage == "state not a mapping":
        state.write_text("[1, 2]")
    elif damage == "tensors emptied":
        tensors.write_bytes(b"")
    elif damage == "tensors cut short":
        tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    else:  # 4 KiB in the middle overwritten, its header and size intact: it was resumed from as good
        written = bytearray(tensors.read_bytes())
        middle = len(written) // 2
        written[middle : middle + 4096] = bytes(4096)
        tensors.write_bytes(bytes(written))
    with caplog.at_level(logging.WARNING, logger="fracture.checkpoint"):
        assert checkpoint.load(folder, "k") is None
    assert f"ignoring the checkpoint in {folder}: " + (
        f"{checkpoint.TENSORS} is not the file written (its sha256 differs: damaged on the disk)"
        if damage == "tensors changed inside" else "it cannot be read") in caplog.text
    assert "training starts again from the first epoch" in caplog.text
    result = train(data, data, config, short, params, checkpoint_dir=folder, checkpoint_key="k")
    assert result.resumed_from == 0 and [h["epoch"] for h in result.history] == [1]


def test_each_checkpoint_file_is_on_the_disk_before_it_replaces_the_last(tmp_path, monkeypatch):
    """Without a flush, a machine that loses power can keep the new name over a file still empty."""
    data, config, profile, params = _setup(tmp_path)
    events: list[str] = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(fd):
        events.append("fsync " + Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        fsync(fd)

    def recorded_replace(src, dst):
        events.append(f"replace {Path(src).name}")
        replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "fsync", recorded_fsync)
    monkeypatch.setattr(checkpoint.os, "replace", recorded_replace)
    train(data, data, config, dataclasses.replace(profile, epochs=1), params, checkpoint_dir=tmp_path / "c",
          checkpoint_key="k")
    assert events == [
        f"fsync {checkpoint.TENSORS}.partial", f"replace {checkpoint.TENSORS}.partial", "fsync c",
        f"fsync {checkpoint.STATE}.partial", f"replace {checkpoint.STATE}.partial", "fsync c",
    ]


def test_a_checkpoint_of_another_run_is_not_resumed(tmp_path, caplog):
    data, config, profile, params = _setup(tmp_path)
    short = dataclasses.replace(profile, epochs=1)
    train(data, data, config, short, params, checkpoint_dir=tmp_path / "c", checkpoint_key="old params")
    with caplog.at_level("WARNING", logger="fracture.checkpoint"):
        assert checkpoint.load(tmp_path / "c", "new params") is None
    # Said where the command's log shows it (warnings): a run stopped before an upgrade starts over.
    assert any(r.levelname == "WARNING" and "belongs to another run (other params, data, pipeline code" in r.message
               and "or kind of device: a GPU run is not resumed on the CPU)" in r.message for r in caplog.records)
    result = train(data, data, config, short, params, checkpoint_dir=tmp_path / "c", checkpoint_key="new params")
    assert result.resumed_from == 0


def test_the_run_key_changes_with_the_pixels_code_and_weights_not_only_the_params(tmp_path, monkeypatch):
    params = load_params(REPO)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"first")
    profile = dataclasses.replace(params.profile, weights="file", weights_file=str(weights))
    params = dataclasses.replace(params, profiles=params.profiles | {params.train.profile: profile})
    frame = pd.DataFrame({"image_id": ["a", "b"], "label": [1, 0], "sha256": ["11", "22"]})
    frames = {"train": frame, "val": frame.iloc[:1]}

    def key(**changes):
        return run_key(params, {"size": 1}, {"n": 2}, frames | changes)

    base = key()
    assert key() == base  # stable
    # The same ids and labels, another file's content (a new export): another run.
    assert key(train=frame.assign(sha256=["11", "33"])) != base
    # Other pretrained weights in the same file.
    weights.write_bytes(b"second")
    assert key() != base
    weights.write_bytes(b"first")
    assert key() == base
    # Another device than the run was killed on (train.device: auto, a GPU gone or added): another run,
    # whose kernels' numbers differ from the killed one's.
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, device="auto"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    on_cpu = key()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert key() != on_cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert key() == on_cpu
    # Other code.
    monkeypatch.setattr(checkpoint, "code_digest", lambda: "another version of the code")
    assert key() != on_cpu


def test_checkpoints_hold_no_pickles(tmp_path):
    data, config, profile, params = _setup(tmp_path)
    train(data, data, config, dataclasses.replace(profile, epochs=1), params,
          checkpoint_dir=tmp_path / "d", checkpoint_key="k")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [checkpoint.STATE, checkpoint.TENSORS]
    tensors = load_file(str(tmp_path / "d" / checkpoint.TENSORS))
    assert any(k.startswith("optimizer.") and k.endswith(".exp_avg") for k in tensors)
    assert {"rng.torch", "rng.loader"} <= set(tensors)
    json.loads((tmp_path / "d" / checkpoint.STATE).read_text())  # plain JSON, nothing else


@pytest.mark.integration
@pytest.mark.slow
def test_train_stage_killed_after_its_first_epoch_resumes_when_rerun(project, fracatlas, tmp_path):
    source = make_subset(fracatlas, tmp_path / "source", pick_ids(fracatlas, 16, 32))
    shrink_params(project, profiles__cpu__epochs=3)
    run(project, sys.executable, "-m", "fracture.cli", "ingest", "--source", str(source))
    dvc(project, "repro", "prepare")
    # The CPU profile as the product ships it, an ensemble of members included: the first one's checkpoint.
    profile = load_params(project).profiles["cpu"]
    folder, _ = member_checkpoint(project / "outputs" / "train" / "checkpoint", "", profile, 1)
    state = folder / checkpoint.STATE

    # The stage as DVC runs it, killed (SIGKILL: no clean-up) once its first epoch is saved.
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train"], cwd=project,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (state.is_file() and json.loads(state.read_text())["epoch"] >= 1):
            assert proc.poll() is None, "the train stage ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 5 minutes"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = json.loads(state.read_text())["epoch"]
    assert 1 <= killed_at < 3
    assert not (project / "outputs" / "train" / "model.safetensors").exists()

    out = dvc(project, "repro", "train")
    assert f"resuming after epoch {killed_at} of 3" in out
    members = profile.members  # an ensemble's epochs count on across its members
    assert (f", resumed after epoch {killed_at})" if members == 1
            else f", resumed after {killed_at} of its members' {3 * members} epochs)") in out
    history = json.loads((project / "outputs" / "train" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3] * profile.members
    assert [h["step"] for h in history] == list(range(1, 3 * profile.members + 1))  # as MLflow's steps
    assert not (project / "outputs" / "train" / "checkpoint").exists()  # removed once the model is written

    # One MLflow run holds every epoch of every member, logged once each.
    run_id = json.loads((project / "outputs" / "train" / "run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(run_id, "val_roc_auc")]
    assert sorted(set(steps)) == list(range(1, 3 * profile.members + 1))
    tags = client.get_run(run_id).data.tags
    assert tags["resumed_from_epoch"] == str(killed_at)
    # What the resumed run trained on (tracking.hardware_tags).
    assert tags["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and tags["cpu_model"]
    assert tags["torch_version"] == torch.__version__ and tags["torch_threads"].isdigit()
    assert "Data and pipelines are up to date" in dvc(project, "status", "train")


def test_a_killed_run_whose_mlflow_run_is_gone_resumes_from_its_checkpoint_in_a_new_run(tmp_path, monkeypatch, caplog):
    """MLflow reopens neither a deleted run nor one another tracking store holds, so a rerun that
    insisted on the killed run's would fail every time until the checkpoint was removed. The
    training resumes from the checkpoint instead and logs to a new run, with the params and
    inputs a new run has and the checkpoint's epochs logged again: the curves start at epoch 1."""
    from fracture.stages.train import run_train  # noqa: PLC0415 - the stage module imports MLflow
    from tests.test_crossval import tiny_ensemble_project  # noqa: PLC0415 - a synthetic project, prepared

    params, workspace = tiny_ensemble_project(tmp_path, monkeypatch, epochs=3, image_size=32)
    save = checkpoint.save

    def killed_after(epoch: int):  # while writing the next epoch's checkpoint: epochs 1 to ``epoch`` logged
        return _killed_at(save, workspace.checkpoint_dir, epoch + 1, saved=False)

    def checkpointed_run() -> str:
        return json.loads((workspace.checkpoint_dir / checkpoint.STATE).read_text())["run_id"]

    store = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(checkpoint, "save", killed_after(1))
    with pytest.raises(Killed):
        run_train(params, workspace)
    first = checkpointed_run()
    store.delete_run(first)  # deleted in the MLflow UI

    monkeypatch.setattr(checkpoint, "save", killed_after(2))
    with caplog.at_level(logging.WARNING, logger="fracture.stages.train"), pytest.raises(Killed):
        run_train(params, workspace)
    told = f"MLflow run {first}, which the checkpoint in {workspace.checkpoint_dir} was logged to, was deleted"
    assert told in caplog.text
    second = checkpointed_run()
    assert second != first
    assert sorted(m.step for m in store.get_metric_history(second, "val_roc_auc")) == [1, 2]

    caplog.clear()
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)  # the tracking store switched
    monkeypatch.setattr(checkpoint, "save", save)
    with caplog.at_level(logging.WARNING, logger="fracture.stages.train"):
        trained = run_train(params, workspace)
    assert f"MLflow run {second}, which the checkpoint" in caplog.text
    assert f"is not in the tracking store {other}" in caplog.text
    assert trained is not None and trained.run_id not in (first, second)
    assert not workspace.checkpoint_dir.exists()  # finished: the checkpoint is removed as after any run
    client = mlflow.MlflowClient(other)
    run = client.get_run(trained.run_id)
    assert run.data.params["profile"] == "cpu" and run.data.params["n_train"] == "19"
    inputs = {i.dataset.name for i in run.inputs.dataset_inputs}
    assert inputs == {"fracatlas", "fracatlas-train", "fracatlas-val", "fracatlas-test"}
    # The images it learnt from, for a later gate that scores it as champion (not the test split's).
    seen = SeenImages.from_table(Path(client.download_artifacts(trained.run_id, SEEN_ARTIFACT, str(tmp_path))).read_text(), "")
    frames = workspace.read_split_tables()
    assert seen.image_ids == set(frames["train"]["image_id"]) | set(frames["val"]["image_id"])
    assert seen.sha256 == set(frames["train"]["sha256"]) | set(frames["val"]["sha256"])
    assert run.data.tags["resumed_from_epoch"] == "2" and run.data.tags["resumed_from_run"] == second
    history = client.get_metric_history(trained.run_id, "val_roc_auc")
    assert sorted(m.step for m in history) == [1, 2, 3]
    # The epochs logged again are the checkpoint's: what the run they were trained in logged.
    before = {m.step: m.value for m in store.get_metric_history(second, "val_roc_auc")}
    assert {m.step: m.value for m in history if m.step < 3} == before


def _killed_at(save, folder: Path, epoch: int, *, saved: bool):
    """checkpoint.save, killed at ``epoch`` in ``folder``: while writing it (``saved`` False, the previous
    checkpoint left in place) or just after it is written (True: before the epoch is logged to MLflow)."""

    def saving(directory, *args, **kwargs):
        if directory == folder and kwargs["epoch"] == epoch:
            if saved:
                save(directory, *args, **kwargs)
            raise Killed
        save(directory, *args, **kwargs)

    return saving


def _logged(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.parametrize("members", [1, 2])
def test_a_continued_mlflow_run_logs_each_epoch_once_wherever_the_run_was_killed(tmp_path, monkeypatch, members):
    """A run killed while an epoch's checkpoint was being written trains that epoch again when rerun,
    and one killed once the checkpoint was written but before the epoch was logged finds it in the
    checkpoint: either way the continued MLflow run holds every epoch once, with the values of an
    uninterrupted run. An ensemble's epochs count on across its members (member 2's first is step 3)."""
    from fracture.stages.train import run_train  # noqa: PLC0415 - the stage module imports MLflow
    from tests.test_crossval import tiny_ensemble_project  # noqa: PLC0415 - a synthetic project, prepared

    epochs = 3 if members == 1 else 2
    params, workspace = tiny_ensemble_project(tmp_path, monkeypatch, epochs=epochs, image_size=32, members=members)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    whole = run_train(params, workspace)
    assert whole is not None
    keys = ("epoch", "train_loss", "val_loss", "val_roc_auc", "lr") + (("member",) if members > 1 else ())
    expected = {key: _logged(client, whole.run_id, key) for key in keys}
    assert [step for step, _ in expected["epoch"]] == list(range(1, members * epochs + 1))

    # The epoch killed: the second of one network, member 2's first of an ensemble.
    folder, _ = member_checkpoint(workspace.checkpoint_dir, "", params.profile, members)
    save = checkpoint.save
    for saved in (False, True):
        monkeypatch.setattr(checkpoint, "save", _killed_at(save, folder, 3 - members, saved=saved))
        with pytest.raises(Killed):
            run_train(params, workspace)
        monkeypatch.setattr(checkpoint, "save", save)
        trained = run_train(params, workspace)
        assert trained is not None and trained.run_id != whole.run_id
        for key in keys:
            logged = _logged(client, trained.run_id, key)
            assert [step for step, _ in logged] == [step for step, _ in expected[key]], (saved, key)
            assert [value for _, value in logged] == pytest.approx([value for _, value in expected[key]],
                                                                   rel=1e-5), (saved, key)


def test_a_train_stopped_after_saving_its_weights_leaves_no_earlier_runs_record_beside_them(tmp_path, monkeypatch):
    """`fracture train` typed by hand, stopped between saving the new weights and recording their run:
    run.json named the run before, so evaluate scored the new weights into that run's test metrics
    and register made a version of it holding weights that run never trained. run.json now goes
    first and comes back last, so the next command stops, naming the stage to run."""
    from fracture.stages.train import run_train  # noqa: PLC0415 - the stage module imports MLflow
    from fracture.workspace import write_json  # noqa: PLC0415
    from tests.test_crossval import tiny_ensemble_project  # noqa: PLC0415 - a synthetic project, prepared

    params, workspace = tiny_ensemble_project(tmp_path, monkeypatch, epochs=1, image_size=32)
    write_json(workspace.run_json, {"run_id": "0" * 32, "experiment_id": "0"})  # the previous train's record

    def stopped(*_args, **_kwargs):
        raise Killed

    monkeypatch.setattr(type(workspace), "write_train", stopped)
    with pytest.raises(Killed):
        run_train(params, workspace)
    assert workspace.weights.is_file()  # the new weights, saved
    assert not workspace.run_json.exists()
    with pytest.raises(FileNotFoundError, match=r"\.json not found: run the train stage first"):
        workspace.read_train()
