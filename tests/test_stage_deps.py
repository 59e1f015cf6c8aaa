"""Every library module a pipeline stage runs is one of its DVC dependencies, so editing it reruns the stage."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO

#: Modules a stage imports that cannot change its outputs, left out of the deps on purpose (as
#: dvc.yaml's header says): paths, settings and their allowed values, the command line, MLflow
#: logging (tracking; seen, the list of images a model learnt from, logged on its run for a later
#: gate), and the served model's input checks (stages decode through fracture.decoding).
NOT_DEPENDENCIES = {"workspace", "config", "cli", "vocabulary", "tracking", "seen", "intake", "stages"}

PIPELINES = ["dvc.yaml", "crossval/dvc.yaml"]


def stages() -> list[tuple[str, str, list[str]]]:
    out = []
    for pipeline in PIPELINES:
        for name, stage in yaml.safe_load((REPO / pipeline).read_text())["stages"].items():
            command = stage["cmd"].split()
            assert command[0] == "fracture", f"{pipeline}: stage {name} runs {stage['cmd']!r}, not a fracture command"
            out.append((pipeline, command[1], [d for d in stage["deps"] if isinstance(d, str)]))
    return out


def imported_modules(*modules: str) -> set[str]:
    """The fracture modules importing these loads, in a fresh interpreter."""
    code = (
        f"import sys, {', '.join(modules)}; "
        "print(' '.join(m.split('.')[1] for m in sys.modules if m.startswith('fracture.') and m.count('.') == 1))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return set(result.stdout.split())


@pytest.fixture(scope="module")
def through_the_others() -> set[str]:
    """What the modules left out load themselves (the input checks load the decoders); a stage that
    decodes lists the decoders on its own, which this test does not see."""
    return imported_modules(*(f"fracture.{m}" for m in sorted(NOT_DEPENDENCIES - {"cli", "stages"})))


@pytest.mark.parametrize(("pipeline", "stage", "deps"), stages(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_module_a_stage_imports_is_a_dependency_of_it(pipeline, stage, deps, through_the_others):
    listed = {d.removeprefix("fracture/").removesuffix(".py") for d in deps if d.startswith("fracture/")}
    assert f"stages/{stage}" in listed
    missing = sorted(imported_modules(f"fracture.stages.{stage}") - through_the_others - NOT_DEPENDENCIES - listed)
    assert not missing, f"{pipeline}: stage {stage} runs fracture/{missing[0]}.py, not in its deps: add {missing}"


@pytest.mark.parametrize("stage", ["train", "crossval"])
def test_the_stages_that_read_a_weights_file_depend_on_its_folder(stage):
    # fracture.model.require_versioned_weights keeps weights_file in pretrained/; this dependency
    # is what makes `dvc repro` retrain when the file there changes.
    (deps,) = [deps for _, name, deps in stages() if name == stage]
    assert "pretrained" in deps


#: The stages that build or read a model's data config (input size, mean and std, aspect): the
#: workspace loads fracture/data_config.py for every stage, so the import test above, which leaves
#: out what the workspace loads, cannot tell these from the others.
READS_A_DATA_CONFIG = {
    ("dvc.yaml", "prepare"), ("dvc.yaml", "train"), ("dvc.yaml", "evaluate"),
    ("crossval/dvc.yaml", "crossval"), ("detect/dvc.yaml", "detect_train"),
}


@pytest.mark.parametrize(("pipeline", "stage"), sorted(READS_A_DATA_CONFIG))
def test_the_stages_that_read_a_data_config_depend_on_its_module(pipeline, stage):
    deps = yaml.safe_load((REPO / pipeline).read_text())["stages"][stage]["deps"]
    assert "fracture/data_config.py" in deps, f"{pipeline}: stage {stage} reads a data config; add fracture/data_config.py"
