"""`fracture predict --dicom-sr`'s reports' UIDs, as the command writes them: under the organisation's root
(--sr-uid-root) and findings tracked apart under an anonymiser's constant UIDs."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
from pydicom import dcmread

from fracture.predict import write_structured_reports
from tests.test_sr_format import radiograph, table

ROOT = "1.3.6.1.4.1.55555.7."


def test_reports_are_made_under_the_root_and_two_anonymised_images_track_two_findings(tmp_path):
    same = {"SOPInstanceUID": "1.2.826.0.1.3680043.8.498.77", "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.78",
            "PatientID": "ANON"}
    files = [radiograph(tmp_path, "IM0001", **same), radiograph(tmp_path, "IM02", **same)]
    written = write_structured_reports(table("fractured", "not_fractured"), files, tmp_path / "sr", ROOT)
    reports = [dcmread(Path(p)) for p in written]
    tracking = []
    for sr in reports:
        assert str(sr.SOPInstanceUID).startswith(ROOT) and str(sr.SeriesInstanceUID).startswith(ROOT)
        [group] = hd.sr.ComprehensiveSR.from_dataset(sr).content.get_image_measurement_groups()
        tracking.append(str(group.tracking_uid))
    assert all(uid.startswith(ROOT) for uid in tracking) and tracking[0] != tracking[1]
    again = write_structured_reports(table("fractured", "not_fractured"), files, tmp_path / "sr", ROOT)
    assert [str(hd.sr.ComprehensiveSR.from_dataset(dcmread(p)).content.get_image_measurement_groups()[0].tracking_uid)
            for p in again] == tracking


def test_another_days_image_under_the_same_constant_uids_keeps_the_first_images_report(tmp_path):
    """Under an anonymiser that writes one SOP Instance UID, study and patient on every image, the
    report on another day's image took the first image's report's name, named that report as its
    predecessor, and the first image's report was gone: a PACS read its finding as superseded by a
    report on another image. The finding's Tracking UID (from the pixels) tells the two apart now;
    the same image scored again still replaces its own report."""
    same = {"SOPInstanceUID": "1.2.826.0.1.3680043.8.498.77", "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.78",
            "PatientID": "ANON"}
    first = radiograph(tmp_path / "day1", "IM0001", **same)
    other = radiograph(tmp_path / "day2", "IM02", **same)  # another image: other pixels
    folder = tmp_path / "sr"
    [a] = write_structured_reports(table("fractured"), [first], folder)
    [b] = write_structured_reports(table("not_fractured"), [other], folder)
    assert Path(a).is_file() and Path(b).is_file() and a != b, (a, b)
    assert "PredecessorDocumentsSequence" not in dcmread(b)
    a_uid = str(dcmread(a).SOPInstanceUID)
    [again] = write_structured_reports(table("fractured"), [first], folder)
    assert again == a
    replaced = dcmread(again).PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert str(replaced.ReferencedSOPInstanceUID) == a_uid
    assert sorted(p.name for p in folder.glob("*.dcm")) == sorted({Path(a).name, Path(b).name})
