"""The UIDs of the DICOM Structured Reports `fracture predict --dicom-sr` writes: under the
organisation's registered root where one is named (--sr-uid-root), and findings
tracked by a UID that tells images apart. Built from small synthetic radiographs."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from fracture.dicom_sr import check_uid_root, structured_report
from tests.dicom_files import dicom_from_jpeg, to_bytes
from tests.synthetic import write_image

ROOT = "1.3.6.1.4.1.55555.7."


def source(tmp_path: Path, seed: int = 1, **values: object) -> Dataset:
    """A small DX radiograph read back as ``fracture predict`` reads it, its header edited with ``values``."""
    jpeg = tmp_path / f"{seed}.jpg"
    write_image(jpeg, seed=seed)
    ds = dcmread(io.BytesIO(dicom_from_jpeg(jpeg, "8-bit")))
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return dcmread(io.BytesIO(to_bytes(ds)))


def written(sr: hd.sr.ComprehensiveSR) -> Dataset:
    """The report as a PACS reads it, once saved."""
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return dcmread(io.BytesIO(buffer.getvalue()))


def report(ds: Dataset, **kwargs: object) -> Dataset:
    return written(structured_report(ds, 0.7, 0.5, True, "fracture-classifier", "3", run_id="abc123", **kwargs))


def uids(sr: Dataset) -> dict[str, str]:
    """Every UID the report makes: its own, its series', the finding's Tracking UID and the device's."""
    [group] = hd.sr.ComprehensiveSR.from_dataset(sr).content.get_image_measurement_groups()
    device = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121012"]
    return {
        "SOPInstanceUID": str(sr.SOPInstanceUID), "SeriesInstanceUID": str(sr.SeriesInstanceUID),
        "TrackingUID": str(group.tracking_uid), "DeviceObserverUID": str(device[0].UID),
    }


def test_every_uid_a_report_makes_is_under_the_organisations_root_and_the_derived_ones_stay_derived(tmp_path):
    """Every UID the reports made was under pydicom's or highdicom's root, where a hospital's PACS
    and its vendors expect the organisation's registered one. Under a root, the report's own UIDs
    are new each time and the derived ones (the finding's, the device's) the same on every run."""
    ds = source(tmp_path)
    first, again = uids(report(ds, uid_root=ROOT)), uids(report(ds, uid_root=ROOT))
    for made in (first, again):
        assert all(uid.startswith(ROOT) and len(uid) <= 64 for uid in made.values()), made
    assert first["SOPInstanceUID"] != again["SOPInstanceUID"]
    assert first["SeriesInstanceUID"] != again["SeriesInstanceUID"]
    assert (first["TrackingUID"], first["DeviceObserverUID"]) == (again["TrackingUID"], again["DeviceObserverUID"])
    series = uids(report(ds, uid_root=ROOT, series_uid=first["SeriesInstanceUID"]))["SeriesInstanceUID"]
    assert series == first["SeriesInstanceUID"]  # a series the caller names is kept


def test_without_a_root_the_reports_uids_are_as_before(tmp_path):
    """No root set: the defaults as they were, so a finding a PACS already tracks keeps its UID."""
    from pydicom.uid import generate_uid

    ds = source(tmp_path)
    made = uids(report(ds))
    assert made["SOPInstanceUID"].startswith("1.2.826.0.1.3680043.10.511.3.")  # highdicom's root
    assert made["DeviceObserverUID"] == generate_uid(entropy_srcs=["fracture-classifier", "3", "abc123"])
    assert made["TrackingUID"].startswith("1.2.826.0.1.3680043.8.498.")  # pydicom's root


def test_a_root_is_taken_from_the_option_or_the_environment_and_a_mistyped_one_stops_the_run_first(tmp_path, monkeypatch):
    """The command reads the root from ``--sr-uid-root`` or ``FRACTURE_SR_UID_ROOT``, and one that is no
    UID root ends the run with one line naming it, before the model is loaded."""
    from typer.testing import CliRunner

    from fracture import cli

    image = tmp_path / "a.png"
    write_image(image, seed=1)
    loaded = []
    monkeypatch.setattr("fracture.predict.load", lambda uri: loaded.append(uri) or pytest.fail("the model was loaded"))
    for args, env in ((["--sr-uid-root", "1.3.6.1.4.1.055555."], {}), ([], {"FRACTURE_SR_UID_ROOT": "1.2.3"})):
        result = CliRunner().invoke(cli.app, ["predict", str(image), "--dicom-sr", str(tmp_path / "sr"), *args], env=env)
        assert result.exit_code == 1 and loaded == [], result.output
        assert "must be your organisation's registered DICOM UID root" in str(result.exception) + result.output


@pytest.mark.parametrize("root", [
    "1.3.6.1.4.1.55555.7",  # no dot for the UID's own digits
    "1.3.6.1.4.1.055555.",  # a component with a leading zero
    "1..3.",
    "5.3.6.",  # no OID starts with 5
    "1.3.6.1.4.1.a.",
    "1." + "1234567890." * 4,  # 42 characters: too little room left for the UID's own digits
    "",
])
def test_a_uid_root_that_is_not_one_is_refused(root):
    with pytest.raises(ValueError, match=r"--sr-uid-root \(FRACTURE_SR_UID_ROOT\) must be your organisation's "
                                         r"registered DICOM UID root.*got"):
        check_uid_root(root)


def test_a_uid_root_is_taken_as_given():
    assert check_uid_root(ROOT) == ROOT
    assert check_uid_root("2.16.840.1.113883.") == "2.16.840.1.113883."


@pytest.mark.parametrize("root", ["2.25.", "2.25.1234."])
def test_the_uuid_arc_is_no_organisations_root(root):
    """2.25 holds UIDs made of one UUID's integer alone; random digits added under it make UIDs that
    are neither a UUID's nor an organisation's."""
    with pytest.raises(ValueError, match=r"is under 2\.25, which holds UIDs made from a UUID alone"):
        check_uid_root(root)


def _tracking(sr: Dataset) -> str:
    return uids(sr)["TrackingUID"]


def test_two_images_under_one_constant_uid_study_and_patient_track_two_findings(tmp_path):
    """An anonymiser that writes one constant SOP Instance UID, study and patient on every image:
    the finding on each image was tracked by one UID, so a PACS read two images' findings as one.
    The pixels count too: two images track two findings, and the same image (its header edited,
    as a PACS that sends it again with corrected demographics) keeps its own on every run."""
    same = {"SOPInstanceUID": "1.2.826.0.1.3680043.8.498.77", "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.78",
            "PatientID": "ANON"}
    one, other = source(tmp_path / "a", seed=1, **same), source(tmp_path / "b", seed=2, **same)
    assert _tracking(report(one)) != _tracking(report(other))
    assert _tracking(report(one)) == _tracking(report(one))
    edited = source(tmp_path / "a", seed=1, **same, StudyDescription="XR HAND 3 VIEWS", PatientName="Doe^Jane")
    assert _tracking(report(edited)) == _tracking(report(one))
    assert _tracking(report(other, uid_root=ROOT)) != _tracking(report(one, uid_root=ROOT))


def test_a_source_read_without_its_pixels_is_tracked_as_before(tmp_path):
    """A caller that reads the header only (stop_before_pixels) gets the finding's UID it always had."""
    from pydicom.uid import generate_uid

    ds = source(tmp_path)
    header = dcmread(io.BytesIO(to_bytes(ds)), stop_before_pixels=True)
    keys = [str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.PatientID), ""]
    assert _tracking(report(header)) == generate_uid(entropy_srcs=["fracture finding", "fracture-classifier", *keys])
    assert _tracking(report(ds)) != _tracking(report(header))


def test_one_image_sent_again_in_another_lossless_encoding_keeps_its_finding(tmp_path):
    """A PACS that keeps an image JPEG 2000 or RLE lossless sends it as each transfer negotiates: the
    finding's UID came from the pixel data as stored, so the same pixels, uncompressed one day and RLE
    the next, tracked two findings. It comes from the decoded pixels now."""
    from pydicom.uid import RLELossless

    ds = source(tmp_path)
    again = dcmread(io.BytesIO(to_bytes(ds)))
    again.compress(RLELossless, generate_instance_uid=False)  # as a PACS sends it: the same instance
    assert again.file_meta.TransferSyntaxUID == RLELossless and (again.pixel_array == ds.pixel_array).all()
    assert _tracking(report(again)) == _tracking(report(ds))
    other = source(tmp_path / "b", seed=2, SOPInstanceUID=ds.SOPInstanceUID, StudyInstanceUID=ds.StudyInstanceUID,
                   PatientID=ds.PatientID)
    assert _tracking(report(other)) != _tracking(report(ds))  # other pixels under the same UIDs: another finding
