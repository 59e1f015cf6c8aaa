"""Training takes no image the served model refuses as too large or blank: the validate stage lists
it as excluded with the served model's reason, and the split and the prepared cache leave it out."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fracture.config import Params, load_params
from fracture.intake import InputRejected, read_xray
from fracture.stages.prepare import run_prepare
from fracture.stages.register import input_policy
from fracture.stages.split import run_split
from fracture.stages.validate import run_validate
from fracture.validation import ValidationFailed
from fracture.workspace import Workspace
from tests.conftest import REPO, shrink_params
from tests.synthetic import FLAGS, make_dataset

BLANK = "IMG0000020.jpg"  # a near-constant grey film: greyscale standard deviation under 1
LARGE = "IMG0000021.jpg"  # 1200 x 1000 px: over serve.max_megapixels 1


def served_limits_project(root: Path, **overrides: object) -> Params:
    """A project of 20 synthetic X-rays and the two the served model refuses, with the shipped
    params shrunk and ``serve.max_megapixels`` at 1, so that a small image is over it."""
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shrink_params(root, serve__max_megapixels=1, validate__compare_previous=False, **overrides)
    params = load_params(root)
    dataset = root / params.ingest.dest
    csv = make_dataset(dataset, 6, 14)
    rng = np.random.default_rng(7)
    grey = (128 + rng.normal(0, 1.0, (400, 300))).round().clip(0, 255).astype(np.uint8)
    Image.fromarray(grey).save(dataset / "images/Non_fractured" / BLANK, quality=95)
    Image.fromarray(rng.integers(0, 255, (1000, 1200), dtype=np.uint8)).save(dataset / "images/Fractured" / LARGE)
    extra = [
        {"image_id": image_id, **{f: 0 for f in FLAGS}, "hand": 1, "frontal": 1, "fractured": label, "fracture_count": label}
        for image_id, label in ((BLANK, 0), (LARGE, 1))
    ]
    pd.concat([csv, pd.DataFrame(extra)[csv.columns]]).to_csv(dataset / "dataset.csv", index=False)
    # The premise: the model registered from these params refuses both.
    policy = input_policy(params)
    for folder, image_id in (("Non_fractured", BLANK), ("Fractured", LARGE)):
        with pytest.raises(InputRejected):
            read_xray((dataset / "images" / folder / image_id).read_bytes(), policy)
    return params


def test_validate_lists_a_blank_and_an_over_limit_image_and_they_are_neither_split_nor_prepared(tmp_path):
    params = served_limits_project(tmp_path / "project")  # validate.severity.servable: soft, as shipped
    workspace = Workspace(tmp_path / "project")
    result = run_validate(params, workspace)

    assert set(result.excluded) == {BLANK, LARGE}
    blank, large = result.excluded[BLANK], result.excluded[LARGE]
    assert blank["rule"] == large["rule"] == "servable"
    assert "is blank or nearly constant (greyscale standard deviation 0." in blank["reason"]
    assert "under serve.min_grey_std 2" in blank["reason"] and "served model refuses it" in blank["reason"]
    assert "declares 1200 x 1000 px (1.2 megapixels), over serve.max_megapixels (1)" in large["reason"]
    assert "served model refuses it" in large["reason"]
    assert result.counts["included"] == 20 and result.counts["excluded"] == 2

    manifest = workspace.read_manifest().set_index("image_id")
    assert not manifest.loc[[BLANK, LARGE], "included"].any() and manifest["included"].sum() == 20

    run_split(params, workspace)
    split_ids = set(pd.concat(workspace.read_split_tables().values())["image_id"])
    assert len(split_ids) == 20 and not {BLANK, LARGE} & split_ids

    assert run_prepare(params, workspace).images == 20
    prepared = set(pd.read_csv(workspace.prepare_dir / "index.csv")["image_id"])
    assert len(prepared) == 20 and not {BLANK, LARGE} & prepared


def test_with_servable_hard_the_stage_fails_naming_both_and_the_report_lists_them(tmp_path, capsys):
    params = served_limits_project(tmp_path / "project", validate__severity__servable="hard")
    workspace = Workspace(tmp_path / "project")
    with pytest.raises(ValidationFailed) as failed:
        run_validate(params, workspace)
    assert f"rule 'servable' failed for 2 images: '{BLANK}', '{LARGE}'" in str(failed.value)
    # ... each with the served model's reason, in the stage's own message.
    assert f"\n    '{BLANK}': the served model refuses the file, so it is not trained on: is blank" in str(failed.value)
    assert f"\n    '{LARGE}': the served model refuses the file, so it is not trained on: declares 1200" in str(failed.value)
    report = workspace.read_validate()
    assert {i: e["rule"] for i, e in report.excluded.items()} == {BLANK: "servable", LARGE: "servable"}
    assert "serve.min_grey_std" in report.excluded[BLANK]["reason"]
    assert "serve.max_megapixels" in report.excluded[LARGE]["reason"]
    # `fracture validate` says why each named file failed, not only which (the reasons were in report.json alone).
    from fracture.cli import _print_validation  # noqa: PLC0415

    _print_validation(report, workspace)
    printed = capsys.readouterr().out.splitlines()
    at = printed.index(next(line for line in printed if line.startswith("[hard] servable: 2 images")))
    assert printed[at + 1].startswith(f"    {BLANK}: is blank or nearly constant")
    assert printed[at + 2].startswith(f"    {LARGE}: declares 1200 x 1000 px")
