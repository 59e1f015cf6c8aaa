"""The DICOM Structured Reports `fracture predict --dicom-sr` writes, as a PACS, a viewer and a
DICOM validator read them: built from small synthetic radiographs, so they run without FracAtlas."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import pandas as pd
import pytest
from pydicom import dcmread
from pydicom.uid import ComprehensiveSRStorage

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


def report(tmp_path: Path, label: str = "fractured", folder: str = "sr", **values: object) -> Path:
    rows = table(label)
    [written] = write_structured_reports(rows, [radiograph(tmp_path, **values)], tmp_path / folder)
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
