"""A deflated earlier report in `fracture predict --dicom-sr`'s folder is read within a bound, however
large the file: it is neither read whole into memory nor inflated past the bound."""

from __future__ import annotations

import io
import os
import tracemalloc

from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    ComprehensiveSRStorage,
    DeflatedExplicitVRLittleEndian,
    generate_uid,
)


def _deflated_header() -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue()


def test_a_large_deflated_earlier_report_is_judged_without_being_read_whole(tmp_path, monkeypatch):
    """A deflated file of 400 MB at a report's name (a planted file, a disk image copied into the
    folder): predict read all of it into memory before its bounded inflate refused it. It is
    refused now from its size, with no more than a little of it in memory, and set aside as damaged."""
    from fracture.predict import _earlier_report

    monkeypatch.setattr("fracture.dicom.MAX_PIXELS", 1_000_000)  # a 20 MB bound, so the test's file may be small
    path = tmp_path / "1.2.3.sr.dcm"
    path.write_bytes(_deflated_header())
    os.truncate(path, 400 * 2**20)  # sparse: no disk taken
    tracemalloc.start()
    try:
        report, why = _earlier_report(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, peak
    assert report is None
    assert why.startswith("it is deflated (transfer syntax 1.2.840.10008.1.2.1.99) and holds more than 21 MB, so it "
                          "inflates to more than the 20 MB a deflated dataset is read within"), why


def test_a_deflated_earlier_report_within_the_bound_is_read(tmp_path, monkeypatch):
    from pydicom import dcmread
    from pydicom.dataset import Dataset

    from fracture.predict import _earlier_report

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ComprehensiveSRStorage, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = generate_uid(), generate_uid(), "P1"
    path = tmp_path / "report.sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert dcmread(path).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    report, why = _earlier_report(path)
    assert report is not None and report.PatientID == "P1"
    assert why == "it has no CurrentRequestedProcedureEvidenceSequence, ContentSequence"
