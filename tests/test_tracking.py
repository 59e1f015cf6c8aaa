"""Where a stage logs its MLflow runs, and what a training run records about the machine it ran on."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from fracture.config import ConfigError, artifact_location, tracking_uri
from fracture.tracking import (
    TrainingRunMissing,
    hardware_tags,
    setup_mlflow,
    sqlite_store,
    training_run,
)
from tasks.pipeline import repro
from tests.conftest import (
    REPO,
    dvc,
    make_subset,
    pick_ids,
    run,
    shipped_params,
    shrink_params,
)
from tests.test_dvc_remote import git


def test_hardware_tags_name_the_cpu_and_the_kernels_torch_chose():
    tags = hardware_tags("cpu")
    assert tags["device"] == "cpu" and tags["cuda_device"] == ""
    assert tags["cpu_capability"] == torch.backends.cpu.get_cpu_capability() != ""
    assert tags["torch_threads"] == str(torch.get_num_threads()) and tags["torch_version"] == torch.__version__
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux: the CPU's own name, as the kernel reports it
        assert tags["cpu_model"] == re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE).group(1).strip()
    assert tags["cpu_model"]
    assert all(isinstance(value, str) for value in tags.values())  # MLflow tags are strings


def test_a_dvc_experiments_temporary_copy_logs_to_the_projects_store(tmp_path, monkeypatch):
    project = tmp_path / "project"
    copy = project / ".dvc" / "tmp" / "exps" / "tmpa1b2c3"
    copy.mkdir(parents=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert tracking_uri(copy) == f"sqlite:///{copy / 'mlflow.db'}"  # not run by DVC: the folder's own store
    # DVC names the project its temporary copy came from; every stage command it runs gets $DVC_ROOT.
    monkeypatch.setenv("DVC_ROOT", str(project))
    assert tracking_uri(copy) == f"sqlite:///{project / 'mlflow.db'}"
    assert artifact_location(copy) == (project / "mlartifacts").as_uri()
    assert tracking_uri(project) == f"sqlite:///{project / 'mlflow.db'}"  # `dvc repro` in the project itself
    elsewhere = tmp_path / "other"
    assert tracking_uri(elsewhere) == f"sqlite:///{elsewhere / 'mlflow.db'}"  # only DVC's own copies are redirected
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking_uri(copy) == "http://mlflow.internal:5000"  # a shared store wins everywhere


def test_sqlites_own_file_uri_form_is_refused_before_mlflow_makes_a_file_folder_tree(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI=sqlite:///file:/path/mlflow.db?uri=true was opened, after MLflow made the
    folders file:/path, as if that were a path, in the stage's (or predict's, or the page's) working folder."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    store = tmp_path / "store" / "mlflow.db"
    for uri in (f"sqlite:///file:{store}?mode=rwc&uri=true", f"sqlite:///file:{store}"):
        message = (rf"^{re.escape(uri)} is SQLite's file: URI form, which MLflow reads as a path in the working "
                   rf"folder, making the folders file:{re.escape(str(store.parent))} there: give the file's path "
                   rf"instead, sqlite:///{re.escape(str(store))}$")
        with pytest.raises(ValueError, match=message):  # what predict and the page say, naming the variable
            sqlite_store(uri)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(ConfigError, match=f"^MLFLOW_TRACKING_URI: {message[1:]}"):  # a stage's one-line error
            setup_mlflow(shipped_params(), tmp_path)
    assert list(work.iterdir()) == [] and not store.parent.exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")  # the form the message gives opens the store
    store.parent.mkdir()
    setup_mlflow(shipped_params(), tmp_path)
    assert store.is_file() and list(work.iterdir()) == []


def test_a_training_run_missing_from_the_store_names_the_store_and_what_to_do(client):
    with pytest.raises(TrainingRunMissing, match=r"run 0123abcd, which trained the model .* is not in the tracking "
                       r"store sqlite:///.*mlflow.db: .* Set MLFLOW_TRACKING_URI"):
        training_run("0123abcd")
    with mlflow.start_run() as run:
        pass
    assert training_run(run.info.run_id).info.run_id == run.info.run_id


@pytest.mark.integration
@pytest.mark.slow  # over a minute on two cores beside another test process: the pipeline in DVC's temporary copy
def test_an_experiment_run_in_a_temporary_copy_is_registered_from_the_project(project, fracatlas, tmp_path):
    """`dvc exp run --temp` (as `--queue`) runs the stages in a copy under .dvc/tmp/exps, removed afterwards."""
    shutil.copy(REPO / ".gitignore", project / ".gitignore")
    source = make_subset(fracatlas, tmp_path / "source", pick_ids(fracatlas, 8, 8))
    shrink_params(project, profiles__cpu__image_size=32, register__floors={})
    run(project, sys.executable, "-m", "fracture.cli", "ingest", "--source", str(source))
    dvc(project, "add", "data")
    for stage in ("validate", "split", "prepare"):
        assert repro(project, stage).ran
    git(project, "add", "-A")
    git(project, "commit", "-qm", "pipeline state")
    for key, value in (("user.name", "Pipeline"), ("user.email", "pipeline@example.org")):
        run(project, "git", "config", key, value)  # DVC commits the experiment: a machine without a git identity
    dvc(project, "exp", "run", "--temp", "-n", "lr-3e-4", "-S", "profiles.cpu.lr=3e-4")
    store = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = store.search_runs([e.experiment_id for e in store.search_experiments()])
    assert [r.data.params["profile.lr"] for r in runs] == ["0.0003"]  # trained and evaluated in the copy
    assert "test_roc_auc" in runs[0].data.metrics
    dvc(project, "exp", "apply", "lr-3e-4")
    assert json.loads((project / "outputs" / "train" / "run.json").read_text())["run_id"] == runs[0].info.run_id
    registered = run(project, sys.executable, "-m", "fracture.cli", "register")
    assert "version 1" in registered
