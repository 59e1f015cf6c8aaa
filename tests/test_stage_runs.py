"""The flow's stages reproduced by DVC in the flow's own process.

A real DVC project with two stages: one whose command is a ``fracture`` command (run in this
process) and one a shell command (run by DVC in a shell, as ``dvc repro`` does). What DVC
records must be what ``dvc repro`` would: the command line's ``dvc status`` and ``dvc repro``
find nothing to do afterwards, and a failed command leaves ``dvc.lock`` and the cached outputs
as they were.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fracture import cli
from tasks.pipeline import StageFailed, repro
from tests.conftest import REPO, dvc, run

SHELL_STAGE = f"{sys.executable} -c \"import os; open('shell.txt', 'w').write(str(os.getpid()))\""


@pytest.fixture
def probe_command() -> Iterator[None]:
    """``fracture probe OUT``: writes this process's id and ``in.txt`` to OUT; ``in.txt`` = fail exits 1."""

    def probe(out: str) -> None:
        text = Path("in.txt").read_text()  # relative: the command runs from the project root
        if text == "fail":
            sys.exit("fracture probe: in.txt says fail")
        if text == "slow":
            time.sleep(0.5)
        Path(out).write_text(f"{os.getpid()} {text}")

    cli.app.command("probe")(probe)
    try:
        yield
    finally:
        cli.app.registered_commands.pop()


@pytest.fixture
def dvc_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    run(project, "git", "init", "-q")
    dvc(project, "init", "-q")
    (project / "in.txt").write_text("first")
    stages = {
        "probe": {"cmd": "fracture probe out.txt", "deps": ["in.txt"], "outs": ["out.txt"]},
        "shell": {"cmd": SHELL_STAGE, "deps": ["out.txt"], "outs": ["shell.txt"]},
    }
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    return project


def _lock(project: Path) -> dict:
    return yaml.safe_load((project / "dvc.lock").read_text())["stages"]


def test_a_fracture_command_runs_in_this_process_and_dvc_records_it_as_dvc_repro_would(probe_command, dvc_project):
    project = dvc_project
    import dvc.stage.run as dvc_run

    shell_run = dvc_run.cmd_run
    first = repro(project, "probe")
    second = repro(project, "shell")
    assert first.ran and second.ran
    pid, text = (project / "out.txt").read_text().split()
    assert int(pid) == os.getpid() and text == "first"  # the fracture command ran here, not in a new process
    assert int((project / "shell.txt").read_text()) != os.getpid()  # any other command runs in DVC's shell
    assert dvc_run.cmd_run is shell_run  # DVC's own runner is back after each call

    # DVC hashed, cached and locked the outputs: the command line finds everything up to date.
    lock = _lock(project)
    assert lock["probe"]["cmd"] == "fracture probe out.txt" and lock["probe"]["outs"][0]["path"] == "out.txt"
    assert "Data and pipelines are up to date" in dvc(project, "status")
    assert "didn't change, skipping" in dvc(project, "repro")
    assert not repro(project, "probe").ran and not repro(project, "shell").ran

    # A dependency changes: the stage runs again, and so does the one that reads its output.
    (project / "in.txt").write_text("second")
    assert repro(project, "probe").ran and repro(project, "shell").ran
    assert (project / "out.txt").read_text().split()[1] == "second"
    assert "Data and pipelines are up to date" in dvc(project, "status")
    assert repro(project, "probe").outcome == "up to date"

    # Back to the first input: DVC restores that run's outputs from its run cache; no command runs,
    # and the run says so rather than that the stage ran.
    (project / "in.txt").write_text("first")
    restored = repro(project, "probe")
    assert restored.ran and restored.restored and restored.command_seconds is None
    assert restored.outcome == "restored" and restored.describe().startswith("restored ")
    assert (project / "out.txt").read_text() == f"{pid} first"  # the first run's output, written by no new run


def test_a_failed_fracture_command_fails_the_stage_with_its_message_and_dvc_records_nothing(
    probe_command, dvc_project
):
    project = dvc_project
    assert repro(project, "probe").ran
    before, lock_before = (project / "out.txt").read_text(), (project / "dvc.lock").read_text()

    (project / "in.txt").write_text("fail")
    with pytest.raises(StageFailed, match="stage probe: .*fracture probe: in.txt says fail") as failed:
        repro(project, "probe")
    assert failed.value.returncode == 1
    assert (project / "dvc.lock").read_text() == lock_before
    # As after a failed `dvc repro`: DVC removed the stage's outputs before the run, and its cache holds them.
    (project / "in.txt").write_text("first")
    dvc(project, "checkout", "--force", "probe")
    assert (project / "out.txt").read_text() == before
    assert "Data and pipelines are up to date" in dvc(project, "status", "probe")


def test_a_stage_command_with_shell_syntax_is_left_to_dvcs_shell():
    from tasks.pipeline import IN_PROCESS_COMMAND

    assert IN_PROCESS_COMMAND.fullmatch("fracture train")
    assert IN_PROCESS_COMMAND.fullmatch("fracture ingest --source ../shared/fracatlas")
    for shell in ("fracture train && echo done", "fracture evaluate > log.txt", "fracture train; rm -rf x",
                  "fracture $STAGE", "FOO=1 fracture train", "python -m fracture.cli train"):
        assert not IN_PROCESS_COMMAND.fullmatch(shell), shell


def test_a_stage_run_times_its_command_apart_from_dvcs_work_around_it(probe_command, dvc_project):
    project = dvc_project
    (project / "in.txt").write_text("slow")
    slow = repro(project, "probe")
    assert slow.ran and 0.5 <= slow.command_seconds <= slow.seconds  # the command slept 0.5 s
    assert slow.dvc_seconds == pytest.approx(slow.seconds - slow.command_seconds)
    assert slow.describe().startswith("ran") and f"(command {slow.command_seconds:.1f} s, DVC " in slow.describe()
    shell = repro(project, "shell")  # a command DVC runs in its shell is timed too
    assert shell.ran and 0 < shell.command_seconds <= shell.seconds
    skipped = repro(project, "probe")  # up to date: no command ran
    assert not skipped.ran and skipped.command_seconds is None and skipped.dvc_seconds is None
    assert skipped.describe() == f"up to date {skipped.seconds:7.1f} s"


@pytest.mark.parametrize("name", ["params.yaml", "dvc.yaml", "data.dvc", "crossval/dvc.yaml", "detect/dvc.yaml"])
def test_dvc_reads_the_projects_yaml_with_libyaml_as_the_pure_parser_would(name: str) -> None:
    """DVC parses params.yaml, the pipeline files and .dvc files with ruamel.yaml's safe loader,
    several times per stage; with ruamel.yaml.clib that loader uses libyaml's parser, several
    times faster, and reads every file of the project as the pure-Python parser does."""
    from dvc.utils.serialize._yaml import parse_yaml
    from ruamel.yaml import YAML
    from ruamel.yaml.main import CParser

    assert CParser is not None, "ruamel.yaml.clib is not installed: make venv installs it from constraints.txt"
    assert YAML(typ="safe").Parser is CParser  # the loader DVC's parse_yaml builds
    text = (REPO / name).read_text()
    assert parse_yaml(text, name) == YAML(typ="safe", pure=True).load(text)


def test_dvcs_messages_print_once_in_the_flows_process_and_git_sees_what_to_commit(dvc_project, tmp_path):
    from tasks.pipeline import uncommitted

    project = dvc_project
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"hello": {"cmd": SHELL_STAGE, "outs": ["shell.txt"]}}}))
    # The flow's process: importing tasks.pipeline imports Prefect, whose console handler sits on
    # the root logger beside DVC's own handlers.
    done = subprocess.run(
        [sys.executable, "-c", f"from pathlib import Path; from tasks.pipeline import repro; repro(Path({str(project)!r}), 'hello')"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    printed = done.stdout + done.stderr
    assert printed.count("Running stage 'hello'") == 1 and printed.count("Generating lock file 'dvc.lock'") == 1, printed
    assert "git add" not in printed  # DVC's reminder after each call; the flow gives one at its end
    # In this process too (pytest's handlers sit on the root logger), DVC's handlers are back after a call.
    import dvc.repo  # noqa: F401 - importing DVC sets up its handlers

    handlers = list(logging.getLogger("dvc").handlers)
    assert handlers and not repro(project, "hello").ran and logging.getLogger("dvc").handlers == handlers

    assert {"dvc.lock", ".gitignore"} <= set(uncommitted(project, ("dvc.lock",)))
    run(project, "git", "add", "-A")
    run(project, "git", "-c", "user.name=ci", "-c", "user.email=ci@localhost", "commit", "-qm", "lock")
    assert uncommitted(project, ("dvc.lock",)) == []
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    assert uncommitted(outside) == []


def test_what_to_commit_is_named_from_the_project_inside_its_repository(tmp_path):
    """A project in a folder of its git repository: `git add <path>` typed in the project must find the file."""
    from tasks.pipeline import uncommitted

    project = tmp_path / "repo" / "fracture models é"  # a space and a non-ASCII letter, which git quotes
    project.mkdir(parents=True)
    run(tmp_path / "repo", "git", "init", "-q")
    (project / "dvc.lock").write_text("schema: '2.0'\n")
    (project / "params.yaml").write_text("train: {profile: cpu}\n")
    assert uncommitted(project, ("params.yaml", "dvc.lock")) == ["dvc.lock", "params.yaml"]
    run(project, "git", "add", *uncommitted(project, ("params.yaml", "dvc.lock")))  # typed as the flow's message says


def test_a_weights_files_dvc_file_is_named_among_what_to_commit(tmp_path):
    import dataclasses

    from flows.retrain import pinned_files
    from fracture.config import load_params
    from tasks.pipeline import uncommitted

    run(tmp_path, "git", "init", "-q")
    (tmp_path / "pretrained").mkdir()
    (tmp_path / "pretrained" / "b6.safetensors.dvc").write_text("outs:\n- md5: 0\n  path: b6.safetensors\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    profile = load_params(REPO).profiles["paper"]
    assert uncommitted(tmp_path, pinned_files(profile)) == ["dvc.lock"]
    from_file = dataclasses.replace(profile, weights="file", weights_file="pretrained/b6.safetensors")
    assert uncommitted(tmp_path, pinned_files(from_file)) == ["dvc.lock", "pretrained/b6.safetensors.dvc"]
