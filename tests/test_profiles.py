"""Choosing the training profile by hardware, recording it in params.yaml, and where a run reads its source."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest
import yaml

from flows.retrain import choose_profile, set_profile
from tests.conftest import shipped_params, shipped_params_text


def test_cpu_machine_gets_the_cpu_profile_and_is_told_why():
    name, reason = choose_profile(None, cuda=False)
    assert name == "cpu" and "no CUDA device" in reason


def test_cuda_machine_gets_the_papers_profile():
    assert choose_profile(None, cuda=True)[0] == "paper"
    assert choose_profile("cpu", cuda=True)[0] == "cpu"


def test_set_profile_rewrites_only_that_value_and_keeps_comments(tmp_path):
    (tmp_path / "params.yaml").write_text(shipped_params_text())
    before = (tmp_path / "params.yaml").read_text()
    assert set_profile(tmp_path, "cpu") is True
    after = (tmp_path / "params.yaml").read_text()
    assert yaml.safe_load(after)["train"]["profile"] == "cpu"
    assert after.count("#") == before.count("#")
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert len(changed) == 1 and "profile: cpu" in changed[0][1]
    assert set_profile(tmp_path, "cpu") is False


def test_set_profile_that_fails_midway_leaves_params_as_they_were_and_nothing_beside_them(tmp_path, monkeypatch):
    """A full disk while params.yaml is written: the user's file stays whole (a reader meanwhile
    sees it whole too), no half-written copy is left in the project, and the error is raised."""
    import errno  # noqa: PLC0415
    import io  # noqa: PLC0415

    from ruamel.yaml import YAML  # noqa: PLC0415

    dump = YAML.dump

    def half_then_disk_full(self, data, stream):
        text = io.StringIO()
        dump(self, data, text)
        with stream.open("w") if isinstance(stream, Path) else contextlib.nullcontext(stream) as out:
            out.write(text.getvalue()[: len(text.getvalue()) // 2])
            out.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "params.yaml").write_text(shipped_params_text())
    before = (tmp_path / "params.yaml").read_bytes()
    monkeypatch.setattr(YAML, "dump", half_then_disk_full)
    with pytest.raises(OSError, match="No space left") as failed:
        set_profile(tmp_path, "cpu")
    assert failed.value.errno == errno.ENOSPC
    assert (tmp_path / "params.yaml").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="only root may give a file away")
def test_set_profile_keeps_the_files_owner_and_group(tmp_path):
    """A shared checkout's params.yaml, owned by another account and group: replaced by root's flow
    run, it stays theirs, so the group keeps its write access."""
    (tmp_path / "params.yaml").write_text(shipped_params_text())
    os.chown(tmp_path / "params.yaml", 65534, 65534)
    assert set_profile(tmp_path, "cpu") is True
    after = (tmp_path / "params.yaml").stat()
    assert (after.st_uid, after.st_gid) == (65534, 65534)


def test_set_profile_keeps_the_files_permissions_and_a_link_to_it(tmp_path):
    """params.yaml is replaced by a new file: it keeps the mode the user gave it, and a params.yaml
    that links to a file elsewhere stays that link, the file it names taking the profile."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "params.yaml").write_text(shipped_params_text())
    (shared / "params.yaml").chmod(0o640)
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").symlink_to(shared / "params.yaml")
    before = (shared / "params.yaml").read_text()
    assert set_profile(project, "cpu") is True
    assert (project / "params.yaml").is_symlink()
    after = (shared / "params.yaml").read_text()
    assert yaml.safe_load(after)["train"]["profile"] == "cpu" and after.count("#") == before.count("#")
    assert stat.S_IMODE((shared / "params.yaml").stat().st_mode) == 0o640
    assert sorted(p.name for p in shared.iterdir()) == ["params.yaml"]
    assert set_profile(project, "paper") is True
    assert stat.S_IMODE((shared / "params.yaml").stat().st_mode) == 0o640


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


def test_the_train_stage_refuses_the_papers_profile_on_a_machine_without_cuda_and_says_what_to_set(tmp_path, monkeypatch):
    """What `dvc repro` meets in a fresh checkout on a CPU machine: B6 at 528 px would take days, so
    it stops before loading any weights, and `train.device: cpu` still trains it when asked."""
    import dataclasses  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from fracture.config import ConfigError  # noqa: PLC0415
    from fracture.stages import train as stage  # noqa: PLC0415
    from fracture.workspace import Workspace  # noqa: PLC0415

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = shipped_params()
    assert params.train.profile == "paper" and params.train.device == "auto"
    with pytest.raises(ConfigError, match=r"train\.profile is 'paper' .* no CUDA device: set train\.profile: cpu"):
        stage.run_train(params, Workspace(tmp_path))
    asked = dataclasses.replace(params, train=dataclasses.replace(params.train, device="cpu"))
    trained: list[tuple[str, str]] = []
    monkeypatch.setattr(stage, "_train", lambda p, _w: trained.append((p.train.profile, p.train.device)) or False)
    assert stage.run_train(asked, Workspace(tmp_path)) is None
    assert trained == [("paper", "cpu")]


def test_the_prepare_stage_refuses_the_papers_profile_on_a_machine_without_cuda_before_decoding_anything(
    tmp_path, monkeypatch
):
    """The prepare stage runs first: it would build B6's 528 px cache (gigabytes, in the workspace and
    DVC's cache) that the train stage then refuses; it stops before reading the manifest."""
    import torch  # noqa: PLC0415

    from fracture.config import ConfigError  # noqa: PLC0415
    from fracture.stages import prepare as stage  # noqa: PLC0415
    from fracture.workspace import Workspace  # noqa: PLC0415

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = shipped_params()
    decoded: list[int] = []
    monkeypatch.setattr(stage, "prepare_images", lambda *args, **kwargs: decoded.append(1))
    with pytest.raises(ConfigError, match=r"train\.profile is 'paper' .* no CUDA device: set train\.profile: cpu"):
        stage.run_prepare(params, Workspace(tmp_path))  # no manifest there: refused before it is read
    assert decoded == []
