"""`fracture predict` run again after a batch stopped midway (a crash, a kill, a scheduler's SIGTERM):
the files scored before from the same bytes by the same model are not scored again."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest


class StandIn:
    """The model's Python: every file ``probability``; ``on`` is called with each request's number."""

    def __init__(self, probability: float, on: Callable[[int], None] = lambda n: None) -> None:
        self.probability, self.on = probability, on
        self.scored: list[bytes] = []

    def predict(self, frame, params=None):
        self.on(len(self.scored))
        self.scored += list(frame["image"])
        return pd.DataFrame({"fracture_probability": self.probability, "label": "not_fractured", "note": "a note",
                             "error": ""}, index=range(len(frame)))

    def close(self) -> None:
        pass


@pytest.fixture
def serve(monkeypatch):
    """Makes ``fracture predict``'s model a :class:`StandIn` of the given version and run."""
    import fracture.predict as predict_module
    from fracture.intake import InputPolicy

    def install(model: StandIn, version: str = "1", run_id: str = "run-a") -> StandIn:
        loaded = predict_module.LoadedModel(f"models:/m/{version}", "m", version, model, InputPolicy(), 0.5, run_id)
        monkeypatch.setattr(predict_module, "load", lambda uri: loaded)
        return model

    return install


@pytest.fixture
def folder(tmp_path) -> Path:
    folder = tmp_path / "study"
    folder.mkdir()
    for n in range(6):
        (folder / f"IM{n:04d}").write_bytes(f"image {n}".encode() * 4)
    return folder


def predict(*args: str) -> None:
    from fracture.cli import main

    main(["predict", *args, "--batch-size", "2", "--no-progress"])


def rows(out: Path) -> pd.DataFrame:
    from fracture.predict import read_rows

    return read_rows(out)


def crash_on(request: int) -> Callable[[int], None]:
    def on(scored: int) -> None:
        if scored >= 2 * request:
            raise RuntimeError("the scoring process crashed")
    return on


def test_a_run_that_crashed_midway_scores_only_the_files_it_had_not_scored(folder, tmp_path, serve):
    """A batch of tens of thousands of X-rays that crashed (or was killed) at 80% wrote no row: run
    again, it scored every file again, hours of it. Now the rows are kept as each batch is scored
    (the first run had no --resume), and the second run, with --resume, scores only the rest."""
    out = tmp_path / "rows.csv"
    serve(StandIn(0.25, crash_on(2)))
    with pytest.raises(RuntimeError, match="crashed"):
        predict(str(folder), "--out", str(out))
    assert not out.exists()  # the first run never got to write its rows
    second = serve(StandIn(0.75))
    predict(str(folder), "--out", str(out), "--resume")
    assert second.scored == [(folder / f"IM{n:04d}").read_bytes() for n in (4, 5)]
    table = rows(out)
    assert table["id"].tolist() == [str(folder / f"IM{n:04d}") for n in range(6)]
    assert table["fracture_probability"].tolist() == [0.25] * 4 + [0.75] * 2
    assert (table["error"] == "").all() and (table["note"] == "a note").all() and (table["version"] == "1").all()


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_run_interrupted_midway_scores_only_the_rest_when_run_again(folder, tmp_path, serve, signal_name):
    """A scheduler's time limit (SIGTERM) or Ctrl-C: the rows scored are written, the others saying to
    score them again; run again, only those are scored."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("tests run off the main thread here, where Python takes no signal handler")

    def signalled(scored: int) -> None:
        if scored >= 2:
            os.kill(os.getpid(), signal.Signals[signal_name])
            time.sleep(5)
            raise AssertionError("the signal was not delivered")

    out = tmp_path / "rows.csv"
    serve(StandIn(0.25, signalled))
    with pytest.raises(SystemExit):
        predict(str(folder), "--out", str(out))
    assert rows(out)["error"].str.startswith("not scored: the run was interrupted").tolist() == [False] * 2 + [True] * 4
    second = serve(StandIn(0.75))
    predict(str(folder), "--out", str(out), "--resume")
    assert len(second.scored) == 4
    assert rows(out)["fracture_probability"].tolist() == [0.25] * 2 + [0.75] * 4


def test_changed_files_rows_with_errors_and_another_model_version_are_scored_again(folder, tmp_path, serve):
    """Only a row scored from the same bytes by the same model is taken over: a file that holds other
    bytes now (a PACS router reusing IM0001), one whose row had an error, and every file under another
    version, or another run registered under the same version, are scored again; without --resume, all."""
    out = tmp_path / "rows.json"
    (folder / "IM0005").write_bytes(b"")  # an interrupted transfer: its row has an error
    serve(StandIn(0.25))
    predict(str(folder), "--out", str(out))
    (folder / "IM0001").write_bytes(b"another patient's image")
    (folder / "IM0005").write_bytes(b"the transfer, done again")
    again = serve(StandIn(0.75))
    predict(str(folder), "--out", str(out), "--resume")
    assert again.scored == [b"another patient's image", b"the transfer, done again"]
    assert rows(out)["fracture_probability"].tolist() == [0.25, 0.75, 0.25, 0.25, 0.25, 0.75]

    serve(StandIn(0.5), version="2")
    predict(str(folder), "--out", str(out), "--resume")
    assert rows(out)["fracture_probability"].tolist() == [0.5] * 6 and (rows(out)["version"] == "2").all()
    other_run = serve(StandIn(0.4), version="2", run_id="run-b")
    predict(str(folder), "--out", str(out), "--resume")
    assert len(other_run.scored) == 6
    everything = serve(StandIn(0.3), version="2", run_id="run-b")
    predict(str(folder), "--out", str(out))  # without --resume: every file, as before
    assert len(everything.scored) == 6 and rows(out)["fracture_probability"].tolist() == [0.3] * 6


def test_a_journal_line_cut_short_by_a_kill_costs_that_row_only(folder, tmp_path, serve):
    from fracture.predict import Journal

    out = tmp_path / "rows.csv"
    serve(StandIn(0.25))
    predict(str(folder), "--out", str(out))
    journal = Journal.path_for(out)
    lines = journal.read_bytes().splitlines(keepends=True)
    assert len(lines) == 6
    journal.write_bytes(b"".join(lines[:5]) + lines[5][:20])  # killed while it wrote the last row
    again = serve(StandIn(0.75))
    predict(str(folder), "--out", str(out), "--resume")
    assert again.scored == [(folder / "IM0005").read_bytes()]
    assert rows(out)["fracture_probability"].tolist() == [0.25] * 5 + [0.75]
    assert len(journal.read_bytes().splitlines()) == 6  # the cut line dropped, this run's row kept whole
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_the_rows_file_is_never_left_cut_short(folder, tmp_path, serve, monkeypatch):
    """A run killed while it wrote --out left a file cut short, taken for every row by whoever read
    it. It is written beside and moved into place: the earlier rows stay whole until then."""
    import fracture.predict as predict_module

    out = tmp_path / "rows.csv"
    serve(StandIn(0.25))
    predict(str(folder), "--out", str(out))
    before = out.read_bytes()
    written = predict_module._csv

    def killed_midway(table, handle, compression=None):
        written(table.iloc[:2], handle, compression)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(predict_module, "_csv", killed_midway)
    with pytest.raises(OSError, match="No space"):
        predict_module.write(rows(out), out)
    assert out.read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_two_runs_into_one_output_at_once_do_not_share_the_journal(folder, tmp_path, serve, caplog):
    from filelock import FileLock

    out = tmp_path / "rows.csv"
    serve(StandIn(0.25))
    predict(str(folder), "--out", str(out))
    again = serve(StandIn(0.75))
    with FileLock(str(tmp_path / ".rows.csv.scored.lock")):  # another run's, still going
        predict(str(folder), "--out", str(out), "--resume")
    assert len(again.scored) == 6
    assert "another fracture predict is writing these rows" in caplog.text


def test_a_compressed_output_is_written_compressed_as_its_name_says(folder, tmp_path, serve):
    """``--out rows.csv.gz`` (or .zip, .bz2, .xz) was written as plain text under that name, and the
    run ended 0: the pipeline reading it found out. pandas compresses it as the name says."""
    serve(StandIn(0.25))
    for name in ("rows.csv.gz", "rows.csv.bz2", "rows.csv.zip", "rows.csv.xz"):
        out = tmp_path / name
        predict(str(folder), "--out", str(out))
        table = pd.read_csv(out)  # pandas reads the compression from the name
        assert len(table) == 6 and (table["fracture_probability"] == 0.25).all(), name
    assert (tmp_path / "rows.csv.gz").read_bytes()[:2] == b"\x1f\x8b"


def test_the_journal_is_readable_as_the_rows_are(folder, tmp_path, serve):
    """The journal and its lock stay beside ``--out`` and name every file (often a patient's name);
    they were readable by anyone where the rows themselves were their owner's alone."""
    serve(StandIn(0.25))
    out = tmp_path / "rows.csv"
    out.write_text("")
    out.chmod(0o600)
    predict(str(folder), "--out", str(out))
    beside = [tmp_path / ".rows.csv.scored.jsonl", tmp_path / ".rows.csv.scored.lock"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in [out, *beside]} == {p.name: "0o600" for p in [out, *beside]}
    fresh = tmp_path / "new.csv"
    predict(str(folder), "--out", str(fresh))
    assert oct((tmp_path / ".new.csv.scored.jsonl").stat().st_mode & 0o777) == "0o600"


def test_a_stream_named_as_out_is_written_into_with_no_journal(folder, tmp_path, serve):
    """``--out /dev/stdout``, a FIFO or a shell's ``>(gzip > rows.csv.gz)``: the rows were written beside
    the stream's target and moved into place, which fails on a pipe after the whole batch was scored
    (exit 1), and the journal was put in /dev. A stream is written into, and gets no journal."""
    serve(StandIn(0.25))
    fifo = tmp_path / "rows.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    try:
        predict(str(folder), "--out", str(fifo))
    finally:
        reader.join(timeout=30)
        if reader.is_alive():  # nothing was written into it: let the reader go
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert got and len(pd.read_csv(io.BytesIO(got[0]))) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.fifo", "study"]


def test_the_summary_counts_the_rows_taken_over(folder, tmp_path, serve, capsys):
    """The closing line said "scored 6 of 6 files" where most rows were taken over from the run before."""
    out = tmp_path / "rows.csv"
    serve(StandIn(0.25))
    predict(str(folder), "--out", str(out))
    (folder / "IM0000").write_bytes(b"changed")
    capsys.readouterr()
    predict(str(folder), "--out", str(out), "--resume")
    assert "scored 6 of 6 files (5 of them taken over from an earlier run, --resume)" in capsys.readouterr().err


def test_a_folder_scored_again_with_resume_keeps_the_reports_of_the_rows_it_takes_over(tmp_path, serve):
    """A folder scored day after day into one --out with --resume and --dicom-sr: only the day's new
    file was scored, but every earlier image got a new report superseding the same answer, so the
    whole folder went to the PACS again each day. A row taken over keeps its report, which its note
    names; the new file gets one."""
    from pydicom import dcmread

    from tests.test_sr_format import radiograph

    images, sr, out = tmp_path / "in", tmp_path / "sr", tmp_path / "rows.csv"
    images.mkdir()

    def add(name: str) -> None:  # made beside (with the JPEG it is made from), then put in the folder
        radiograph(tmp_path / "made", name).rename(images / name)

    add("IM0001")
    add("IM02")
    serve(StandIn(0.25))
    predict(str(images), "--out", str(out), "--dicom-sr", str(sr))
    first = {p.name: str(dcmread(p).SOPInstanceUID) for p in sr.glob("*.dcm")}
    assert len(first) == 2
    add("IM003")  # the day's new file
    model = serve(StandIn(0.25))
    predict(str(images), "--out", str(out), "--dicom-sr", str(sr), "--resume")
    assert len(model.scored) == 1
    second = {p.name: str(dcmread(p).SOPInstanceUID) for p in sr.glob("*.dcm")}
    assert len(second) == 3 and all(second[name] == uid for name, uid in first.items()), (first, second)
    table = rows(out)
    taken = table[table["id"].str.endswith(("IM0001", "IM02"))]
    assert taken["note"].str.contains("its report from the earlier run, .* is kept", regex=True).all(), taken["note"]
    assert (table["sr"] != "").all()


def test_resume_into_a_stream_says_it_takes_nothing_over(folder, tmp_path, serve, caplog):
    """A stream as --out keeps no journal, so --resume there took nothing over without a word."""
    serve(StandIn(0.25))
    fifo = tmp_path / "rows.fifo"
    os.mkfifo(fifo)
    reader = threading.Thread(target=fifo.read_bytes, daemon=True)
    reader.start()
    with caplog.at_level("WARNING", logger="fracture.predict"):
        predict(str(folder), "--out", str(fifo), "--resume")
    reader.join(timeout=30)
    assert "is a stream, which keeps none: every file is scored" in caplog.text
