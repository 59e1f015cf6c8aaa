"""The manifest and the Great Expectations suite, on synthetic data and on the real copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fracture.config import load_params
from fracture.manifest import build_manifest
from fracture.validation import apply_policy, failure_message, validate
from tests.conftest import REPO
from tests.synthetic import make_dataset, truncate


@pytest.fixture(scope="module")
def vparams():
    return load_params(REPO).validate


def findings_by_rule(report):
    return {f.rule: f for f in report.findings}


def test_clean_dataset_passes_every_rule(tmp_path, vparams):
    make_dataset(tmp_path)
    manifest = build_manifest(tmp_path, workers=1)
    resolved, report = validate(manifest, vparams)
    assert report.success
    assert all(f.success for f in report.findings), [f.rule for f in report.findings if not f.success]
    assert resolved["included"].all()
    assert report.counts["fractured_included"] == 6


def test_soft_quirks_are_detected_and_reported_by_id(tmp_path, vparams):
    csv = make_dataset(tmp_path)
    truncate(tmp_path / "images/Non_fractured/IMG0000010.jpg")
    shutil.copyfile(tmp_path / "images/Non_fractured/IMG0000011.jpg", tmp_path / "images/Non_fractured/IMG0000012.jpg")
    csv.loc[csv["image_id"] == "IMG0000001.jpg", "fractured"] = 0
    csv.to_csv(tmp_path / "dataset.csv", index=False)

    manifest = build_manifest(tmp_path, workers=1)
    resolved, report = validate(manifest, vparams)
    found = findings_by_rule(report)
    assert report.success  # soft rules do not fail the stage
    assert found["not_truncated"].unexpected_ids == ["IMG0000010.jpg"]
    assert found["folder_label_matches_csv"].unexpected_ids == ["IMG0000001.jpg"]
    assert found["unique_content"].unexpected_ids == ["IMG0000011.jpg", "IMG0000012.jpg"]
    assert report.duplicate_groups == [["IMG0000011.jpg", "IMG0000012.jpg"]]
    row = manifest.set_index("image_id").loc["IMG0000010.jpg"]
    assert bool(row["decodable"]) and bool(row["truncated"])
    # Default policy: the folder label wins, truncated images are kept.
    assert resolved.set_index("image_id").loc["IMG0000001.jpg", "label"] == 1
    assert resolved["included"].all()


def test_policy_exclusions_are_listed_with_their_rule(tmp_path, vparams):
    import dataclasses

    csv = make_dataset(tmp_path)
    truncate(tmp_path / "images/Non_fractured/IMG0000010.jpg")
    csv.loc[csv["image_id"] == "IMG0000001.jpg", "fractured"] = 0
    csv.to_csv(tmp_path / "dataset.csv", index=False)
    strict = dataclasses.replace(vparams, on_truncated="exclude", on_label_conflict="exclude")
    resolved, excluded = apply_policy(build_manifest(tmp_path, workers=1), strict)
    assert set(excluded) == {"IMG0000010.jpg", "IMG0000001.jpg"}
    assert excluded["IMG0000010.jpg"].startswith("not_truncated")
    assert excluded["IMG0000001.jpg"].startswith("folder_label_matches_csv")
    assert not resolved.set_index("image_id").loc[list(excluded), "included"].any()


def test_hard_rules_fail_naming_rule_and_ids(tmp_path, vparams):
    csv = make_dataset(tmp_path)
    (tmp_path / "images/Non_fractured/IMG0000015.jpg").unlink()
    (tmp_path / "images/Non_fractured/IMG0000016.jpg").write_bytes(b"not an image at all")
    csv[csv["image_id"] != "IMG0000017.jpg"].to_csv(tmp_path / "dataset.csv", index=False)

    _, report = validate(build_manifest(tmp_path, workers=1), vparams)
    assert not report.success
    failed = {f.rule: f.unexpected_ids for f in report.failures()}
    assert failed["file_for_every_csv_row"] == ["IMG0000015.jpg"]
    assert failed["csv_row_for_every_file"] == ["IMG0000017.jpg"]
    assert failed["decodable"] == ["IMG0000016.jpg"]
    message = failure_message(report)
    assert "file_for_every_csv_row" in message and "IMG0000015.jpg" in message


def test_real_copy_quirks_are_all_detected(fracatlas, vparams):
    manifest = build_manifest(fracatlas)
    _, report = validate(manifest, vparams)
    found = findings_by_rule(report)
    assert report.success
    assert "IMG0003298.jpg" in found["folder_label_matches_csv"].unexpected_ids
    truncated = found["not_truncated"].unexpected_ids
    assert truncated and all("IMG0004028.jpg" <= i <= "IMG0004347.jpg" for i in truncated)
    groups = report.duplicate_groups
    assert any({"IMG0000003.jpg", "IMG0000005.jpg"} <= set(g) for g in groups)
    # Each duplicate group stays within one class folder.
    labels = manifest.set_index("image_id")["folder_label"]
    assert all(labels[g].nunique() == 1 for g in groups)
