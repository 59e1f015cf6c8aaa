"""The DICOM Structured Reports `fracture predict --dicom-sr` writes, as a PACS, a viewer and a
DICOM validator read them: built from small synthetic radiographs, so they run without FracAtlas."""

from __future__ import annotations

import datetime
import io
import shutil
import subprocess
import time
import zlib
from pathlib import Path

import highdicom as hd
import pandas as pd
import pytest
from pydicom import dcmread
from pydicom.uid import ComprehensiveSRStorage, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

from fracture import dicom
from fracture.predict import write_structured_reports
from tests.dicom_files import dicom_from_jpeg, to_bytes
from tests.synthetic import write_image

NAME = "fracture-classifier"


def radiograph(tmp_path: Path, name: str = "IM0001", **values: object) -> Path:
    """A small DX radiograph, its header edited with ``values``."""
    jpeg = tmp_path / "jpeg" / f"{name}.jpg"
    write_image(jpeg, seed=len(name))
    ds = dcmread(io.BytesIO(dicom_from_jpeg(jpeg, "8-bit")))
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    path = tmp_path / name
    path.write_bytes(to_bytes(ds))
    return path


def table(*labels: str) -> pd.DataFrame:
    return pd.DataFrame({
        "fracture_probability": [0.7 if label == "fractured" else 0.2 for label in labels], "label": list(labels),
        "threshold": 0.5, "model": NAME, "version": "3", "error": [""] * len(labels), "note": [""] * len(labels),
    })


def report(tmp_path: Path, label: str = "fractured", folder: Path | None = None, **values: object) -> Path:
    """The report written for a radiograph (:func:`radiograph`) into ``folder`` (``tmp_path / "sr"``)."""
    rows = table(label)
    [written] = write_structured_reports(rows, [radiograph(tmp_path, **values)], folder or tmp_path / "sr")
    assert written, rows["note"][0]
    return Path(written)


@pytest.mark.parametrize("label", ["fractured", "not_fractured"])
def test_a_report_is_a_comprehensive_sr_that_highdicom_reads_back_as_a_measurement_report(tmp_path, label):
    """The reports were Comprehensive 3D SR, which many PACS and viewers do not store or show,
    though they hold no 3D coordinates: Comprehensive SR carries all they hold."""
    path = report(tmp_path, label)
    sr = hd.sr.srread(path)
    assert sr.SOPClassUID == ComprehensiveSRStorage == sr.file_meta.MediaStorageSOPClassUID
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    [group] = sr.content.get_image_measurement_groups()
    assert group.finding_type == hd.sr.CodedConcept("125605004", "SCT", "Fracture of bone")
    assert [m.name.meaning for m in group.get_measurements()] == ["Probability", "Threshold Value"]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_a_report_passes_dciodvfy_as_a_comprehensive_sr(tmp_path):
    """dicom3tools' validator checks a file against its SOP Class's IOD: no error, and the IOD it
    checked is Comprehensive SR's."""
    done = subprocess.run(["dciodvfy", str(report(tmp_path))], capture_output=True, text=True, timeout=120, check=False)
    output = done.stdout + done.stderr
    assert "Error" not in output, output
    assert "ComprehensiveSR" in output and "Comprehensive3DSR" not in output, output


def _predecessors(path: Path) -> list[str]:
    return [
        str(sop.ReferencedSOPInstanceUID)
        for study in dcmread(path).get("PredecessorDocumentsSequence", [])
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    ]


HOSPITAL_A, HOSPITAL_B = {"IssuerOfPatientID": "HOSPITAL-A"}, {"IssuerOfPatientID": "HOSPITAL-B"}


@pytest.mark.parametrize(
    ("first", "second", "replaced"),
    [(HOSPITAL_A, HOSPITAL_B, False), (HOSPITAL_A, HOSPITAL_A, True), (HOSPITAL_A, {}, True)],
    ids=["two-issuers", "one-issuer", "issuer-on-one-side-only"],
)
def test_an_earlier_report_on_another_issuers_patient_under_one_id_is_kept_not_replaced(
    tmp_path, first, second, replaced,
):
    """Two hospitals' archives merged: one Patient ID that each hospital gave its own patient, under
    an anonymiser's constant study and image UIDs. The earlier report on the other hospital's
    patient was taken for this image's, replaced and named as its predecessor; only the Issuer of
    Patient ID tells the two apart. Where one side names no issuer, the Patient ID decides alone."""
    same = {"SOPInstanceUID": "1.2.826.0.1.3680043.8.498.77", "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.78",
            "PatientID": "12345"}
    folder = tmp_path / "sr"
    earlier = report(tmp_path / "day1", folder=folder, **same, **first)
    kept = earlier.read_bytes()
    rows = table("fractured")
    [written] = write_structured_reports(rows, [radiograph(tmp_path / "day2", **same, **second)], folder)
    if replaced:
        assert Path(written) == earlier and _predecessors(earlier) == [dcmread(io.BytesIO(kept)).SOPInstanceUID]
    else:
        assert Path(written) != earlier and _predecessors(Path(written)) == []
        assert earlier.read_bytes() == kept  # the other hospital's patient's report, untouched
        assert rows["note"][0] == (f"an earlier report on another image (its source, study or patient differs) is "
                                   f"{earlier.name} in {folder}: kept, and this one written as {Path(written).name}")


@pytest.mark.parametrize(("first", "second", "one_report"),
                         [(HOSPITAL_A, {}, True), (HOSPITAL_A, HOSPITAL_A, True), (HOSPITAL_A, HOSPITAL_B, False)],
                         ids=["issuer-on-one-side-only", "one-issuer", "two-issuers"])
def test_two_copies_of_one_image_in_one_call_are_matched_on_the_patient_as_across_calls(tmp_path, first, second,
                                                                                        one_report):
    """One image twice in one call, once with its issuer and once without, got two reports, the second
    named after its bytes, where across two calls it is one patient's image and one report."""
    same = {"SOPInstanceUID": "1.2.826.0.1.3680043.8.498.77", "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.78",
            "PatientID": "12345"}
    rows = table("fractured", "fractured")
    written = write_structured_reports(rows, [radiograph(tmp_path / "a", **same, **first),
                                              radiograph(tmp_path / "b", **same, **second)], tmp_path / "sr")
    assert (written[0] == written[1]) is one_report
    assert len(list((tmp_path / "sr").glob("*.dcm"))) == (1 if one_report else 2)


@pytest.fixture
def new_york(monkeypatch):
    """This machine's local time is New York's (UTC-5 or -4), not UTC, as a hospital's batch server's may be."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def _dated(sr, what: str) -> datetime.datetime:
    """A report's ``what`` date and time (Series, Content, InstanceCreation) in its zone (Timezone Offset From UTC)."""
    zone = datetime.datetime.strptime(sr.TimezoneOffsetFromUTC, "%z").tzinfo
    return datetime.datetime.combine(DA(sr[f"{what}Date"].value), TM(sr[f"{what}Time"].value), zone)


@pytest.mark.parametrize(("offset", "zone", "note"), [
    (None, "local", ""), ("+0900", "+0900", ""), ("-0330", "-0330", ""),
    ("+2500", "local", "TimezoneOffsetFromUTC '+2500' is not a valid offset: the structured report's dates and times "
                       "are in this machine's zone ({local})"),
], ids=["none", "tokyo", "newfoundland", "not-an-offset"])
def test_a_reports_dates_and_times_say_their_zone_the_sources_when_it_names_one(tmp_path, new_york, offset, zone, note):
    """The report's Series, Content and Instance Creation Date and Time were written without a zone
    (this machine's local time, unsaid), beside the study's copied from the source in its own. The
    report names its Timezone Offset From UTC, which covers them all: the source's, its own times
    given in it, or, where the source names none or one that is no offset, this machine's."""
    local = datetime.datetime.now().astimezone().strftime("%z")
    assert local in ("-0500", "-0400")
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    rows = table("fractured")
    values = {"StudyDate": "20261207", "StudyTime": "091500"} | ({"TimezoneOffsetFromUTC": offset} if offset else {})
    [written] = write_structured_reports(rows, [radiograph(tmp_path, **values)], tmp_path / "sr")
    after = datetime.datetime.now(datetime.timezone.utc)
    sr = dcmread(written)
    assert sr.TimezoneOffsetFromUTC == (local if zone == "local" else zone)
    for what in ("Series", "Content", "InstanceCreation"):
        assert before <= _dated(sr, what) <= after, what
    assert _dated(sr, "Series") <= _dated(sr, "Content")
    assert (sr.StudyDate, sr.StudyTime) == ("20261207", "091500")  # the source's, in its zone, which the report's is
    assert rows["note"][0] == note.format(local=local)


def test_a_summer_study_without_a_zone_keeps_this_machine_s_summer_offset_and_minus_zero_is_no_offset(tmp_path, new_york):
    """Without the source's offset, the report took this machine's offset now: a July study scored in
    December was said to be at -0500, an hour off. -0000 (no offset known) was read as UTC."""
    rows = table("fractured")
    [summer] = write_structured_reports(rows, [radiograph(tmp_path, StudyDate="20260715", StudyTime="101500")],
                                        tmp_path / "summer")
    assert dcmread(summer).TimezoneOffsetFromUTC == "-0400"  # EDT on 15 July, whenever it is scored
    rows = table("fractured")
    [unknown] = write_structured_reports(
        rows, [radiograph(tmp_path, StudyDate="20260115", StudyTime="101500", TimezoneOffsetFromUTC="-0000")],
        tmp_path / "unknown",
    )
    assert dcmread(unknown).TimezoneOffsetFromUTC == "-0500"  # EST on 15 January: this machine's, not UTC
    assert rows["note"][0] == ("TimezoneOffsetFromUTC '-0000' is not a valid offset: the structured report's dates and "
                               "times are in this machine's zone (-0500)")


def _deflated(path: Path, padding: int = 0) -> None:
    """Rewrites a report deflated (Deflated Explicit VR Little Endian), with ``padding`` zero bytes
    in a private element: a few kilobytes on disk that inflate to that many."""
    ds = dcmread(path)
    if padding:
        ds.private_block(0x0009, "FRACTURE TEST", create=True).add_new(0x10, "OB", bytes(padding))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("padding", [0, 24_000_000], ids=["whole", "inflating-past-the-bound"])
def test_an_earlier_deflated_report_is_inflated_within_the_bound_of_every_dicom_input(tmp_path, monkeypatch, padding):
    """An earlier report in the report folder was read with pydicom's own inflate, whole and without
    a bound, where every DICOM input is inflated within one (fracture.dicom.max_inflated): a small
    deflated file planted there inflated to gigabytes. One that inflates within it is read and
    replaced as any report; one past it is kept aside as damaged, its row's note saying why."""
    monkeypatch.setattr(dicom, "MAX_PIXELS", 1_000_000)  # a bound of 20 MB, which the padding passes

    def unbounded(*args, **kwargs):
        raise AssertionError("inflated whole, without a bound")

    earlier = report(tmp_path)
    _deflated(earlier, padding)
    assert earlier.stat().st_size < 100_000
    kept, uid = earlier.read_bytes(), dcmread(earlier).SOPInstanceUID
    monkeypatch.setattr(zlib, "decompress", unbounded)
    rows = table("fractured")
    [written] = write_structured_reports(rows, [tmp_path / "IM0001"], earlier.parent)
    assert Path(written) == earlier
    if not padding:
        monkeypatch.undo()
        assert _predecessors(earlier) == [uid] and rows["note"][0] == ""
        return
    monkeypatch.undo()
    aside = earlier.with_name(f"{earlier.name}.damaged")
    assert aside.read_bytes() == kept and _predecessors(earlier) == []
    assert rows["note"][0] == (
        f"the earlier report {earlier.name} in {earlier.parent} is damaged (it is deflated (transfer syntax "
        f"{DeflatedExplicitVRLittleEndian}) and inflates to more than 20 MB, more than a radiograph of 1 megapixels "
        f"holds: a decompression bomb, or a dataset carrying far more than its image): kept as {aside.name}, and this "
        "one written in its place, not naming it as its predecessor, as what is left of it does not show it is on "
        "this image"
    )
