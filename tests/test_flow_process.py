"""The retrain flow's function outside a flow run, and how it rewrites params.yaml.

No Prefect server: nothing here starts a flow run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from tests.conftest import shipped_params_text


class _Stop(Exception):
    """Raised in place of the flow's next step, once what is tested has happened."""


def test_the_flows_function_runs_outside_a_flow_run_and_logs_through_prefects_plain_logger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``retrain.fn(...)`` (a notebook, a test) has no run context: ``get_run_logger`` would raise
    MissingContextError before the first step; the flow logs through ``prefect.logging.get_logger``."""
    import flows.retrain
    from flows.retrain import retrain, set_profile

    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(shipped_params_text())
    set_profile(project, "cpu")
    # Stops the run after its first logged step: setting the profile the caller asked for.
    monkeypatch.setattr(flows.retrain, "load_params", lambda _project: (_ for _ in ()).throw(_Stop()))
    prefect_logger = logging.getLogger("prefect")
    caplog.set_level(logging.INFO, logger="prefect")
    prefect_logger.addHandler(caplog.handler)
    try:
        with pytest.raises(_Stop):
            retrain.fn(project_dir=str(project), profile="paper")
    finally:
        prefect_logger.removeHandler(caplog.handler)
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["profile"] == "paper"
    assert any(f"set train.profile: paper in {project / 'params.yaml'}" in r.getMessage() for r in caplog.records)


def test_run_logger_outside_a_run_is_prefects_plain_logger_of_that_name() -> None:
    from tasks.pipeline import run_logger

    logger = run_logger("flows.retrain")
    assert isinstance(logger, logging.Logger) and logger.name == "prefect.flows.retrain"


def test_setting_the_profile_writes_params_nulls_as_null_and_leaves_other_yaml_dumps_as_they_were(tmp_path: Path) -> None:
    """params.yaml keeps `null` as it spells it; DVC's dumps in the same process (dvc.lock, through
    ruamel's round-trip YAML) write None as ``dvc repro`` does, not as params.yaml does."""
    import io

    from ruamel.yaml import YAML

    from flows.retrain import set_profile

    (tmp_path / "params.yaml").write_text(shipped_params_text())
    nulls = shipped_params_text().count(": null")
    assert set_profile(tmp_path, "cpu") and (tmp_path / "params.yaml").read_text().count(": null") == nulls > 0
    out = io.StringIO()
    YAML().dump({"T_0": None}, out)
    assert out.getvalue() == "T_0:\n"
