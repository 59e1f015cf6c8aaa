"""The Specific Character Set of the DICOM Structured Reports `fracture predict --dicom-sr` writes:
the default repertoire for ASCII text, the source's where the text fits it, UTF-8 only when needed,
so that older PACS and viewers, which show the default repertoire and Latin-1 but not UTF-8, show
the report. Built from small synthetic radiographs."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from fracture.dicom_sr import structured_report
from tests.dicom_files import dicom_from_jpeg, to_bytes
from tests.synthetic import write_image


def source(tmp_path: Path, **values: object) -> Dataset:
    """A small DX radiograph as a PACS sends it, its header edited with ``values``, read back from its bytes."""
    jpeg = tmp_path / "IM0001.jpg"
    write_image(jpeg, seed=1)
    ds = dcmread(io.BytesIO(dicom_from_jpeg(jpeg, "8-bit")))
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return dcmread(io.BytesIO(to_bytes(ds)))


def written(ds: Dataset, model_name: str = "fracture-classifier") -> tuple[Dataset, bytes]:
    """The report on ``ds`` as a PACS reads it, and its bytes."""
    buffer = io.BytesIO()
    structured_report(ds, 0.7, 0.5, True, model_name, "3").save_as(buffer, enforce_file_format=True)
    return dcmread(io.BytesIO(buffer.getvalue())), buffer.getvalue()


@pytest.mark.parametrize(("declared", "name", "expected"), [
    (None, "Doe^John", None),
    ("ISO_IR 192", "Doe^John", None),
    ("ISO_IR 100", "Doe^John", None),
    ("ISO_IR 100", "Müller^Jürgen", "ISO_IR 100"),
    ("ISO_IR 192", "Müller^Jürgen", "ISO_IR 192"),
    ("ISO_IR 144", "Иванов^Иван", "ISO_IR 144"),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎", "ISO_IR 192"),
], ids=["ascii", "ascii-under-utf8", "ascii-under-latin1", "latin1", "latin-under-utf8", "cyrillic", "japanese-iso2022"])
def test_a_report_is_written_in_the_default_repertoire_or_the_sources_set_and_utf8_only_when_needed(
    tmp_path, declared, name, expected,
):
    """Every report declared UTF-8 (ISO_IR 192), which older PACS and viewers handle worse than the
    default repertoire or Latin-1: a plain ASCII name now declares no set, a Latin-1 or Cyrillic
    source's name is written in the source's set, and a Japanese PACS's ISO 2022 name in UTF-8.
    The name reads back as it was in each."""
    values = {"PatientName": name} | ({"SpecificCharacterSet": declared} if declared else {})
    sr, data = written(source(tmp_path, **values))
    assert sr.get("SpecificCharacterSet") == expected
    assert str(sr.PatientName) == name
    if expected is None:
        assert b"ISO_IR" not in data


def test_a_model_name_latin1_cannot_hold_writes_the_report_in_utf8(tmp_path):
    """The source's set holds the patient's name but not the model's (its own name, in the report's
    content): UTF-8, in which both read back."""
    sr, _ = written(source(tmp_path, PatientName="Müller^Jürgen", SpecificCharacterSet="ISO_IR 100"), "骨折-classifier")
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert str(sr.PatientName) == "Müller^Jürgen" and sr.ManufacturerModelName == "骨折-classifier"
