"""Choosing the training profile by hardware, recording it in params.yaml, and where a run reads its source."""

from __future__ import annotations

import shutil

import yaml

from flows.retrain import choose_profile, set_profile
from tests.conftest import REPO


def test_cpu_machine_gets_the_cpu_profile_and_is_told_why():
    name, reason = choose_profile(None, cuda=False)
    assert name == "cpu" and "no CUDA device" in reason


def test_cuda_machine_gets_the_papers_profile():
    assert choose_profile(None, cuda=True)[0] == "paper"
    assert choose_profile("cpu", cuda=True)[0] == "cpu"


def test_set_profile_rewrites_only_that_value_and_keeps_comments(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_text()
    assert set_profile(tmp_path, "cpu") is True
    after = (tmp_path / "params.yaml").read_text()
    assert yaml.safe_load(after)["train"]["profile"] == "cpu"
    assert after.count("#") == before.count("#")
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert len(changed) == 1 and "profile: cpu" in changed[0][1]
    assert set_profile(tmp_path, "cpu") is False


def test_a_relative_source_is_read_from_where_the_run_started_and_the_environments_from_the_project(tmp_path, monkeypatch):
    from flows.retrain import resolved_source

    project, started_in = tmp_path / "project", tmp_path / "prefect-run-123"
    project.mkdir()
    started_in.mkdir()
    monkeypatch.chdir(started_in)
    monkeypatch.delenv("FRACATLAS_SOURCE", raising=False)
    assert resolved_source(None, project) is None  # figshare
    assert resolved_source("../exports/FracAtlas.zip", project) == str(tmp_path / "exports" / "FracAtlas.zip")
    # A worker's environment: its runs start in a temporary folder, so the project anchors it.
    monkeypatch.setenv("FRACATLAS_SOURCE", "data-in/FracAtlas.zip")
    assert resolved_source(None, project) == str(project / "data-in" / "FracAtlas.zip")
    assert resolved_source("/srv/FracAtlas", project) == "/srv/FracAtlas"  # given to the run: it wins
