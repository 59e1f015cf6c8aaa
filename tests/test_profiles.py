"""Choosing the training profile by hardware, and recording it in params.yaml."""

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
