"""The training image installs exactly as the README's set-up commands do."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def _instructions(text: str) -> list[tuple[str, str]]:
    """A Dockerfile's instructions as (keyword, arguments), continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.MULTILINE)]


def _make_prerequisites(makefile: str, target: str) -> list[str]:
    match = re.search(rf"^{re.escape(target)}:([^\n]*)$", makefile, re.MULTILINE)
    assert match, f"Makefile has no target {target}"
    return match[1].split()


def test_the_venv_holds_exactly_the_pinned_set():
    """Every distribution in the venv the tests run in is pinned in constraints.txt at the version
    installed, and every pin is installed: a dependency added to pyproject.toml without its pin, or
    one a pin no longer names (pip never removes it), fails here rather than ship unpinned and unaudited."""
    import importlib.metadata

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    pins = dict(line.split("#", 1)[0].strip().split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if line.split("#", 1)[0].strip())
    pins = {canonical(name): version.strip() for name, version in pins.items()}
    installed = {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    installed.pop("fracture")  # the project itself, installed editable
    assert {name: version for name, version in installed.items() if pins.get(name) != version} == {}
    assert sorted(set(pins) - set(installed)) == []


def test_the_dockerfile_installs_with_the_readmes_install_step():
    readme = (REPO / "README.md").read_text()
    makefile = (REPO / "Makefile").read_text()
    steps = _instructions((REPO / "Dockerfile").read_text())

    setup = readme.split("## Set-up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    commands = [line.strip() for line in setup.splitlines() if line.startswith("    ")]
    assert [c.split()[:2] for c in commands] == [["make", "main"], ["make", "test"]]
    # Both README commands install through the venv target; the image runs that target alone.
    assert "venv" in _make_prerequisites(makefile, "main") and "venv" in _make_prerequisites(makefile, "test")
    runs = [args for keyword, args in steps if keyword == "RUN"]
    assert "make venv" in runs
    assert not any(re.search(r"\bpip\b|\buv\b|\bpoetry\b", r) for r in runs)  # no second way to install
    venv_rule = makefile.split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    assert "--constraint constraints.txt" in venv_rule  # the pinned set

    # The image's Python is the one the venv is made with, and docs/operations.md names the image's build.
    base = next(args for keyword, args in steps if keyword == "FROM")
    assert base.startswith("python:3.11")
    # ... pinned to a patch release and a Debian release, not a tag that moves to the next of either,
    # and the Dockerfile says how a site pins the digest too.
    assert re.fullmatch(r"python:3\.11\.\d+-slim-(bookworm|trixie)(@sha256:[0-9a-f]{64})?", base), base
    assert "docker buildx imagetools inspect" in (REPO / "Dockerfile").read_text()
    operations = (REPO / "docs" / "operations.md").read_text()
    assert "docker build -t" in operations and "schedule.image" in operations
    # Files a run makes never enter the image.
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv/", "data/", "outputs/", "mlflow.db", "mlartifacts/"} <= set(ignored)
    # Nor does a secret: DVC keeps a remote's credentials in .dvc/config.local, which git ignores.
    assert {".dvc/config.local", ".env"} <= set(ignored)
    # Nor git's remotes, where a CI checkout leaves its token: read as `docker build` reads .dockerignore.
    from docker.utils.build import exclude_paths

    sent = exclude_paths(str(REPO), [line for line in (REPO / ".dockerignore").read_text().splitlines()
                                     if line.strip() and not line.startswith("#")])
    assert ".git/config" not in sent and {".git/HEAD", "Makefile", "constraints.txt"} <= sent


def test_deploy_schedule_fixes_only_a_source_given_on_makes_command_line(tmp_path):
    """A FRACATLAS_SOURCE exported in the deploying shell names this machine's data: fixed in the
    deployment, it would override the workers' own (the pool's env job variable) on every run."""
    def deploy_command(*args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            ["make", "-n", "-C", str(REPO), "deploy-schedule", "WORK_POOL=pool", *args],
            capture_output=True, text=True, check=True,
            env={**os.environ, "FRACATLAS_SOURCE": "", **(env or {})},
        )
        return next(line for line in done.stdout.splitlines() if "flows.deploy deploy" in line)

    assert "--source" not in deploy_command(env={"FRACATLAS_SOURCE": "/home/alice/FracAtlas.zip"})
    assert '--source "/data/FracAtlas.zip"' in deploy_command("FRACATLAS_SOURCE=/data/FracAtlas.zip")
    assert "--source" not in deploy_command()


def test_the_readmes_image_recipe_deploys_with_the_images_project_folder():
    """A deployment names the project as its runs see it: in the image, the Dockerfile's WORKDIR,
    never the checkout `make deploy-schedule` runs in (absent from the image)."""
    operations = (REPO / "docs" / "operations.md").read_text()
    workdir = next(args for keyword, args in _instructions((REPO / "Dockerfile").read_text()) if keyword == "WORKDIR")
    recipe = operations.split("**The training image.**", 1)[1].split("\n\n**", 1)[0]
    assert "schedule.image" in recipe
    deploys = [line.split("#", 1)[0].split() for line in recipe.splitlines() if "make deploy-schedule" in line]
    assert deploys and all(f"PROJECT_DIR={workdir}" in command for command in deploys), deploys


def test_the_audit_summary_names_vulnerable_pins_and_counts_what_was_not_audited():
    from fracture.audit_report import summarise

    report = {"dependencies": [
        {"name": "good", "version": "1.0", "vulns": []},
        {"name": "bad", "version": "2.0", "vulns": [{"id": "GHSA-xxxx", "fix_versions": ["2.1"]}]},
        {"name": "unknown", "version": "3.0", "skip_reason": "Dependency not found on PyPI and could not be audited"},
    ]}
    lines = summarise(report)
    assert lines[0] == "VULNERABLE bad==2.0: GHSA-xxxx (fixed in 2.1)"
    assert lines[1] == "2 of 3 pinned packages audited; 1 with known vulnerabilities"
    assert lines[2].startswith("NOT AUDITED: 1 packages, e.g. unknown: Dependency not found")
    makefile = (REPO / "Makefile").read_text()
    assert "--requirement constraints.txt --no-deps" in makefile  # the pinned set, exactly as installed
    assert "make audit" in (REPO / ".ci" / "run").read_text()


def _another_python() -> Path | None:
    """An interpreter of another Python than 3.11 on this machine (pyenv's), or ``None``."""
    found = sorted((Path.home() / ".pyenv" / "versions").glob("3.*/bin/python3"))
    return next((path for path in found if not path.parent.parent.name.startswith("3.11")), None)


def test_the_venv_is_refused_on_another_python_than_the_pinned_set_was_resolved_on(tmp_path):
    """constraints.txt is resolved on Python 3.11: `make` names the interpreter and the fix before creating a venv."""
    assert sys.version_info[:2] == (3, 11)  # the suite's own venv, made by the same rule
    other = _another_python()
    if other is None:
        pytest.skip("no Python other than 3.11 on this machine (pyenv's versions) to create a venv with")
    venv = tmp_path / "venv"
    made = subprocess.run(["make", "-C", str(REPO), "venv", f"VENV={venv}", f"PYTHON={other}"],
                          capture_output=True, text=True, check=False)
    assert made.returncode != 0 and not venv.exists()
    version = other.parent.parent.name.rsplit(".", 1)[0]
    assert f"{other} is Python {version}; constraints.txt pins the libraries resolved on Python 3.11" in made.stderr
    assert "run make with PYTHON=python3.11" in made.stderr


def test_a_venv_there_already_is_checked_before_anything_is_installed_into_it(tmp_path):
    """A venv left without pip (python3 -m venv where ensurepip is missing) or made by another
    Python is named with the fix, instead of every make failing in pip or installing into it."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    made = subprocess.run(["make", "-C", str(REPO), "venv", f"VENV={bare}"], capture_output=True, text=True, check=False)
    assert made.returncode != 0 and not (bare / ".installed").exists()
    assert f"{bare} has no pip" in made.stderr and f"remove it (rm -rf {bare}) and run make again" in made.stderr
    other = _another_python()
    if other is None:
        pytest.skip("no Python other than 3.11 on this machine (pyenv's versions) to create a venv with")
    foreign = tmp_path / "foreign"
    subprocess.run([str(other), "-m", "venv", "--without-pip", str(foreign)], check=True)
    made = subprocess.run(["make", "-C", str(REPO), "venv", f"VENV={foreign}"], capture_output=True, text=True, check=False)
    assert made.returncode != 0 and not (foreign / ".installed").exists()
    version = other.parent.parent.name.rsplit(".", 1)[0]
    assert f"{foreign} is a venv of Python {version}; constraints.txt pins the libraries resolved on Python 3.11" in made.stderr


def test_the_stages_commands_are_found_in_the_venv_wherever_it_is_named(tmp_path):
    """make puts the venv's bin first on PATH, for the stages' `fracture` and `dvc` commands, relative or absolute."""
    show = ["--eval", "path: ; @echo \"$$PATH\"", "path"]
    for venv, bin_dir in ((str(tmp_path / "venv"), tmp_path / "venv" / "bin"), (".venv", REPO / ".venv" / "bin")):
        made = subprocess.run(["make", "-s", "-C", str(REPO), *show, f"VENV={venv}"],
                              capture_output=True, text=True, check=True)
        assert made.stdout.split(":", 1)[0] == str(bin_dir)


def test_make_clean_removes_the_venv_and_leaves_the_registry_and_outputs():
    dry = subprocess.run(["make", "-n", "-C", str(REPO), "clean"], capture_output=True, text=True, check=True)
    assert [line for line in dry.stdout.splitlines() if not line.startswith("make")] == ["rm -rf .venv"]


def test_an_audit_that_wrote_no_report_is_no_audit(tmp_path):
    """pip-audit that cannot reach PyPI stops without a report; the summary fails, naming it,
    and `make audit` removes the last report first so it is never read as this run's."""
    missing = tmp_path / "pip-audit.json"
    summary = subprocess.run([sys.executable, "-m", "fracture.audit_report", str(missing)],
                             capture_output=True, text=True, check=False, cwd=REPO)
    assert summary.returncode == 1
    assert summary.stderr.strip() == f"NOT AUDITED: pip-audit wrote no report to {missing} (its error is above); no package was audited"
    dry = subprocess.run(["make", "-n", "-C", str(REPO), "audit"], capture_output=True, text=True, check=True).stdout
    assert dry.index("rm -f audit/pip-audit.json") < dry.index("pip_audit")


def test_the_integration_tests_read_the_fracatlas_copy_named_and_ci_stops_without_one(tmp_path):
    """Without a real copy the integration tests skip; CI, whose contract is ../shared/fracatlas
    beside the clone, stops before testing rather than pass on a suite that skipped them."""
    elsewhere = tmp_path / "FracAtlas"
    env = {**os.environ, "FRACATLAS_TEST_DATA": str(elsewhere)}
    named = subprocess.run([sys.executable, "-c", "import tests.conftest as c; print(c.FRACATLAS)"],
                           cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert named.stdout.strip() == str(elsewhere)
    clone = tmp_path / "clone"
    (clone / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci" / "run", clone / ".ci" / "run")
    env.pop("FRACATLAS_TEST_DATA")
    ran = subprocess.run(["bash", str(clone / ".ci" / "run")], env=env, capture_output=True, text=True, check=False)
    assert ran.returncode == 1
    assert "no FracAtlas copy at ../shared/fracatlas (dataset.csv): CI runs the integration tests on it" in ran.stderr


def test_a_work_pool_run_copies_the_projects_code_not_its_venv_or_data(tmp_path):
    """Prefect copies a worker's working directory (the image's /opt/fracture) into each run's
    temporary folder, honouring .prefectignore: the code comes along, the venv and data do not."""
    from prefect.filesystems import LocalFileSystem

    project = tmp_path / "opt-fracture"
    for name in ("Makefile", "params.yaml", "dvc.yaml", ".prefectignore"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_bytes((REPO / name).read_bytes())
    (project / "flows").mkdir()
    (project / "flows" / "retrain.py").write_bytes((REPO / "flows" / "retrain.py").read_bytes())
    heavy = [".venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so", "data/images/Fractured/IMG0000019.jpg",
             "outputs/prepare/cache.npy", ".dvc/cache/files/md5/ab/cdef", "mlflow.db", ".git/objects/pack/p.pack"]
    for name in heavy:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_bytes(b"\0" * 1024)

    run_folder = tmp_path / "prefect-flow-run-1"
    LocalFileSystem(basepath=str(project)).get_directory(from_path=str(project), local_path=str(run_folder))
    copied = sorted(str(p.relative_to(run_folder)) for p in run_folder.rglob("*") if p.is_file())
    assert copied == sorted([".prefectignore", "Makefile", "dvc.yaml", "flows/retrain.py", "params.yaml"])
