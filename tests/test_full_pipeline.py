"""The main job on the whole real FracAtlas copy with the CPU profile (12 to 17 minutes on two cores).

Marked slow: `make test-all` runs it; `make test` does not.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# The product's quality bar for the CPU profile on a held-out split.
MIN_ROC_AUC = 0.92
MIN_SENSITIVITY = 0.85
MIN_SPECIFICITY = 0.85


@pytest.mark.xfail(
    reason=(
        "not met yet: the CPU profile's champion measured test ROC AUC 0.913, sensitivity 0.845 and specificity "
        "0.753 at its val-chosen threshold on this machine (bar 0.92, 0.85 and 0.85)"
    ),
    strict=False,
)
def test_cpu_profile_on_the_full_copy_meets_the_quality_bar(project, fracatlas):
    from flows.retrain import retrain

    shutil.copy(REPO / "params.yaml", project / "params.yaml")  # the real params, not the shrunk ones
    result = retrain(project_dir=str(project), source=str(fracatlas), profile="cpu")

    metrics = json.loads((project / "outputs/evaluate/metrics.json").read_text())
    assert result.registration.champion and result.registration.version == "1"
    assert metrics["roc_auc"] >= MIN_ROC_AUC
    # The threshold was chosen on the val split, so these are honest test-split figures.
    assert metrics["recall"] >= MIN_SENSITIVITY
    assert metrics["specificity"] >= MIN_SPECIFICITY
