"""Scale-out through a DVC remote: what one machine reproduced, a fresh clone elsewhere pulls back.

A local-directory remote stands in for S3, GCS or SSH: the commands and the files are the same.
"""

from __future__ import annotations

import filecmp
import shutil
import subprocess
from pathlib import Path

import pytest

from fracture.project_lock import LOCK_FILE
from tests.conftest import REPO, dvc, make_subset, pick_ids, run, shrink_params

pytestmark = pytest.mark.integration


def files_under(root: Path, *dirs: str) -> set[str]:
    return {str(p.relative_to(root)) for d in dirs for p in (root / d).rglob("*") if p.is_file()}


def git(cwd: Path, *args: str) -> str:
    return run(cwd, "git", "-c", "user.name=Pipeline", "-c", "user.email=pipeline@example.org", *args)


def publish(project: Path, remote: Path) -> None:
    """What a team does once: a default remote in the committed DVC config; then commit and push."""
    dvc(project, "remote", "add", "--default", "storage", str(remote))
    git(project, "add", "-A")
    git(project, "commit", "-qm", "pipeline state")
    dvc(project, "push")
    assert "in sync" in dvc(project, "status", "--cloud")


def test_a_fresh_clone_pulls_the_dataset_version_it_names(project, fracatlas, tmp_path):
    shutil.copy(REPO / ".gitignore", project / ".gitignore")
    source = make_subset(fracatlas, tmp_path / "source", pick_ids(fracatlas, 3, 3))
    run(project, "fracture", "ingest", "--source", str(source))
    dvc(project, "add", "data")
    publish(project, tmp_path / "dvc-remote")

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    assert not (clone / "data").exists()  # git holds only data.dvc, the pointer
    dvc(clone, "pull", "data.dvc")
    produced = files_under(project, "data")
    assert len(produced) == 8  # six images, dataset.csv and the fracture boxes (Annotations/COCO JSON)
    assert files_under(clone, "data") == produced
    assert all(filecmp.cmp(project / f, clone / f, shallow=False) for f in produced)
    assert "Data and pipelines are up to date" in dvc(clone, "status", "data.dvc")


@pytest.mark.slow
def test_push_then_pull_into_a_fresh_clone_restores_data_and_models(project, subset_source, tmp_path):
    shutil.copy(REPO / ".gitignore", project / ".gitignore")  # the product's own: outputs/ and data/ stay out of git
    shrink_params(project, evaluate__bootstrap_resamples=50)
    run(project, "fracture", "ingest", "--source", str(subset_source))
    dvc(project, "add", "data")
    dvc(project, "repro")

    publish(project, tmp_path / "dvc-remote")

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    assert not (clone / "data").exists() and not (clone / "outputs" / "train" / "model.safetensors").exists()
    dvc(clone, "pull")

    # The project's lock file (fracture.project_lock) is no output: each checkout makes its own.
    produced = files_under(project, "data", "outputs") - {str(LOCK_FILE)}
    assert "outputs/train/model.safetensors" in produced and "outputs/evaluate/metrics.json" in produced
    assert files_under(clone, "data", "outputs") == produced
    different = [f for f in sorted(produced) if not filecmp.cmp(project / f, clone / f, shallow=False)]
    assert not different, f"restored files differ from the originals: {different}"
    status = dvc(clone, "status")
    assert "Data and pipelines are up to date" in status, status
    # Nothing to rerun in the clone: DVC skips every stage.
    repro = subprocess.run(
        ["dvc", "repro", "--dry"], cwd=clone, capture_output=True, text=True, check=True
    ).stdout
    assert "Running stage" not in repro, repro
