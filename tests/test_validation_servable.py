"""A file the served model refuses for what it is (a chest X-ray, a CT, an image FOR PROCESSING, several
frames) is left out under rule ``servable`` with the served model's reason, and does not fail the
validate stage as shipped; a damaged file still fails it under ``decodable``, and the stage's message
says why each named file failed."""

from __future__ import annotations

import dataclasses
import io
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from pydicom import dcmread

from fracture.config import load_params
from fracture.intake import InputRejected, read_xray
from fracture.manifest import build_manifest
from fracture.policies import Exclusion
from fracture.stages.register import input_policy
from fracture.stages.validate import run_validate
from fracture.suite import skipped_rules
from fracture.validation import MAX_REASONS, ValidationReport, failure_message, validate
from fracture.workspace import Workspace
from tests.conftest import REPO, shrink_params
from tests.dicom_files import dicom_from_jpeg, multiframe, to_bytes
from tests.synthetic import FLAGS, make_dataset, write_image

PARAMS = load_params(REPO)

#: What the served model says of each, as the exclusion's reason holds it.
REFUSED = {
    "images/chest.dcm": "is an X-ray of CHEST (its Body Part Examined)",
    "images/ct.dcm": "has modality CT",
    "images/for_processing.dcm": "is an image FOR PROCESSING",
    "images/two_frames.dcm": "holds 2 frames",
}


def hospital_export(root: Path, damaged: bool = False) -> Path:
    """images/ of 16 DICOM hand X-rays (4 fractured) and the four files of :data:`REFUSED`, with labels.csv;
    ``damaged``: and a DICOM file cut off in its pixel data."""
    images = root / "images"
    images.mkdir(parents=True)
    rows = ["path,label"]
    for i in range(16):
        write_image(root / "tmp.png", seed=i)
        (images / f"hand{i}.dcm").write_bytes(dicom_from_jpeg(root / "tmp.png", "8-bit"))
        rows.append(f"images/hand{i}.dcm,{int(i < 4)}")
    write_image(root / "tmp.png", seed=100)
    chest = dcmread(io.BytesIO(dicom_from_jpeg(root / "tmp.png", "8-bit")))
    chest.BodyPartExamined = "CHEST"
    (images / "chest.dcm").write_bytes(to_bytes(chest))
    write_image(root / "tmp.png", seed=101)
    (images / "ct.dcm").write_bytes(dicom_from_jpeg(root / "tmp.png", "8-bit", modality="CT"))
    write_image(root / "tmp.png", seed=102)
    raw = dcmread(io.BytesIO(dicom_from_jpeg(root / "tmp.png", "8-bit")))
    raw.PresentationIntentType = "FOR PROCESSING"
    (images / "for_processing.dcm").write_bytes(to_bytes(raw))
    write_image(root / "tmp.png", seed=103)
    (images / "two_frames.dcm").write_bytes(multiframe(root / "tmp.png"))
    rows += [f"{path},0" for path in REFUSED]
    if damaged:
        write_image(root / "tmp.png", seed=104)
        data = dicom_from_jpeg(root / "tmp.png", "8-bit")
        (images / "damaged.dcm").write_bytes(data[: len(data) - 3000])  # an interrupted transfer
        rows.append("images/damaged.dcm,0")
    (root / "tmp.png").unlink()
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def run(root: Path) -> tuple[pd.DataFrame, ValidationReport]:
    """The validate stage's manifest and suite on a csv-layout export, with the shipped params."""
    serve = PARAMS.serve
    manifest = build_manifest(root, workers=1, layout="csv", max_pixels=serve.max_megapixels * 10**6,
                              min_grey_std=serve.min_grey_std, modalities=serve.modalities, body_parts=serve.body_parts)
    return validate(manifest, PARAMS.validate, None, skipped_rules("csv"))


def test_files_the_served_model_refuses_in_a_pacs_export_are_left_out_without_failing_the_stage(tmp_path):
    """One chest X-ray in an export of hands failed the whole stage as "rule 'decodable' failed" (the
    file decodes: the served model refuses it). Each is now excluded under `servable`, with the
    served model's reason, and the stage goes on with the rest."""
    root = hospital_export(tmp_path / "export")
    policy = input_policy(PARAMS)
    for path, said in REFUSED.items():  # the premise: the served model refuses each, saying so
        with pytest.raises(InputRejected, match=re.escape(said)):
            read_xray((root / path).read_bytes(), policy)

    resolved, report = run(root)

    assert report.success, failure_message(report)
    assert report.finding("decodable").success
    servable = report.finding("servable")
    assert servable.severity == "soft" and servable.unexpected_ids == sorted(REFUSED)
    assert {i: e.rule for i, e in report.excluded.items()} == dict.fromkeys(REFUSED, "servable")
    for path, said in REFUSED.items():
        reason = report.excluded[path].reason
        assert reason.startswith("the served model refuses the file, so it is not trained on: "), reason
        assert said in reason, reason
    assert report.counts["included"] == 16 and report.counts["excluded"] == 4
    assert resolved.set_index("image_id").loc[sorted(REFUSED), "exclude_rule"].eq("servable").all()


def test_set_hard_servable_fails_the_stage_naming_each_file_and_its_reason(tmp_path):
    root = hospital_export(tmp_path / "export")
    serve = PARAMS.serve
    manifest = build_manifest(root, workers=1, layout="csv", max_pixels=serve.max_megapixels * 10**6,
                              min_grey_std=serve.min_grey_std, modalities=serve.modalities, body_parts=serve.body_parts)
    strict = dataclasses.replace(PARAMS.validate, severity={**PARAMS.validate.severity, "servable": "hard"})
    _, report = validate(manifest, strict, None, skipped_rules("csv"))
    assert not report.success and [f.rule for f in report.failures()] == ["servable"]
    message = failure_message(report)
    assert "rule 'servable' failed for 4 images: 'images/chest.dcm', 'images/ct.dcm'" in message
    for path, said in REFUSED.items():
        line = next(line for line in message.splitlines() if line.startswith(f"    {path!r}: "))
        assert said in line, line


def test_a_damaged_file_still_fails_decodable_and_the_message_says_why(tmp_path):
    """The message named the ids only ("rule 'decodable' failed for 1 images: 'images/chest_bpe.dcm'"),
    the reason being in the full report alone."""
    _, report = run(hospital_export(tmp_path / "export", damaged=True))
    assert not report.success and [f.rule for f in report.failures()] == ["decodable"]
    assert report.excluded["images/damaged.dcm"].rule == "decodable"
    assert report.finding("servable").unexpected_ids == sorted(REFUSED)  # still listed, under their own rule
    message = failure_message(report)
    assert "rule 'decodable' failed for 1 images: 'images/damaged.dcm'\n" in message
    (line,) = [line for line in message.splitlines() if line.startswith("    'images/damaged.dcm': ")]
    assert line.startswith("    'images/damaged.dcm': the file does not decode as an image: ") and len(line) > 70
    assert "servable" not in message and "chest" not in message


def test_the_message_gives_the_reasons_of_the_first_few_files_and_points_to_the_rest(tmp_path):
    make_dataset(tmp_path)
    manifest = build_manifest(tmp_path, workers=1)
    broken = sorted(manifest["image_id"])[: MAX_REASONS + 2]
    for n, image_id in enumerate(broken):
        manifest.loc[manifest["image_id"] == image_id, ["decodable", "error"]] = [False, f"reason {n}"]
    _, report = validate(manifest, PARAMS.validate)
    assert report.excluded[broken[0]] == Exclusion("decodable", "the file does not decode as an image: reason 0")
    lines = failure_message(report).splitlines()
    at = lines.index(next(line for line in lines if line.startswith("  rule 'decodable' failed for 7 images")))
    assert lines[at + 1 : at + 1 + MAX_REASONS] == [
        f"    {image_id!r}: the file does not decode as an image: reason {n}" for n, image_id in enumerate(broken[:MAX_REASONS])
    ]
    assert lines[at + 1 + MAX_REASONS] == "    (the reasons of the other 2 under `excluded` in the full report)"


TALL = "IMG0000020.jpg"  # a stitched long-leg film: 100 x 8300 px, over validate.max_side 8192
NARROW = "IMG0000021.jpg"  # 40 x 300 px, under validate.min_side 64


@pytest.mark.parametrize("bounds", ["hard", "soft"])
def test_the_stage_leaves_out_an_image_whose_side_the_served_model_refuses(tmp_path, bounds):
    """The served model refuses a side outside validate.min_side .. max_side; training did not: such an
    image failed the stage under the hard width/height rules, and was trained on with them soft."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shrink_params(root, validate__compare_previous=False, validate__severity__width_in_bounds=bounds,
                  validate__severity__height_in_bounds=bounds)
    params = load_params(root)
    dataset = root / params.ingest.dest
    csv = make_dataset(dataset, 6, 14)
    write_image(dataset / "images/Non_fractured" / TALL, seed=50, size=(100, 8300))
    write_image(dataset / "images/Non_fractured" / NARROW, seed=51, size=(40, 300))
    extra = [{"image_id": image_id, **dict.fromkeys(FLAGS, 0), "leg": 1, "frontal": 1, "fractured": 0, "fracture_count": 0}
             for image_id in (TALL, NARROW)]
    pd.concat([csv, pd.DataFrame(extra)[csv.columns]]).to_csv(dataset / "dataset.csv", index=False)
    policy = input_policy(params)
    for image_id, said in ((TALL, "is 100 x 8300 px"), (NARROW, "is 40 x 300 px")):  # the premise
        with pytest.raises(InputRejected, match=said):
            read_xray((dataset / "images/Non_fractured" / image_id).read_bytes(), policy)

    result = run_validate(params, Workspace(root))

    assert {i: e["rule"] for i, e in result.excluded.items()} == {TALL: "servable", NARROW: "servable"}
    assert result.excluded[TALL]["reason"] == (
        "the served model refuses the file, so it is not trained on: is 100 x 8300 px, a side outside "
        "validate.min_side to validate.max_side (64 to 8192 px): the served model refuses it; send the X-ray at a "
        "size within them, or change validate.min_side / max_side in params.yaml"
    )
    assert "is 40 x 300 px, a side outside" in result.excluded[NARROW]["reason"]
    findings = {f["rule"]: f for f in result.findings}
    assert findings["width_in_bounds"]["success"] and findings["height_in_bounds"]["success"]
    assert findings["servable"]["unexpected_ids"] == [TALL, NARROW]
    assert result.counts["included"] == 20


def test_sound_files_in_forms_the_served_model_does_not_read_are_refused_not_taken_for_damage(tmp_path):
    """A palette image, a vendor's private transfer syntax, no Modality, and an object without pixel
    data (Raw Data with Modality DX) were filed as damaged (hard `decodable`), failing the stage, where
    serving refuses them for what they are; a file cut off before its pixels is still damage."""
    from fracture.manifest import inspect_image

    write_image(tmp_path / "x.png", seed=1)
    base = dicom_from_jpeg(tmp_path / "x.png", "8-bit")

    def edited(**values) -> bytes:
        ds = dcmread(io.BytesIO(base))
        for keyword, value in values.items():
            if keyword == "TransferSyntaxUID":
                ds.file_meta.TransferSyntaxUID = value
            elif value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    cases = {
        "palette": (edited(PhotometricInterpretation="PALETTE COLOR"), True),
        "private": (edited(TransferSyntaxUID="1.2.840.113619.5.2"), True),
        "no_modality": (edited(Modality=None), True),
        "raw_data": (edited(SOPClassUID="1.2.840.10008.5.1.4.1.1.66", PixelData=None, Rows=None, Columns=None,
                            SamplesPerPixel=None, BitsAllocated=None, BitsStored=None, HighBit=None,
                            PixelRepresentation=None, PhotometricInterpretation=None), True),
        "cut_before_pixels": (edited(PixelData=None), False),
    }
    for name, (data, refused) in cases.items():
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(data)
        facts = inspect_image(str(path), body_parts=("HAND",), min_side=64, max_side=8192)
        assert not facts.decodable, name
        assert facts.refused is refused, (name, facts.error)
        with pytest.raises(InputRejected) as served:
            read_xray(data, input_policy(PARAMS))
        assert facts.error in str(served.value), name
