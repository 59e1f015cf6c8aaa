"""`fracture predict`: a folder of X-rays and DICOM files scored by the registered champion, row by row,
with DICOM Structured Reports written beside; run as a consumer runs it (the console script)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image
from pydicom import dcmread
from pydicom.uid import ComprehensiveSRStorage, generate_uid

from fracture import __version__
from fracture.config import RegisterParams
from fracture.gate import EvaluatedSplit
from fracture.predict import (
    MODEL_RUN_ID,
    REPORT_LOCK,
    SCORED_SHA256,
    PredictError,
    collect,
    write,
    write_structured_reports,
)
from fracture.registry import register
from tests.conftest import require_fracatlas, untrained_model_files
from tests.dicom_files import dicom_from_jpeg, dicomdir, encapsulated_pdf, multiframe

pytestmark = pytest.mark.integration

NAME = "fracture-classifier"
THRESHOLD = 0.3


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> dict:
    """A sqlite registry whose champion is a real Lite0 (64 px, untrained head)."""
    tmp = tmp_path_factory.mktemp("predict")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    check = require_fracatlas() / "images/Fractured/IMG0000019.jpg"
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("t", artifact_location=(tmp / "art").as_uri()))
        weights, config = untrained_model_files(tmp, THRESHOLD)
        with mlflow.start_run() as run:
            mlflow.log_metrics({"test_roc_auc": 0.9})
        # Registered in this process: the gate's consumer Python is tested in test_registry; here it only serves.
        reg = register(RegisterParams(NAME, "t"), run.info.run_id, weights, config, EvaluatedSplit("s" * 64, 1, check),
                       MlflowClient(uri), isolated=False)
        assert reg.champion
    finally:
        mlflow.set_tracking_uri(None)
    return {"uri": uri, "tmp": tmp}


def run_predict(registry: dict, *args: str) -> subprocess.CompletedProcess:
    env = {"MLFLOW_TRACKING_URI": registry["uri"], "PATH": str(Path(sys.executable).parent)}
    cmd = [str(Path(sys.executable).parent / "fracture"), "predict", "--no-progress", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def study(registry) -> Path:
    """A folder as a hospital export looks: JPEGs, DICOM files without an ending, and some bad files."""
    images = require_fracatlas() / "images"
    folder = registry["tmp"] / "study"
    (folder / "series1").mkdir(parents=True)
    good = [images / "Fractured/IMG0000019.jpg", images / "Non_fractured/IMG0000009.jpg"]
    for p in good:
        (folder / p.name).write_bytes(p.read_bytes())
    data = good[0].read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    (folder / "notes.jpg").write_text("not an image\n" * 30)
    (folder / "series1" / "IM0001").write_bytes(dicom_from_jpeg(good[0], "MONOCHROME1 VOI LUT"))
    (folder / "series1" / "IM0002").write_bytes(dicom_from_jpeg(good[1], "12-bit rescaled"))
    (folder / "series1" / "IM0003").write_bytes(multiframe(good[1]))
    (folder / "series1" / "IM0004.dcm").write_bytes(dicom_from_jpeg(good[0], "8-bit", modality="CT"))
    # Named after its SOP Instance UID, as PACS exports name files: its "ending" is .320.
    (folder / "series1" / UID_NAMED).write_bytes(dicom_from_jpeg(good[1], "8-bit"))
    no_study = dcmread(io.BytesIO(dicom_from_jpeg(good[0], "8-bit")))
    del no_study.StudyInstanceUID
    buffer = io.BytesIO()
    no_study.save_as(buffer)
    (folder / "series1" / "IM0005").write_bytes(buffer.getvalue())
    (folder / "series1" / "report.dcm").write_bytes(encapsulated_pdf())
    (folder / ".cache").mkdir()
    (folder / ".cache" / "thumb.png").write_bytes(b"skipped: inside a hidden folder")
    # Files the model cannot read are rows too, each with its reason.
    (folder / "series1" / "DICOMDIR").write_bytes(dicomdir())
    (folder / "series1" / "IM0006").write_bytes(b"")  # an interrupted transfer
    Image.open(good[0]).save(folder / "scan.tif")
    return folder


UID_NAMED = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"


def content_items(ds) -> list:
    """Every content item of an SR, depth first."""
    items = []
    for item in ds.get("ContentSequence", []):
        items.append(item)
        items.extend(content_items(item))
    return items


def named(items: list, meaning: str) -> list:
    return [i for i in items if "ConceptNameCodeSequence" in i and i.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def test_a_study_folder_is_scored_row_by_row_with_structured_reports(registry, study, tmp_path):
    out, reports = tmp_path / "rows.csv", tmp_path / "sr"
    proc = run_predict(registry, str(study), "--out", str(out), "--dicom-sr", str(reports), "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{NAME} version 1: scored 7 of 14 files; 7 with an error in their row" in proc.stderr
    rows = pd.read_csv(out, keep_default_na=False).set_index("id")
    rows.index = [Path(i).relative_to(study).as_posix() for i in rows.index]
    assert list(rows.columns) == ["fracture_probability", "label", "threshold", "model", "version", "error", "note", "sr"]
    assert (rows["model"] == NAME).all() and (rows["version"] == 1).all() and (rows["threshold"] == THRESHOLD).all()

    errors = rows["error"].to_dict()
    assert errors["notes.jpg"].startswith("the image is not an image file that can be read")
    assert errors["series1/IM0003"].startswith("the image is DICOM but holds 2 frames")
    assert errors["series1/IM0004.dcm"].startswith("the image is DICOM but has modality CT")
    assert errors["series1/report.dcm"].startswith("the image is DICOM but is an encapsulated PDF")
    assert errors["series1/DICOMDIR"].startswith("the image is DICOM but is a DICOMDIR")
    assert errors["series1/IM0006"] == "the image is empty (the file holds no bytes)"
    assert errors["scan.tif"].startswith("the image is a TIFF file, not JPEG, PNG or DICOM")
    assert not any(i.startswith(".cache") for i in rows.index)  # hidden folders are not the export's
    scored = rows[rows["error"] == ""]
    assert sorted(scored.index) == [
        "IMG0000009.jpg", "IMG0000019.jpg", "cut.jpg", f"series1/{UID_NAMED}", "series1/IM0001", "series1/IM0002",
        "series1/IM0005",
    ]
    assert "the file ends early" in rows.loc["cut.jpg", "note"]
    # Each DICOM file scores as the JPEG it was made from (MONOCHROME1 is not scored as a negative).
    p = scored["fracture_probability"].astype(float)
    assert p["series1/IM0001"] == pytest.approx(p["IMG0000019.jpg"], abs=1e-6)
    assert p["series1/IM0002"] == pytest.approx(p["IMG0000009.jpg"], abs=1e-6)

    # One SR per scored DICOM input, none for the rest; one whose header lacks its study's UID
    # is scored, and its row says why it has no report.
    written = {k: v for k, v in rows["sr"].items() if v}
    assert sorted(written) == [f"series1/{UID_NAMED}", "series1/IM0001", "series1/IM0002"]
    assert "no structured report:" in rows.loc["series1/IM0005", "note"]
    assert "StudyInstanceUID" in rows.loc["series1/IM0005", "note"]
    for key, path in written.items():
        source = dcmread(study / key, stop_before_pixels=True)
        sr = dcmread(path)
        assert sr.SOPClassUID == ComprehensiveSRStorage and Path(path).name == f"{source.SOPInstanceUID}.sr.dcm"
        assert (sr.PatientID, sr.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
        assert sr.SeriesDescription.startswith("NOT FOR CLINICAL USE") and sr.VerificationFlag == "UNVERIFIED"
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
        assert evidence.StudyInstanceUID == source.StudyInstanceUID
        ref = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (source.SOPClassUID, source.SOPInstanceUID)
        items = content_items(sr)
        image_ref = named(items, "Source of Measurement")[0].ReferencedSOPSequence[0]
        assert image_ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        finding = named(items, "Fracture of bone")[0].ConceptCodeSequence[0].CodeMeaning
        assert finding == ("Present" if rows.loc[key, "label"] == "fractured" else "Absent")
        probability = float(named(items, "Probability")[0].MeasuredValueSequence[0].NumericValue)
        assert probability == pytest.approx(float(rows.loc[key, "fracture_probability"]), abs=1e-6)
        threshold = float(named(items, "Threshold Value")[0].MeasuredValueSequence[0].NumericValue)
        assert threshold == pytest.approx(THRESHOLD)
        assert {str(i.TextValue) for i in named(items, "Algorithm Name")} == {NAME}
        assert {str(i.TextValue) for i in named(items, "Algorithm Version")} == {"1"}


def test_json_output_and_a_single_file(registry, tmp_path):
    image = require_fracatlas() / "images/Fractured/IMG0000019.jpg"
    out = tmp_path / "rows.json"
    proc = run_predict(registry, str(image), "--out", str(out), "--model", f"models:/{NAME}/1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["id"] == str(image) and rows[0]["error"] == ""
    assert rows[0]["label"] == ("fractured" if rows[0]["fracture_probability"] >= THRESHOLD else "not_fractured")


def test_exits_non_zero_only_when_nothing_could_be_scored(registry, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    buf = io.BytesIO()
    Image.new("L", (500, 500)).save(buf, format="PNG")
    (folder / "b.png").write_bytes(buf.getvalue())
    proc = run_predict(registry, str(folder))
    assert proc.returncode != 0 and "no file could be scored" in proc.stderr
    rows = pd.read_csv(io.StringIO(proc.stdout), keep_default_na=False)
    assert rows["error"].str.startswith("the image is empty").sum() == 1
    assert rows["error"].str.startswith("the image is blank or nearly constant").sum() == 1


def test_strict_exits_3_when_some_file_could_not_be_scored_and_writes_every_row(registry, tmp_path):
    """A scheduler alerts on the exit status: by default a folder with one file unread still exits 0."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    shutil.copy(require_fracatlas() / "images/Fractured/IMG0000019.jpg", folder / "b.jpg")
    lenient = run_predict(registry, str(folder))
    assert lenient.returncode == 0, lenient.stderr[-3000:]
    out = tmp_path / "rows.csv"
    strict = run_predict(registry, str(folder), "--strict", "--out", str(out))
    assert strict.returncode == 3, strict.stderr[-3000:]
    assert "1 of 2 files could not be scored (--strict)" in strict.stderr
    rows = pd.read_csv(out, keep_default_na=False)
    assert rows["error"].str.startswith("the image is empty").sum() == 1 and (rows["error"] == "").sum() == 1
    # Every file scored: --strict exits 0.
    assert run_predict(registry, str(folder / "b.jpg"), "--strict").returncode == 0
    # Scored, but the report asked for could not be made (its header lacks the study's UID): exit 3 too.
    no_study = dcmread(io.BytesIO(dicom_from_jpeg(folder / "b.jpg", "8-bit")))
    del no_study.StudyInstanceUID
    no_study.save_as(folder / "IM0001")
    (folder / "a.png").unlink()
    (folder / "b.jpg").unlink()
    reported = run_predict(registry, str(folder), "--strict", "--dicom-sr", str(tmp_path / "sr"))
    assert reported.returncode == 3, reported.stderr[-3000:]
    assert "fracture predict: 1 of the files scored have no structured report (--strict)" in reported.stderr


def test_a_report_folder_that_fails_whole_notes_and_counts_only_the_rows_that_wanted_a_report(tmp_path, monkeypatch, capsys):
    """The folder gone or unwritable after the check: the note and --strict's count went to every
    row, JPEGs and files not scored among them, which misled whoever triaged the alert."""
    from fracture import cli, predict

    files = [tmp_path / n for n in ("a.dcm", "b.jpg", "c.jpg", "d.dcm")]
    data = dicom_from_jpeg(require_fracatlas() / "images/Fractured/IMG0000019.jpg", "8-bit")
    for f in files:
        f.write_bytes(data if f.suffix == ".dcm" else b"\xff\xd8 a JPEG")
    (tmp_path / "sr").mkdir()

    class Loaded:
        name, version = "fracture-classifier", "1"

        def close(self) -> None:
            pass

    def scored(loaded, paths, batch_size, progress, **journal):
        return pd.DataFrame({
            "id": [str(f) for f in paths], "fracture_probability": [0.9, 0.1, float("nan"), 0.8],
            "label": ["Fractured", "Not fractured", "", "Fractured"], "threshold": 0.5, "model": "m",
            "version": "1", "error": ["", "", "the image is corrupt", ""], "note": "",
        })

    def folder_gone(table, paths, folder, uid_root=None):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(predict, "load", lambda uri: Loaded())
    monkeypatch.setattr(predict, "score_files", scored)
    monkeypatch.setattr(predict, "write_structured_reports", folder_gone)
    out = tmp_path / "rows.csv"
    with pytest.raises(SystemExit) as ended:
        cli.main(["predict", *map(str, files), "--dicom-sr", str(tmp_path / "sr"), "--strict", "--no-progress",
                  "--out", str(out)])
    assert ended.value.code == 3
    assert "1 of 4 files could not be scored and 2 of the files scored have no structured report" in capsys.readouterr().err
    notes = pd.read_csv(out, keep_default_na=False)["note"].tolist()
    assert [n.startswith("no structured report: ") for n in notes] == [True, False, False, True]


def test_a_model_the_registry_lacks_is_named(registry, tmp_path):
    image = require_fracatlas() / "images/Fractured/IMG0000019.jpg"
    proc = run_predict(registry, str(image), "--model", f"models:/{NAME}@staging")
    assert proc.returncode != 0 and f"models:/{NAME}@staging is not in the registry" in proc.stderr
    proc = run_predict(registry, str(image), "--model", "runs:/abc/model")
    assert proc.returncode != 0 and "is not a registry URI" in proc.stderr


def test_a_registry_that_is_missing_or_down_is_told_apart_from_a_missing_model(registry, tmp_path):
    """Run where no MLflow store is (no MLFLOW_TRACKING_URI, in the folder of images): MLflow made an
    empty mlflow.db there, which a later run scored as an input, and found no model in it. Against a
    tracking server that is down it waited about 4 minutes (MLflow's 7 retries), then said the model
    was not in the registry, which it never reached."""
    from tests.servers import free_port

    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(require_fracatlas() / "images/Fractured/IMG0000019.jpg", folder)
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path / "home")}
    cmd = [str(Path(sys.executable).parent / "fracture"), "predict", "--no-progress", "."]
    proc = subprocess.run(cmd, env=env, cwd=folder, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode != 0 and f"fracture predict: no MLflow store at {folder / 'mlflow.db'}: set MLFLOW_TRACKING_URI" in proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["IMG0000019.jpg"]
    # A registry of its own that names no store: the variable to set is that one.
    missing = tmp_path / "registry" / "mlflow.db"
    proc = subprocess.run(cmd, env=env | {"MLFLOW_REGISTRY_URI": f"sqlite:///{missing}"}, cwd=folder,
                          capture_output=True, text=True, timeout=600, check=False)
    assert f"fracture predict: no MLflow store at {missing}: set MLFLOW_REGISTRY_URI" in proc.stderr, proc.stderr[-2000:]
    down = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env | {"MLFLOW_TRACKING_URI": down}, cwd=folder, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode != 0 and f"fracture predict: the registry at {down} cannot be reached or read (" in proc.stderr
    assert "check that it is up and that MLFLOW_TRACKING_URI names it" in proc.stderr
    assert time.monotonic() - started < 120  # 2 retries, not MLflow's 7 (about 4 minutes): not a speed claim
    # A registry of its own (MLFLOW_REGISTRY_URI), with no tracking store here: it is the registry read.
    proc = subprocess.run([*cmd, "--model", f"models:/{NAME}@champion"], env=env | {"MLFLOW_REGISTRY_URI": registry["uri"]},
                          cwd=folder, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{NAME} version 1: scored 1 of 1 files" in proc.stderr


def test_a_store_uri_is_read_as_mlflow_reads_it_and_a_file_that_is_no_store_is_named(registry, tmp_path, monkeypatch):
    """A sqlite URI with a query or %20 escapes, which MLflow opens, was refused as naming no store;
    an mlflow.db that is a Git LFS pointer ended predict in SQLAlchemy's traceback."""
    from fracture.predict import PredictError, load
    from fracture.tracking import sqlite_store

    store = sqlite_store(registry["uri"])
    assert store is not None and store.is_file()
    spaced = tmp_path / "a b"
    spaced.mkdir()
    shutil.copy(store, spaced / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    for uri in (f"{registry['uri']}?timeout=60", f"sqlite:///{tmp_path}/a%20b/mlflow.db"):
        assert sqlite_store(uri) in (store, spaced / "mlflow.db")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(PredictError, match="is not in the registry at"):  # the store read, the model not in it
            load(f"models:/{NAME}@no-such-alias")
    # SQLite's own URI form (file:...?uri=true): MLflow made the folders of what follows sqlite:///
    # (file:/tmp/...) in the working folder, so it is refused, naming the form to give.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///file:{store}?mode=ro&uri=true")
    with pytest.raises(PredictError, match=r"^MLFLOW_TRACKING_URI: .* is SQLite's file: URI form, ") as refused:
        load(f"models:/{NAME}@no-such-alias")
    assert str(refused.value).endswith(f": give the file's path instead, sqlite:///{store}")
    assert not any(path.name.startswith("file:") for path in tmp_path.iterdir())
    assert sqlite_store("sqlite://") is None and sqlite_store("http://127.0.0.1:5000") is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:mlflow.db")  # no slashes: SQLAlchemy's ArgumentError escaped
    with pytest.raises(PredictError, match=r"^MLFLOW_TRACKING_URI: sqlite:mlflow\.db is no sqlite store URI: give "
                                           r"sqlite:///<path to mlflow\.db>$"):
        load(f"models:/{NAME}@champion")
    pointer = tmp_path / "lfs" / "mlflow.db"
    pointer.parent.mkdir()
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 1234567\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{pointer}")
    with pytest.raises(PredictError, match=r"cannot be reached or read \(DatabaseError: .*file is not a database\): "
                                           r"check that it is up, .* and that it is an MLflow store"):
        load(f"models:/{NAME}@champion")

    class Dropped:  # a proxy that drops the connection: an error without a message
        def get_model_version_by_alias(self, *_):
            raise ConnectionResetError

    with pytest.raises(PredictError, match=r"cannot be reached or read \(ConnectionResetError: \(no message\)\)"):
        load(f"models:/{NAME}@champion", client=Dropped())
    # A registry of its own: the variable named is the one that names it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", registry["uri"])
    with pytest.raises(PredictError, match="is not in the registry at .*Set MLFLOW_REGISTRY_URI to the registry"):
        load(f"models:/{NAME}@no-such-alias")


def test_a_version_logged_before_input_checks_is_refused_naming_its_release(registry, monkeypatch):
    """Its model has its threshold but no input policy (up to 2026-11-30): predict ended in an
    AttributeError from the consumer's Python, and then said it was no fracture classifier."""
    from fracture import predict as predict_module

    closed = []

    class Old:  # the header such a version's consumer Python sends
        kind, code, threshold, policy = "FracturePyfunc", "/models/v1/code/fracture/__init__.py", 0.5, None

        def __init__(self, uri):
            self.uri = uri

        def close(self):
            closed.append(self.uri)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    monkeypatch.setattr(predict_module, "ConsumerModel", Old)
    with pytest.raises(predict_module.PredictError, match=r"\(version 1\) was logged by a release of up to "
                                                         r"2026-11-30: its model carries no input checks"):
        predict_module.load(f"models:/{NAME}@champion")
    assert closed == [f"models:/{NAME}/1"]


def test_batches_are_cut_to_the_rows_the_model_takes_in_one_request(registry, monkeypatch):
    """A --batch-size above the model's serve.max_rows would be refused whole; each request holds
    at most max_rows files instead."""
    from fracture.predict import load, score_files

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    loaded = load(f"models:/{NAME}@champion")
    try:
        assert loaded.policy.max_rows == 64 and loaded.threshold == pytest.approx(THRESHOLD)
        loaded = dataclasses.replace(loaded, policy=dataclasses.replace(loaded.policy, max_rows=2))
        requests: list[int] = []
        predict = loaded.model.predict
        monkeypatch.setattr(
            loaded.model, "predict", lambda frame, params=None: requests.append(len(frame)) or predict(frame, params=params)
        )
        image = require_fracatlas() / "images/Fractured/IMG0000019.jpg"
        table = score_files(loaded, [image] * 5, batch_size=16, progress=False)
    finally:
        loaded.close()
    assert requests == [2, 2, 1]
    assert (table["error"] == "").all() and table["fracture_probability"].notna().all()
    # What each row was scored from, for its structured report (write_structured_reports).
    assert table.attrs[SCORED_SHA256] == [hashlib.sha256(image.read_bytes()).hexdigest()] * 5
    # ... and the run that trained the version's weights, which the reports name.
    assert table.attrs[MODEL_RUN_ID] == MlflowClient(registry["uri"]).get_model_version(NAME, "1").run_id != ""


def _study_served_until_its_second_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, second: Callable[[], None]) -> Path:
    """A study folder of five files, and ``fracture predict``'s model a stand-in for the model's
    Python that answers its first request (every file 0.25) and calls ``second`` on the next."""
    import fracture.predict as predict_module
    from fracture.intake import InputPolicy

    class StandIn:
        def __init__(self) -> None:
            self.requests = 0

        def predict(self, frame, params=None):
            self.requests += 1
            if self.requests == 2:
                second()
            return pd.DataFrame({"fracture_probability": 0.25, "label": "not_fractured", "note": "", "error": ""},
                                index=range(len(frame)))

        def close(self) -> None:
            pass

    folder = tmp_path / "study"
    folder.mkdir()
    for n in range(5):
        (folder / f"IM{n:04d}").write_bytes(b"x" * 10)
    loaded = predict_module.LoadedModel("models:/m/1", "m", "1", StandIn(), InputPolicy(), 0.5)
    monkeypatch.setattr(predict_module, "load", lambda uri: loaded)
    return folder


def test_a_model_python_that_ends_midway_keeps_the_rows_scored_and_names_the_rest(tmp_path, monkeypatch, capsys):
    """The model's Python killed on the second batch (the system's out-of-memory killer, say): the
    run stopped with that Python's last log line and wrote no row, losing every file scored before.
    Now the rows scored are written, the others say to score them again, and the run fails saying so."""
    from fracture.cli import main
    from fracture.consumer import ConsumerError

    def killed() -> None:
        raise ConsumerError("models:/m/1 failed in a consumer's Python: killed by signal SIGKILL")

    folder = _study_served_until_its_second_request(tmp_path, monkeypatch, killed)
    (folder / "IM0002e").write_bytes(b"")  # in the batch that ended, not read: keeps its own reason
    out = tmp_path / "rows.csv"
    with pytest.raises(SystemExit, match=r"the model's Python ended after 2 of 6 files were scored \(.*killed by "
                                         r"signal SIGKILL\); the rows scored are written, and the others say to score"):
        main(["predict", str(folder), "--out", str(out), "--batch-size", "2", "--no-progress"])
    rows = pd.read_csv(out, keep_default_na=False)
    names = ["IM0000", "IM0001", "IM0002", "IM0002e", "IM0003", "IM0004"]
    assert rows["id"].tolist() == [str(folder / name) for name in names]
    assert rows["error"][:2].tolist() == ["", ""] and rows["fracture_probability"][:2].tolist() == ["0.25", "0.25"]
    ended = rows["error"].str.startswith("not scored: the model's Python ended before this file's answer (")
    assert ended.tolist() == [False, False, True, False, True, True]
    assert rows["error"][ended].str.endswith("score the file again").all()
    assert rows["error"][3] == "the image is empty (the file holds no bytes)"
    assert "scored 2 of 6 files" in capsys.readouterr().err


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_an_interrupted_run_keeps_the_rows_scored_and_names_the_rest(tmp_path, monkeypatch, capsys, signal_name):
    """Ctrl-C (SIGINT), or a batch scheduler's time limit (SIGTERM), midway through a folder: the
    run ended with a traceback, or silently, and wrote no row, losing every file scored before.
    Now the rows scored are written, the others say the run was interrupted and to score them
    again, and the run exits as a shell reports a command that signal ended (128 + its number)."""
    import signal

    from fracture.cli import main

    if threading.current_thread() is not threading.main_thread():  # a signal handler needs the main thread
        pytest.skip("tests run off the main thread here, where Python takes no signal handler")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def signalled() -> None:
        os.kill(os.getpid(), signal.Signals[signal_name])
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("the signal was not delivered")

    folder = _study_served_until_its_second_request(tmp_path, monkeypatch, signalled)
    out = tmp_path / "rows.csv"
    with pytest.raises(SystemExit) as ended:
        main(["predict", str(folder), "--out", str(out), "--batch-size", "2", "--no-progress"])
    assert ended.value.code == 128 + signal.Signals[signal_name].value
    rows = pd.read_csv(out, keep_default_na=False)
    assert rows["id"].tolist() == [str(folder / f"IM{n:04d}") for n in range(5)]
    assert rows["error"][:2].tolist() == ["", ""] and rows["fracture_probability"][:2].tolist() == ["0.25", "0.25"]
    assert rows["fracture_probability"][2:].tolist() == [""] * 3
    assert rows["error"][2:].str.fullmatch(
        rf"not scored: the run was interrupted \({signal_name}.*\) before this file's answer; score the file again"
    ).all()
    err = capsys.readouterr().err
    assert "scored 2 of 5 files" in err
    assert f"interrupted by {signal_name} after 2 of 5 files were scored; the rows scored are written" in err
    # The handlers in place before the run are back.
    assert {s: signal.getsignal(s) for s in handlers} == handlers


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_run_interrupted_while_it_writes_its_reports_keeps_every_row(tmp_path, monkeypatch, capsys, signal_name):
    """`--dicom-sr`, stopped after scoring, while the reports are written (minutes for a large folder):
    the run ended with no rows file and no word, every file's score lost. The rows are written before
    the reports (so a SIGKILL after a scheduler's SIGTERM leaves them), and again after: those left
    without a report say so, and the run exits as a shell reports a command that signal ended."""
    import signal

    import fracture.dicom_sr
    from fracture.cli import main

    if threading.current_thread() is not threading.main_thread():  # a signal handler needs the main thread
        pytest.skip("tests run off the main thread here, where Python takes no signal handler")
    folder = _study_served_until_its_second_request(tmp_path, monkeypatch, lambda: None)
    xray = require_fracatlas() / "images" / "Fractured" / "IMG0000019.jpg"
    for n in range(5):
        (folder / f"IM{n:04d}").write_bytes(dicom_from_jpeg(xray, "8-bit"))  # five images of one X-ray, each its UID
    out, reports = tmp_path / "rows.csv", tmp_path / "sr"
    made = fracture.dicom_sr.structured_report
    seen: list[pd.DataFrame] = []

    def report(*args, **kwargs):
        if seen:  # the second report: the rows are on disk already
            os.kill(os.getpid(), signal.Signals[signal_name])
            time.sleep(5)  # the handler raises before this ends
            raise AssertionError("the signal was not delivered")
        seen.append(pd.read_csv(out, keep_default_na=False, dtype=str))
        return made(*args, **kwargs)

    monkeypatch.setattr(fracture.dicom_sr, "structured_report", report)
    with pytest.raises(SystemExit) as ended:
        main(["predict", str(folder), "--out", str(out), "--dicom-sr", str(reports), "--no-progress"])
    assert ended.value.code == 128 + signal.Signals[signal_name].value
    assert seen[0]["fracture_probability"].tolist() == ["0.25"] * 5 and seen[0]["sr"].tolist() == [""] * 5
    rows = pd.read_csv(out, keep_default_na=False, dtype=str)
    assert rows["error"].tolist() == [""] * 5 and rows["fracture_probability"].tolist() == ["0.25"] * 5
    assert rows["sr"][0] and (Path(rows["sr"][0]).is_file() or (tmp_path / rows["sr"][0]).is_file())
    assert rows["sr"][1:].tolist() == [""] * 4
    assert rows["note"][1:].str.fullmatch(
        f"no structured report: the run was interrupted by {signal_name} before it was written; score the file "
        "again with --dicom-sr"
    ).all()
    assert sorted(p.name for p in reports.iterdir() if p.name.endswith(".sr.dcm")) == [Path(rows["sr"][0]).name]
    assert (f"interrupted by {signal_name} while writing the structured reports, after 5 of 5 files were scored; every "
            "row is written, and those left without a report say so in note") in capsys.readouterr().err


def test_a_studys_reports_form_one_series_and_a_rerun_names_the_report_it_replaces(fracatlas, tmp_path):
    study_uid = generate_uid()
    files = []
    for n, name in enumerate(("Fractured/IMG0000019.jpg", "Non_fractured/IMG0000009.jpg")):
        ds = dcmread(io.BytesIO(dicom_from_jpeg(fracatlas / "images" / name, "8-bit")))
        ds.StudyInstanceUID, ds.PatientID = study_uid, "PAT001"  # one patient's study
        files.append(tmp_path / f"IM000{n}")
        ds.save_as(files[-1], enforce_file_format=True)

    def table():
        return pd.DataFrame({
            "fracture_probability": [0.7, 0.2], "label": ["fractured", "not_fractured"], "threshold": 0.5,
            "model": NAME, "version": "3", "error": "", "note": "",
        })

    first = [dcmread(p) for p in write_structured_reports(table(), files, tmp_path / "sr")]
    assert first[0].SeriesInstanceUID == first[1].SeriesInstanceUID
    assert [int(sr.InstanceNumber) for sr in first] == [1, 2]
    assert "PredecessorDocumentsSequence" not in first[0]
    # Scored again into the same folder: each report replaces the earlier one and names it.
    again = [dcmread(p) for p in write_structured_reports(table(), files, tmp_path / "sr")]
    assert _listed(tmp_path / "sr") == sorted(f"{dcmread(f).SOPInstanceUID}.sr.dcm" for f in files)
    for old, new in zip(first, again, strict=True):
        assert new.SOPInstanceUID != old.SOPInstanceUID and new.SeriesInstanceUID != old.SeriesInstanceUID
        before = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert before.ReferencedSOPInstanceUID == old.SOPInstanceUID
    # An earlier report that is damaged (empty here) is moved aside, not named: nothing in it to name.
    damaged = tmp_path / "sr" / f"{dcmread(files[0]).SOPInstanceUID}.sr.dcm"
    damaged.write_bytes(b"")
    third = [dcmread(p) for p in write_structured_reports(table(), files, tmp_path / "sr")]
    assert "PredecessorDocumentsSequence" not in third[0] and "PredecessorDocumentsSequence" in third[1]
    assert damaged.with_name(f"{damaged.name}.damaged").read_bytes() == b""
    assert not [name for name in _listed(tmp_path / "sr") if name.startswith(".")]  # no partial file left


def _tracking_uid(report) -> str:
    return str(named(content_items(report), "Tracking Unique Identifier")[0].UID)


def test_a_reruns_reports_are_dated_and_track_the_findings_they_replace(fracatlas, tmp_path):
    """Scored again into the same folder, a study's new SR series looked like the first run's (both
    Series Number 9901, neither dated) and each new report tracked its finding under a new UID, so a
    PACS holding both read the replacing report as a new finding. Each series is dated when its run
    began, and a report tracks its finding by a UID derived from the image and the model, the same
    in the report that replaces it, another for another image."""
    from pydicom.valuerep import DA, TM

    study_uid = generate_uid()
    files = []
    for n, name in enumerate(("Fractured/IMG0000019.jpg", "Non_fractured/IMG0000009.jpg")):
        files.append(tmp_path / f"IM000{n}")
        files[-1].write_bytes(_edited_dicom(fracatlas / "images" / name, StudyInstanceUID=study_uid, PatientID="PAT001"))
    runs = [[dcmread(p) for p in write_structured_reports(_reported_table(2), files, tmp_path / "sr")] for _ in range(2)]
    when = []
    for reports in runs:
        dated = {(sr.SeriesDate, sr.SeriesTime) for sr in reports}
        assert len(dated) == 1 and all(dated.pop()), "one series, dated"
        when.append(DA(reports[0].SeriesDate).isoformat() + "T" + TM(reports[0].SeriesTime).isoformat())
    assert when[0] <= when[1]
    first, again = ([_tracking_uid(sr) for sr in reports] for reports in runs)
    assert first == again and first[0] != first[1]
    assert again[0] != runs[1][0].SOPInstanceUID  # the finding's UID, not the report's


def test_two_patients_under_one_study_uid_get_a_series_each(fracatlas, tmp_path):
    """An anonymiser writes one constant Study Instance UID on every patient's images: their reports
    formed one SR series holding two patients."""
    files = []
    for n, (name, patient) in enumerate((("Fractured/IMG0000019.jpg", "ANON-1"), ("Non_fractured/IMG0000009.jpg", "ANON-2"),
                                         ("Non_fractured/IMG0000010.jpg", "ANON-1"))):
        files.append(tmp_path / f"IM000{n}")
        files[-1].write_bytes(_edited_dicom(fracatlas / "images" / name, StudyInstanceUID="1.2.3.4.5.6.7", PatientID=patient))
    reports = [dcmread(p) for p in write_structured_reports(_reported_table(3), files, tmp_path / "sr")]
    assert [sr.PatientID for sr in reports] == ["ANON-1", "ANON-2", "ANON-1"]
    assert reports[0].SeriesInstanceUID == reports[2].SeriesInstanceUID != reports[1].SeriesInstanceUID
    assert [int(sr.InstanceNumber) for sr in reports] == [1, 1, 2]


def test_a_file_gone_after_scoring_or_never_read_costs_its_report_only(fracatlas, tmp_path):
    """Reports are written after every file is scored: a file removed meanwhile, or one whose row
    already holds an error (a file that could not be read), gets no report and the others theirs."""
    files = []
    for n, name in enumerate(("Fractured/IMG0000019.jpg", "Non_fractured/IMG0000009.jpg", "Non_fractured/IMG0000010.jpg")):
        files.append(tmp_path / f"IM000{n}")
        files[-1].write_bytes(dicom_from_jpeg(fracatlas / "images" / name, "8-bit"))
    table = pd.DataFrame({
        "fracture_probability": [0.7, 0.2, float("nan")], "label": ["fractured", "not_fractured", ""], "threshold": 0.5,
        "model": NAME, "version": "3", "error": ["", "", "the file cannot be read (PermissionError)"], "note": "",
    })
    files[1].unlink()
    files[2].unlink()
    written = write_structured_reports(table, files, tmp_path / "sr")
    assert written[0].endswith(".sr.dcm") and written[1:] == ["", ""]
    assert dcmread(written[0]).StudyInstanceUID
    assert table["note"][1] == "no structured report: the file cannot be read again (FileNotFoundError)"
    assert table["note"][2] == ""  # its error says it all


def test_a_file_that_changed_since_it_was_scored_gets_no_report_carrying_another_images_patient(fracatlas, tmp_path):
    """Reports are made after the whole batch is scored, from the files read again: in a folder a
    PACS router writes into under reused names, IM0000 had become another patient's image by then,
    and its report carried that patient and image with the first image's answer. The bytes each row
    was scored from are checked; a file that holds others gets no report, and the rest theirs."""
    files, scored = [], []
    for n, (name, patient) in enumerate((("Fractured/IMG0000019.jpg", "ALICE"), ("Non_fractured/IMG0000009.jpg", "CAROL"))):
        ds = dcmread(io.BytesIO(dicom_from_jpeg(fracatlas / "images" / name, "8-bit")))
        ds.PatientID = patient
        files.append(tmp_path / f"IM000{n}")
        ds.save_as(files[-1], enforce_file_format=True)
        scored.append(hashlib.sha256(files[-1].read_bytes()).hexdigest())
    table = pd.DataFrame({
        "fracture_probability": [0.7, 0.2], "label": ["fractured", "not_fractured"], "threshold": 0.5,
        "model": NAME, "version": "3", "error": "", "note": "",
    })
    table.attrs[SCORED_SHA256] = scored
    bob = dcmread(io.BytesIO(dicom_from_jpeg(fracatlas / "images/Non_fractured/IMG0000010.jpg", "8-bit")))
    bob.PatientID = "BOB"
    bob.save_as(files[0], enforce_file_format=True)  # the router reuses the name for the next patient
    written = write_structured_reports(table, files, tmp_path / "sr")
    assert written[0] == "" and table["note"][0].startswith("no structured report: the file changed since it was scored")
    assert "score the file again" in table["note"][0]
    assert dcmread(written[1]).PatientID == "CAROL"
    assert [dcmread(p).PatientID for p in (tmp_path / "sr").glob("*.sr.dcm")] == ["CAROL"]


def test_the_reports_series_description_fits_a_long_string_whatever_the_model_name_and_version():
    """Series Description is a Long String: 64 characters at most (PS3.5 6.2), also from version 10 on."""
    from fracture.dicom_sr import series_description

    assert series_description(NAME, "123") == "NOT FOR CLINICAL USE: fracture-classifier v123"
    for name, version in ((NAME, "1"), (NAME, "12345"), ("hospital-a-wrist-fracture-classifier-efficientnet", "7")):
        text = series_description(name, version)
        assert len(text) <= 64 and text.startswith("NOT FOR CLINICAL USE: ") and text.endswith(f" v{version}")
    assert series_description("hospital-a-wrist-fracture-classifier-efficientnet", "7").endswith("... v7")


def test_two_models_sharing_a_name_and_version_observe_as_two_devices_naming_their_runs(fracatlas, tmp_path):
    """Every fresh registry's first champion is version 1 of fracture-classifier: a staging and a
    production registry, or one rebuilt after its store was lost, hold two models of that name and
    version, and their reports named the same device and algorithm. The MLflow run that trained the
    weights tells them apart: the device UID is derived from it, and the algorithm's parameters name
    it (TID 4019). One model's reports name one device, run after run."""
    import highdicom as hd

    source = tmp_path / "IM0001"
    source.write_bytes(dicom_from_jpeg(fracatlas / "images/Fractured/IMG0000019.jpg", "8-bit"))

    def identification(run_id: str, folder: str) -> tuple[str, list[str], str]:
        table = _reported_table(1)
        table.attrs[MODEL_RUN_ID] = run_id
        [written] = write_structured_reports(table, [source], tmp_path / folder)
        items = content_items(dcmread(written))
        assert {str(i.TextValue) for i in named(items, "Algorithm Version")} == {"3"}
        hd.sr.srread(written)  # highdicom reads it back as an SR
        return (str(named(items, "Device Observer UID")[0].UID),
                sorted({str(i.TextValue) for i in named(items, "Algorithm Parameters")}),
                dcmread(written).SoftwareVersions)

    staging, production = "3682a2d99b724f2aab882d79011a29dc", "9c0e5b7f1d2a4e6b8f3a1c5d7e9b0a2c"
    first, second, again = identification(staging, "a"), identification(production, "b"), identification(staging, "c")
    assert first[0] != second[0] and first[0] == again[0]
    assert first[1] == [f"mlflow_run_id={staging}"] and second[1] == [f"mlflow_run_id={production}"]
    assert first[2] == f"fracture {__version__}"


def _listed(folder: Path) -> list[str]:
    """What a report folder holds, sorted, but for the lock runs writing into it take turns on, which stays."""
    return sorted(p.name for p in folder.iterdir() if p.name != REPORT_LOCK)


def _reported_table(n: int) -> pd.DataFrame:
    return pd.DataFrame({
        "fracture_probability": [0.7] * n, "label": ["fractured"] * n, "threshold": 0.5,
        "model": NAME, "version": "3", "error": [""] * n, "note": [""] * n,
    })


def _edited_dicom(jpeg: Path, **values: object) -> bytes:
    ds = dcmread(io.BytesIO(dicom_from_jpeg(jpeg, "8-bit")))
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),  # PS3.5 Annex H
        (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),  # PS3.5 Annex I
        ("ISO_IR 100", "Müller^Jürgen"),
    ],
    ids=["japanese", "korean", "latin-1"],
)
def test_a_report_carries_the_patients_name_whatever_the_sources_character_set(fracatlas, tmp_path, charset, name):
    """A Japanese or Korean PACS declares ISO 2022 with an empty first value, as the standard's
    examples do; the report is written in UTF-8, which holds every name pydicom decoded. A Latin-1
    source's report is written in Latin-1, which older PACS read better."""
    import highdicom as hd

    source = tmp_path / "IM0001"
    source.write_bytes(_edited_dicom(fracatlas / "images/Fractured/IMG0000019.jpg", SpecificCharacterSet=charset,
                                     PatientName=name))
    table = _reported_table(1)
    [written] = write_structured_reports(table, [source], tmp_path / "sr")
    assert written, table["note"][0]
    sr = dcmread(written)
    assert sr.SpecificCharacterSet == ("ISO_IR 100" if charset == "ISO_IR 100" else "ISO_IR 192")
    assert str(sr.PatientName) == name
    hd.sr.srread(written)  # highdicom reads it back as an SR


def test_patient_and_study_values_a_report_cannot_carry_are_left_empty_and_named(fracatlas, tmp_path):
    """ACR-NEMA times and dates, an unknown birth date written 19800000 and a sex spelled out are
    common in old archives; the image still gets its report, with those values empty, and its row
    says so. pydicom reads an ACR-NEMA date (2026.12.07), so it was copied into the report, which a
    strict PACS then refused."""
    jpeg = fracatlas / "images/Fractured/IMG0000019.jpg"
    files = [tmp_path / "IM0001", tmp_path / "IM0002"]
    files[0].write_bytes(_edited_dicom(
        jpeg, StudyDate="2026.12.07", StudyTime="10:10:10", PatientBirthDate="19800000", PatientSex="male"))
    files[1].write_bytes(_edited_dicom(
        jpeg, StudyDate="20261207", StudyTime="101010.123456", PatientBirthDate="19800101", PatientSex="M"))
    table = _reported_table(2)
    written = write_structured_reports(table, files, tmp_path / "sr")
    assert all(written), list(table["note"])
    legacy, conformant = (dcmread(p) for p in written)
    assert (legacy.StudyDate, legacy.StudyTime, legacy.PatientBirthDate, legacy.PatientSex) == ("", "", "", "")
    assert conformant.StudyDate == "20261207"
    assert (conformant.StudyTime, conformant.PatientBirthDate, conformant.PatientSex) == ("101010.123456", "19800101", "M")
    assert table["note"][0] == (
        "left empty in the structured report, not valid DICOM values: "
        "StudyDate '2026.12.07', StudyTime '10:10:10', PatientBirthDate '19800000', PatientSex 'male'"
    )
    assert table["note"][1] == ""


def test_every_patient_and_study_value_a_report_cannot_carry_is_left_out_or_named(fracatlas, tmp_path):
    """PACS exports carry values outside their VR: a Patient's Age without its unit, Short and Long
    Strings over their length, Latin-1 bytes under a declared UTF-8. They were copied into the report
    unchanged and unnoted (a validator refuses it), where only four type 2 values were checked. Every
    copied patient and study value is checked now: a type 2 one is left empty, another left out,
    and the Patient ID and Accession Number, by which the PACS files the report, are kept; the row's
    note names each. The UIDs are kept as they are."""
    from pydicom.valuerep import validate_value

    jpeg = fracatlas / "images/Fractured/IMG0000019.jpg"
    files = [tmp_path / "IM0001", tmp_path / "IM0002", tmp_path / "IM0003"]
    files[0].write_bytes(_edited_dicom(
        jpeg, PatientAge="56", StudyID="STUDY-ID-TOO-LONG-20", StudyDescription="X" * 80,
        ReferringPhysicianName="A" * 70 + "^B", PatientID="P" * 70, AccessionNumber="RAD-2026-0000012345"))
    ds = dcmread(io.BytesIO(_edited_dicom(jpeg, SpecificCharacterSet="ISO_IR 192")))
    ds["PatientName"].value = "Fran\xe7ois^Ren\xe9".encode("latin-1")  # a Latin-1 name under a declared UTF-8
    ds.save_as(files[1], enforce_file_format=True)
    files[2].write_bytes(_edited_dicom(
        jpeg, PatientAge="056Y", StudyID="S1", StudyDescription="XR WRIST 2 VIEWS", ReferringPhysicianName="Doe^Jane",
        AccessionNumber="RAD-2026-12345"))
    table = _reported_table(3)
    with pytest.warns(UserWarning, match="Failed to decode"):  # pydicom's, on the Latin-1 name
        written = write_structured_reports(table, files, tmp_path / "sr")
    assert all(written), list(table["note"])
    odd, latin1, valid = (dcmread(p) for p in written)
    assert "PatientAge" not in odd and "StudyDescription" not in odd
    assert (odd.StudyID, odd.ReferringPhysicianName) == ("", "")
    assert (odd.PatientID, odd.AccessionNumber) == ("P" * 70, "RAD-2026-0000012345")
    assert table["note"][0] == (
        "left empty in the structured report, not valid DICOM values: "
        f"ReferringPhysicianName '{'A' * 70}^B', StudyID 'STUDY-ID-TOO-LONG-20'; "
        f"left out of the structured report, not valid DICOM values: StudyDescription '{'X' * 80}', PatientAge '56'; "
        "kept in the structured report though not valid DICOM values, as the PACS files it by them: "
        f"AccessionNumber 'RAD-2026-0000012345', PatientID '{'P' * 70}'"
    )
    assert latin1.PatientName == "" and table["note"][1] == (
        "left empty in the structured report, not valid DICOM values: PatientName 'Fran\ufffdois^Ren\ufffd'")
    assert table["note"][2] == ""
    assert (valid.PatientAge, valid.StudyID, valid.StudyDescription, str(valid.ReferringPhysicianName),
            valid.AccessionNumber) == ("056Y", "S1", "XR WRIST 2 VIEWS", "Doe^Jane", "RAD-2026-12345")
    for report in (latin1, valid):  # every value the report carries is valid for its VR
        for elem in report:
            if elem.VR not in ("SQ", "UI") and elem.value not in (None, ""):
                validate_value(elem.VR, str(elem.value) if elem.VR in ("DA", "DS", "IS", "PN", "TM") else elem.value, 2)


def test_the_same_image_exported_twice_gets_one_report_which_a_rerun_replaces(fracatlas, tmp_path):
    data = dicom_from_jpeg(fracatlas / "images/Fractured/IMG0000019.jpg", "8-bit")
    files = [tmp_path / "a" / "IM0001", tmp_path / "b" / "IM0001"]
    for f in files:
        f.parent.mkdir()
        f.write_bytes(data)
    uid = dcmread(files[0]).SOPInstanceUID
    for _ in range(3):
        table = _reported_table(2)
        written = write_structured_reports(table, files, tmp_path / "sr")
        assert written == [str(tmp_path / "sr" / f"{uid}.sr.dcm")] * 2
        assert table["note"][1] == f"the same image (SOP Instance UID) as {files[0]}, whose report {uid}.sr.dcm is this row's"
        assert _listed(tmp_path / "sr") == [f"{uid}.sr.dcm"]


@pytest.mark.parametrize(("keyword", "corrected"), [("PatientID", "PAT999"), ("IssuerOfPatientID", "OTHER-HOSPITAL")])
def test_one_image_exported_before_and_after_a_patient_correction_gets_a_report_for_each_patient(
    fracatlas, tmp_path, keyword, corrected,
):
    """A PACS export holding an image before and after its patient was corrected: the same SOP
    Instance UID, study and pixels, another Patient ID (or issuer). The corrected file's row pointed
    to the first file's report, which carries the other patient; each now gets its own, and a rerun
    replaces each patient's report with that patient's."""
    jpeg = fracatlas / "images/Fractured/IMG0000019.jpg"
    files = [tmp_path / "before" / "IM0001", tmp_path / "after" / "IM0001"]
    before = _edited_dicom(jpeg, PatientID="PAT001", IssuerOfPatientID="HOSPITAL")
    ds = dcmread(io.BytesIO(before))
    setattr(ds, keyword, corrected)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    for f, data in zip(files, (before, buffer.getvalue()), strict=True):
        f.parent.mkdir()
        f.write_bytes(data)
    for _ in range(2):
        table = _reported_table(2)
        written = write_structured_reports(table, files, tmp_path / "sr")
        assert written[0] and written[1] and written[0] != written[1], list(table["note"])
        reports = [dcmread(p) for p in written]
        for report, source in zip(reports, files, strict=True):
            source = dcmread(source, stop_before_pixels=True)
            assert (report.PatientID, report.IssuerOfPatientID) == (source.PatientID, source.IssuerOfPatientID)
        assert table["note"][1] == (f"shares its SOP Instance UID with {files[0]}, but not its study, patient or "
                                    f"answer: reported apart, as {Path(written[1]).name}")
        assert _listed(tmp_path / "sr") == sorted(Path(p).name for p in written)


def test_a_report_that_cannot_be_written_costs_its_row_only(fracatlas, tmp_path, monkeypatch):
    from pydicom.dataset import Dataset

    images = fracatlas / "images"
    files = [tmp_path / "IM0001", tmp_path / "IM0002"]
    files[0].write_bytes(dicom_from_jpeg(images / "Fractured/IMG0000019.jpg", "8-bit"))
    files[1].write_bytes(dicom_from_jpeg(images / "Non_fractured/IMG0000009.jpg", "8-bit"))
    save_as, calls = Dataset.save_as, []

    def disk_full_once(self, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 1:
            Path(filename).write_bytes(b"half a report")
            raise OSError(28, "No space left on device")
        return save_as(self, filename, *args, **kwargs)

    monkeypatch.setattr(Dataset, "save_as", disk_full_once)
    table = _reported_table(2)
    written = write_structured_reports(table, files, tmp_path / "sr")
    assert written[0] == "" and written[1].endswith(".sr.dcm")
    assert table["note"][0].startswith("no structured report: it cannot be written to ")
    assert table["note"][0].endswith("(No space left on device)")
    assert int(dcmread(written[1]).InstanceNumber) == 1  # the number the unwritten one would have had
    assert _listed(tmp_path / "sr") == [Path(written[1]).name]  # no partial file left


@pytest.mark.parametrize("where", ["out's folder missing", "out is a folder", "dicom-sr is a file"])
def test_an_output_path_that_cannot_be_written_is_refused_before_any_file_is_scored(registry, tmp_path, where):
    image = require_fracatlas() / "images/Fractured/IMG0000019.jpg"
    (tmp_path / "taken").write_text("a file, not a folder")
    args = {
        "out's folder missing": ["--out", str(tmp_path / "missing" / "rows.csv")],
        "out is a folder": ["--out", str(tmp_path)],
        "dicom-sr is a file": ["--out", str(tmp_path / "rows.csv"), "--dicom-sr", str(tmp_path / "taken")],
    }[where]
    proc = run_predict(registry, str(image), *args)
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("fracture predict: --")
    assert "Traceback" not in proc.stderr and "scored" not in proc.stderr  # refused before scoring
    assert not (tmp_path / "rows.csv").exists()


def test_a_model_of_another_flavour_is_named_not_a_traceback(registry, tmp_path):
    """An operator's slip (a name shared with another team's model) puts a scikit-learn model at the alias."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    mlflow.set_tracking_uri(registry["uri"])
    try:
        # Its requirements given: MLflow would otherwise infer them by loading the model in a Python of its own.
        info = mlflow.sklearn.log_model(LogisticRegression().fit(np.eye(2), [0, 1]), name="model",
                                        pip_requirements=["scikit-learn"])
        mlflow.register_model(info.model_uri, "other-team-model")
    finally:
        mlflow.set_tracking_uri(None)
    image = require_fracatlas() / "images/Fractured/IMG0000019.jpg"
    proc = run_predict(registry, str(image), "--model", "models:/other-team-model/1")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "fracture predict: models:/other-team-model/1 is a sklearn-flavour MLflow model, not a fracture classifier "
        "logged by this project's register step; give --model a version of one"
    )


@pytest.mark.parametrize("uid", ["1.2.826.0.1.3680043.8.498.77", "ANONYMIZED"], ids=["valid", "an anonymiser's constant"])
def test_two_images_sharing_a_uid_but_not_their_answer_each_get_their_own_report(fracatlas, tmp_path, uid):
    """Only a copy of one image, scored alike, shares a report; an anonymiser's constant UID or a
    clash between two images must not hand one image the other's finding."""
    images = fracatlas / "images"
    files = [tmp_path / "IM0001", tmp_path / "IM0002"]
    for f, jpeg in zip(files, ("Non_fractured/IMG0000009.jpg", "Fractured/IMG0000019.jpg"), strict=True):
        f.write_bytes(_edited_dicom(images / jpeg, SOPInstanceUID=uid))
    table = _reported_table(2)
    table["fracture_probability"], table["label"] = [0.05, 0.97], ["not_fractured", "fractured"]
    written = write_structured_reports(table, files, tmp_path / "sr")
    assert written[0] and written[1] and written[0] != written[1]
    findings = [named(content_items(dcmread(p)), "Fracture of bone")[0].ConceptCodeSequence[0].CodeMeaning for p in written]
    assert findings == ["Absent", "Present"]
    assert table["note"][1] == (
        f"shares its SOP Instance UID with {files[0]}, but not its study, patient or answer: reported apart, as {Path(written[1]).name}"
    )


def test_a_version_is_scored_with_its_own_packaged_code_not_this_checkouts(registry, tmp_path):
    """As its consumers and the served model score it: a version logged by other code (older or
    newer than this checkout's) answers as that code does. Here the version's packaged intake
    notes every image it reads; this checkout's notes nothing for a plain JPEG."""
    from fracture.registry import register as register_version

    name = "fracture-classifier-own-code"
    mlflow.set_tracking_uri(registry["uri"])
    try:
        weights, config = untrained_model_files(tmp_path, THRESHOLD)
        with mlflow.start_run() as run:
            mlflow.log_metrics({"test_roc_auc": 0.9})
        check = require_fracatlas() / "images/Fractured/IMG0000019.jpg"
        register_version(RegisterParams(name, "t"), run.info.run_id, weights, config, EvaluatedSplit("s" * 64, 1, check),
                         MlflowClient(registry["uri"]), isolated=False)
        model_id = MlflowClient(registry["uri"]).get_model_version(name, "1").source.removeprefix("models:/")
        artifacts = Path(mlflow.get_logged_model(model_id).artifact_location.removeprefix("file://"))
    finally:
        mlflow.set_tracking_uri(None)
    intake = artifacts / "code" / "fracture" / "intake.py"
    intake.write_text(intake.read_text() + (
        "\n\n_checked = read_xray\n\n\ndef read_xray(data, policy, draft=None):\n"
        "    x = _checked(data, policy, draft)\n"
        "    return Xray(x.image, x.format, x.mode, (*x.warnings, 'read by the version of 2026-12-05'))\n"
    ))
    proc = run_predict(registry, str(check), "--model", f"models:/{name}/1", "--out", str(tmp_path / "rows.csv"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = pd.read_csv(tmp_path / "rows.csv", keep_default_na=False)
    assert list(rows["note"]) == ["read by the version of 2026-12-05"]
    assert rows["error"].tolist() == [""] and 0 <= float(rows["fracture_probability"][0]) <= 1


def test_a_rerun_replaces_the_reports_of_images_whose_uid_cannot_name_them_instead_of_adding_new_ones(fracatlas, tmp_path):
    """An image whose SOP Instance UID is invalid (an anonymiser's constant), and the second of two
    images sharing one, get reports named after their files' bytes: a rerun replaces each and names
    the one it replaces, as it does for an image named by its UID, and leaves no orphan that a PACS
    would hold as a second current finding. Two copies of one file under an invalid UID, and two
    different images under one UID, still get a report each."""
    images = fracatlas / "images"
    shared = "1.2.826.0.1.3680043.8.498.77"
    files = [tmp_path / "in" / name for name in ("IM0001", "IM0002", "IM0003", "IM0004")]
    files[0].parent.mkdir()
    files[0].write_bytes(_edited_dicom(images / "Non_fractured/IMG0000009.jpg", SOPInstanceUID="ANONYMIZED"))
    files[1].write_bytes(files[0].read_bytes())
    files[2].write_bytes(_edited_dicom(images / "Non_fractured/IMG0000009.jpg", SOPInstanceUID=shared))
    files[3].write_bytes(_edited_dicom(images / "Fractured/IMG0000019.jpg", SOPInstanceUID=shared))

    def run() -> list[Path]:
        table = _reported_table(4)
        table["fracture_probability"], table["label"] = [0.05, 0.05, 0.05, 0.97], ["not_fractured"] * 3 + ["fractured"]
        written = [Path(p) for p in write_structured_reports(table, files, tmp_path / "sr")]
        assert all(p.name for p in written), list(table["note"])
        assert len(set(written)) == 4 and written[2].name == f"{shared}.sr.dcm"
        return written

    first = run()
    before = {p.name: dcmread(p).SOPInstanceUID for p in first}
    again = run()
    assert again == first
    assert _listed(tmp_path / "sr") == sorted(before)
    for path in again:
        predecessor = dcmread(path).PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert predecessor.ReferencedSOPInstanceUID == before[path.name]
    findings = [named(content_items(dcmread(p)), "Fracture of bone")[0].ConceptCodeSequence[0].CodeMeaning for p in again]
    assert findings == ["Absent", "Absent", "Absent", "Present"]


#: A file name in Latin-1, as a Windows or an old PACS share writes RÖNTGEN: not UTF-8.
LATIN1 = b"R\xd6NTGEN"


def test_every_entry_of_a_folder_is_a_row_whatever_its_name_or_kind(registry, tmp_path):
    """A name that is not UTF-8, a series folder linked in, a link whose target is gone, a FIFO
    and a link back up the tree: each is a row (the images scored, the rest with their reason),
    and none costs the rows of the others."""
    image = require_fracatlas() / "images/Fractured/IMG0000019.jpg"
    folder, stored = tmp_path / "in", tmp_path / "stored" / "series2"
    (folder / "sub").mkdir(parents=True)
    stored.mkdir(parents=True)
    for path in (folder / "a.jpg", Path(os.fsdecode(bytes(folder) + b"/" + LATIN1 + b".jpg")), stored / "b.jpg"):
        path.write_bytes(image.read_bytes())
    (folder / "series2").symlink_to(stored)
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    os.mkfifo(folder / "pipe")  # read, it would wait for a writer for ever
    (folder / "sub" / "up").symlink_to("..")
    (folder / "sub" / "root").symlink_to(tmp_path)  # above the folder: nothing there is scored
    out = tmp_path / "rows.json"
    proc = run_predict(registry, str(folder), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pd.DataFrame(json.loads(out.read_text())).set_index("id")
    rows.index = [Path(i).relative_to(folder).as_posix() for i in rows.index]
    assert sorted(rows.index) == ["R\\xd6NTGEN.jpg", "a.jpg", "gone.jpg", "pipe", "series2/b.jpg", "sub/root", "sub/up"]
    assert (rows.loc[["R\\xd6NTGEN.jpg", "a.jpg", "series2/b.jpg"], "error"] == "").all()
    assert rows.loc["gone.jpg", "error"] == (
        f"the file is a link whose target does not exist ({tmp_path / 'nowhere.jpg'}); restore its target or remove the link"
    )
    assert rows.loc["pipe", "error"].startswith("the file is a FIFO (named pipe), not a regular file")
    assert rows.loc["sub/up", "error"].startswith("the folder is a link to a folder listed already")
    assert rows.loc["sub/root", "error"] == rows.loc["sub/up", "error"]
    assert f"scored 3 of 7 files; 4 with an error in their row; rows in {out}" in proc.stderr


def test_linked_folders_are_walked_once_and_what_is_no_file_is_listed(tmp_path):
    """Path.rglob leaves a linked series folder out, and is_file a broken link or a FIFO: each
    is listed for its row. A folder reached twice (a link back up the tree, a second link to it)
    is walked once, by where it resolves, and listed for its row the second time."""
    stored = tmp_path / "stored"
    (stored / "series2").mkdir(parents=True)
    (stored / "series2" / "IM0001").write_bytes(b"x")
    folder = tmp_path / "in"
    (folder / "series1").mkdir(parents=True)
    (folder / "series1" / "IM0001").write_bytes(b"x")
    (folder / "series1" / "DICOMDIR").write_bytes(b"x")
    (folder / "series2").symlink_to(stored / "series2")
    (folder / "series3").symlink_to(stored / "series2")  # a second link to it
    (folder / "series1" / "up").symlink_to("..")  # a loop
    (folder / "series1" / "top").symlink_to(tmp_path)  # the folder above: a share's root, say
    (tmp_path / "other-patient").mkdir()
    (tmp_path / "other-patient" / "IM9").write_bytes(b"x")  # outside the folder: never listed
    (folder / "current").symlink_to("series1")  # a second name for one of the tree's own folders
    (folder / "zstored").symlink_to(stored)  # the store: its series2 was walked through the link before
    (folder / "gone").symlink_to(tmp_path / "nowhere")
    (folder / "self").symlink_to("self")  # a loop of links
    os.mkfifo(folder / "pipe")
    (folder / ".hidden").symlink_to(tmp_path / "nowhere")
    listed = [p.relative_to(folder).as_posix() for p in collect([folder])]
    # The tree's own folders keep their names, whatever sorts first; linked ones come after.
    assert listed == [
        "current", "gone", "pipe", "self", "series1/DICOMDIR", "series1/IM0001", "series1/top", "series1/up",
        "series2/IM0001", "series3", "zstored/series2",
    ]
    from fracture.decoding import export_files
    from fracture.predict import _not_a_file

    # A dataset's export lists only the files to read, linked folders now included.
    assert [p.relative_to(folder).as_posix() for p in export_files(folder)] == ["series1/IM0001", "series2/IM0001"]
    reasons = {p.name: _not_a_file(p) for p in collect([folder])}
    assert reasons["IM0001"] == "" and reasons["DICOMDIR"] == ""
    assert reasons["gone"].startswith("the file is a link whose target does not exist")
    assert reasons["self"].startswith("the file is a link that leads back to itself")
    assert reasons["pipe"].startswith("the file is a FIFO")
    for link in ("up", "top", "series3", "current"):
        assert reasons[link].startswith("the folder is a link to a folder listed already"), link
    assert reasons["series2"].startswith("the folder was listed already under another name, through a link")
    # Named on the command line, they are rows too; a path that is nothing at all is refused.
    assert collect([folder / "gone", folder / "pipe"]) == [folder / "gone", folder / "pipe"]
    with pytest.raises(PredictError, match="is neither a file nor a folder"):
        collect([tmp_path / "nowhere"])


def test_overlapping_inputs_give_each_file_one_row(tmp_path):
    """A folder with a folder or file inside it, or one folder given twice or under another path:
    each file was a row per time it was reached, and the summary counted it as many files."""
    study = tmp_path / "study"
    (study / "series1").mkdir(parents=True)
    for rel in ("IM0001", "series1/IM0002", "series1/IM0003"):
        (study / rel).write_bytes(b"x")
    (tmp_path / "alias").symlink_to(study)  # the same folder under another path
    inputs = [study, study / "series1", study / "series1" / "IM0002", study, tmp_path / "alias", tmp_path / "alias" / "IM0001"]
    assert [p.relative_to(study).as_posix() for p in collect(inputs)] == ["IM0001", "series1/IM0002", "series1/IM0003"]
    # Where a file comes first is the name its row keeps; a link to a file is a name of its own.
    (study / "link").symlink_to(study / "IM0001")
    assert collect([study / "series1", study]) == [
        study / "series1" / "IM0002", study / "series1" / "IM0003", study / "IM0001", study / "link"
    ]


def test_a_report_for_another_image_under_the_same_uid_is_kept_not_replaced(fracatlas, tmp_path):
    """An anonymiser writes one constant (valid) SOP Instance UID on every image: day 1 reports
    patient A's image at <uid>.sr.dcm, and day 2's patient B image must neither overwrite it nor
    name it as its predecessor. B's report is named after its file's bytes, and a rerun of day 2
    replaces that one."""
    images, uid = fracatlas / "images", "1.2.826.0.1.3680043.8.498.77"
    day1, day2 = tmp_path / "day1" / "IM0001", tmp_path / "day2" / "IM0001"
    for path, jpeg, patient in ((day1, "Non_fractured/IMG0000009.jpg", "A"), (day2, "Fractured/IMG0000019.jpg", "B")):
        path.parent.mkdir()
        path.write_bytes(_edited_dicom(images / jpeg, SOPInstanceUID=uid, PatientID=patient))
    [first] = write_structured_reports(_reported_table(1), [day1], tmp_path / "sr")
    assert Path(first).name == f"{uid}.sr.dcm"
    kept = Path(first).read_bytes()
    reports = []
    for _ in range(2):
        table = _reported_table(1)
        [written] = write_structured_reports(table, [day2], tmp_path / "sr")
        reports.append(dcmread(written))
        assert Path(written).name != f"{uid}.sr.dcm" and reports[-1].PatientID == "B"
        assert Path(first).read_bytes() == kept  # patient A's report, untouched
        assert table["note"][0] == (
            f"an earlier report on another image (its source, study or patient differs) is {uid}.sr.dcm in "
            f"{tmp_path / 'sr'}: kept, and this one written as {Path(written).name}"
        )
    assert "PredecessorDocumentsSequence" not in reports[0]
    predecessor = reports[1].PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == reports[0].SOPInstanceUID
    assert len(_listed(tmp_path / "sr")) == 2


def test_a_rows_notes_are_all_kept(fracatlas, tmp_path):
    """A row may get several notes (its UID shared with another image, and values the report
    cannot carry); the second is added to the first, not put in its place."""
    images, uid = fracatlas / "images", "1.2.826.0.1.3680043.8.498.77"
    files = [tmp_path / "IM0001", tmp_path / "IM0002"]
    files[0].write_bytes(_edited_dicom(images / "Non_fractured/IMG0000009.jpg", SOPInstanceUID=uid))
    files[1].write_bytes(_edited_dicom(images / "Fractured/IMG0000019.jpg", SOPInstanceUID=uid, PatientSex="male"))
    table = _reported_table(2)
    table["fracture_probability"], table["label"] = [0.05, 0.97], ["not_fractured", "fractured"]
    written = write_structured_reports(table, files, tmp_path / "sr")
    assert all(written)
    assert table["note"][1] == (
        f"shares its SOP Instance UID with {files[0]}, but not its study, patient or answer: reported apart, "
        f"as {Path(written[1]).name}; left empty in the structured report, not valid DICOM values: PatientSex 'male'"
    )


def test_a_note_naming_a_file_whose_name_is_not_utf8_costs_no_report(fracatlas, tmp_path):
    """The note of the second copy of one image names the first, whose name is Latin-1: it is
    written readably (\xd6), rather than failing the table and with it every row of the run."""
    files = [Path(os.fsdecode(bytes(tmp_path) + b"/" + LATIN1)), tmp_path / "IM0002"]
    data = dicom_from_jpeg(fracatlas / "images/Fractured/IMG0000019.jpg", "8-bit")
    for path in files:
        path.write_bytes(data)
    table = _reported_table(2)
    written = write_structured_reports(table, files, tmp_path / "sr")
    assert written[0] and written[1] == written[0]
    assert table["note"][1] == (
        f"the same image (SOP Instance UID) as {tmp_path}/R\\xd6NTGEN, whose report {Path(written[0]).name} is this row's"
    )


def test_json_rows_hold_the_numbers_in_full(tmp_path):
    """As CSV, model.predict and the served model give them; DataFrame.to_json would round to 10 digits."""
    table = pd.DataFrame({
        "id": ["a.jpg", "b.jpg"], "fracture_probability": [0.898809015750885, float("nan")],
        "label": ["fractured", ""], "threshold": [0.30000000000000004, 0.30000000000000004],
        "model": NAME, "version": "3", "error": ["", "the image is empty (the file holds no bytes)"], "note": "",
    })
    write(table, tmp_path / "rows.json")
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rows[0]["fracture_probability"] == 0.898809015750885 and rows[0]["threshold"] == 0.30000000000000004
    assert rows[1]["fracture_probability"] is None and rows[1]["error"].startswith("the image is empty")
    write(table, tmp_path / "rows.csv")
    assert pd.read_csv(tmp_path / "rows.csv")["fracture_probability"][0] == rows[0]["fracture_probability"]


def _cut_in_its_findings(report: bytes) -> bytes:
    return report[: len(report) - 10]


def _without_evidence(report: bytes) -> bytes:
    ds = dcmread(io.BytesIO(report))
    del ds.CurrentRequestedProcedureEvidenceSequence
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("damage", "why", "named"),
    [
        (lambda report: report[:100], "it is not a DICOM file", False),  # cut inside its header
        (_cut_in_its_findings, "it is cut short", True),  # pydicom reads it without a word
        (_without_evidence, "it has no CurrentRequestedProcedureEvidenceSequence", False),
        (lambda report: b"", "it is empty", False),
    ],
    ids=["not-dicom", "cut-short", "no-evidence", "empty"],
)
def test_a_damaged_earlier_report_is_kept_aside_not_written_over(fracatlas, tmp_path, damage, why, named):
    """A report an earlier run left that is damaged (cut short, not DICOM, without the evidence
    that tells which image it is on) is neither replaced silently nor mistaken for another image's:
    it is moved aside as <name>.damaged, byte for byte, the new report takes its name, and the row's
    note says so. The new report names it as its predecessor only when what is left of it still
    shows it is on this image; a second damaged one goes to .damaged-2, the first left alone."""
    source = tmp_path / "IM0001"
    source.write_bytes(dicom_from_jpeg(fracatlas / "images/Fractured/IMG0000019.jpg", "8-bit"))
    folder = tmp_path / "sr"
    [first] = write_structured_reports(_reported_table(1), [source], folder)
    report = Path(first)
    earlier = dcmread(report)
    kept: list[bytes] = []
    for aside in (f"{report.name}.damaged", f"{report.name}.damaged-2"):
        kept.append(damage(report.read_bytes()))
        report.write_bytes(kept[-1])
        table = _reported_table(1)
        [written] = write_structured_reports(table, [source], folder)
        assert written == first  # the new report takes its name
        names = [report.name, f"{report.name}.damaged", f"{report.name}.damaged-2"][: 1 + len(kept)]
        assert _listed(folder) == names
        assert [(folder / name).read_bytes() for name in names[1:]] == kept  # byte for byte, the first left alone
        new = dcmread(written)
        assert new.SOPInstanceUID != earlier.SOPInstanceUID
        assert ("PredecessorDocumentsSequence" in new) == named
        if named:
            predecessor = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
            assert predecessor.ReferencedSOPInstanceUID == earlier.SOPInstanceUID
        assert table["note"][0] == (
            f"the earlier report {report.name} in {folder} is damaged ({why}): kept as {aside}, and this one "
            "written in its place, " + ("naming it as its predecessor" if named else
                                        "not naming it as its predecessor, as what is left of it does not show it "
                                        "is on this image")
        )
        earlier = new


def _without_hard_links(monkeypatch) -> None:
    """The report folder is on a file system without hard links (a FAT drive, an SMB share)."""

    def refused(src, dst, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr("fracture.predict.os.link", refused)


def _without_locks(monkeypatch, error: int = errno.ENOSYS) -> None:
    """The report folder is on a file system that cannot lock (no flock: some network shares), so
    runs writing into it at the same time do not take turns, as runs of versions that did not lock."""
    import fcntl

    def refused(fd, operation):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(fcntl, "flock", refused)


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
def test_a_damaged_earlier_report_that_cannot_be_moved_aside_is_left_whole(fracatlas, tmp_path, monkeypatch, links):
    """Moving the damaged report aside fails (a shared folder one may write files into but not
    remove another user's from): it is left as it was, byte for byte, with no copy of it aside, and
    this row gets no report, its note saying why."""
    source = tmp_path / "IM0001"
    source.write_bytes(dicom_from_jpeg(fracatlas / "images/Fractured/IMG0000019.jpg", "8-bit"))
    folder = tmp_path / "sr"
    [first] = write_structured_reports(_reported_table(1), [source], folder)
    Path(first).write_bytes(b"not a report")
    unlink = os.unlink

    def refused(path, *args, **kwargs):
        if Path(path) == Path(first):
            raise OSError(errno.EPERM, "Operation not permitted")
        unlink(path, *args, **kwargs)

    monkeypatch.setattr("fracture.predict.os.rename", refused)  # as an earlier way of moving it met it
    monkeypatch.setattr("fracture.predict.os.unlink", refused)
    if not links:
        _without_hard_links(monkeypatch)
    table = _reported_table(1)
    assert write_structured_reports(table, [source], folder) == [""]
    assert Path(first).read_bytes() == b"not a report" and _listed(folder) == [Path(first).name]
    assert table["note"][0] == (
        f"no structured report: the earlier report {first} is damaged (it is not a DICOM file) and cannot be moved "
        "aside (Operation not permitted), so it is left as it is"
    )


def _checked_before_another_run_made(monkeypatch, *made: Path) -> None:
    """Whatever asks whether one of ``made`` is there hears it is not: it asked just before another
    ``fracture predict`` writing into the same folder made it."""

    def lying(real):
        def check(path, *args, **kwargs):
            return False if Path(path) in made else real(path, *args, **kwargs)

        return check

    for owner, name in ((Path, "exists"), (Path, "is_symlink"), (Path, "is_file"), (os.path, "exists"),
                        (os.path, "lexists"), (os.path, "isfile"), (os.path, "islink")):
        monkeypatch.setattr(owner, name, lying(getattr(owner, name)))


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
def test_a_damaged_report_is_never_moved_aside_over_one_another_run_made_meanwhile(tmp_path, monkeypatch, links):
    """Two runs scoring into one report folder (a batch re-run while the first still goes): the
    other run keeps its damaged reports aside as <name>.damaged and .damaged-2 between this run's
    look at those names and its move, and this one's damaged report goes to .damaged-3, neither of
    theirs written over; byte for byte and with its time, with or without hard links there."""
    from fracture.predict import _set_aside

    report = tmp_path / "1.2.826.0.1.3680043.8.498.1.sr.dcm"
    report.write_bytes(b"a report cut short")
    os.utime(report, (1_000_000_000, 1_000_000_000))
    theirs = {report.with_name(f"{report.name}.damaged{suffix}"): f"another run's {suffix}".encode()
              for suffix in ("", "-2")}
    for path, data in theirs.items():
        path.write_bytes(data)
    _checked_before_another_run_made(monkeypatch, *theirs)
    if not links:
        _without_hard_links(monkeypatch)
    aside = _set_aside(report)
    assert {path: path.read_bytes() for path in theirs} == theirs  # the other run's, as it left them
    assert aside == report.with_name(f"{report.name}.damaged-3")
    assert aside.read_bytes() == b"a report cut short" and aside.stat().st_mtime == 1_000_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in [*theirs, aside])


def _damaged_report(fracatlas: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A DICOM source, its report folder, and its report there, damaged (emptied) since."""
    source = tmp_path / "IM0001"
    source.write_bytes(dicom_from_jpeg(fracatlas / "images/Fractured/IMG0000019.jpg", "8-bit"))
    folder = tmp_path / "sr"
    [first] = write_structured_reports(_reported_table(1), [source], folder)
    Path(first).write_bytes(b"")
    return source, folder, Path(first)


def _kept_aside_note(report: Path, aside: str) -> str:
    return (
        f"the earlier report {report.name} in {report.parent} is damaged (it is empty): kept as {aside}, and this "
        "one written in its place, not naming it as its predecessor, as what is left of it does not show it is on "
        "this image"
    )


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
def test_a_damaged_report_that_cannot_take_its_damaged_name_goes_back_or_keeps_this_runs_name(
        fracatlas, tmp_path, monkeypatch, links):
    """The damaged report cannot take its .damaged name (a copy cut short by a full disk): where
    hard links can put it back it goes back where it was, byte for byte, no part of it aside, and
    the row gets no report. Without hard links it could go back only by a copy, which the full disk
    cuts short too: it stays whole under the hidden name this run moved it to first, the new
    report takes its name, and the row's note names where the damaged one is kept."""
    source, folder, report = _damaged_report(fracatlas, tmp_path)

    def full(src, dst, *args, **kwargs):
        dst.write(src.read(4))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("fracture.predict.shutil.copyfileobj", full)
    if links:
        link = os.link

        def not_to_its_damaged_name(src, dst, **kwargs):
            if Path(dst).name.endswith(".damaged"):
                raise OSError(errno.EMLINK, "Too many links")
            link(src, dst, **kwargs)

        monkeypatch.setattr("fracture.predict.os.link", not_to_its_damaged_name)
    else:
        _without_hard_links(monkeypatch)
    table = _reported_table(1)
    written = write_structured_reports(table, [source], folder)
    if links:
        assert written == [""] and report.read_bytes() == b"" and _listed(folder) == [report.name]
        assert table["note"][0] == (f"no structured report: the earlier report {report} is damaged (it is empty) and "
                                    "cannot be moved aside (No space left on device), so it is left as it is")
        return
    [kept] = [folder / name for name in _listed(folder) if name != report.name]
    assert kept.name.startswith(f".{report.name}.") and kept.name.endswith(".aside") and kept.read_bytes() == b""
    assert written == [str(report)] and dcmread(report).SOPClassUID == ComprehensiveSRStorage
    assert table["note"][0] == _kept_aside_note(report, kept.name)


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
def test_a_run_moving_a_damaged_report_aside_never_removes_the_report_another_run_put_there(
        fracatlas, tmp_path, monkeypatch, links):
    """Two runs scoring one image into one report folder (a batch re-run while the first still
    goes) that cannot be locked, its earlier report damaged: the other run goes through, from its
    look at the folder to its new report, while this one links the damaged report to its .damaged
    name (without hard links: copies it there). A report is in place at the end, and the damaged
    one is kept once, as .damaged: neither removed from under the other run's new report nor kept
    twice."""
    source, folder, report = _damaged_report(fracatlas, tmp_path)
    _without_locks(monkeypatch)
    theirs: list[list[str]] = []

    def other_run() -> None:
        theirs.append(write_structured_reports(_reported_table(1), [source], folder))

    if links:
        link = os.link

        def linking(src, dst, **kwargs):
            link(src, dst, **kwargs)
            monkeypatch.setattr("fracture.predict.os.link", link)
            other_run()

        monkeypatch.setattr("fracture.predict.os.link", linking)
    else:
        _without_hard_links(monkeypatch)
        copyfileobj = shutil.copyfileobj

        def copying(src, dst, *args, **kwargs):
            copyfileobj(src, dst, *args, **kwargs)
            monkeypatch.setattr("fracture.predict.shutil.copyfileobj", copyfileobj)
            other_run()

        monkeypatch.setattr("fracture.predict.shutil.copyfileobj", copying)
    table = _reported_table(1)
    assert write_structured_reports(table, [source], folder) == [str(report)]
    assert theirs == [[str(report)]]
    assert _listed(folder) == [report.name, f"{report.name}.damaged"]
    assert (folder / f"{report.name}.damaged").read_bytes() == b""
    assert dcmread(report).SOPClassUID == ComprehensiveSRStorage
    assert table["note"][0] == _kept_aside_note(report, f"{report.name}.damaged")


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
@pytest.mark.parametrize("other", ["moved-it-aside", "put-its-report-there"])
def test_a_damaged_report_another_run_moved_aside_first_costs_this_rows_report_only(
        fracatlas, tmp_path, monkeypatch, links, other):
    """Two runs scoring one image into one report folder that cannot be locked, its earlier report
    damaged: both find it damaged, and the other moves it aside first, to put its own report in its
    place, here before this run has written its report or after. This run moves neither the other's
    report (taking it for the damaged one) nor the damaged one a second time: the row gets no
    report, its note saying why, and the other run's report keeps the name."""
    from pydicom.dataset import Dataset

    source, folder, report = _damaged_report(fracatlas, tmp_path)
    _without_locks(monkeypatch)
    if not links:
        _without_hard_links(monkeypatch)
    save_as, theirs = Dataset.save_as, []

    def saving(self, filename, *args, **kwargs):  # this run has looked at the damaged report: it writes its own
        save_as(self, filename, *args, **kwargs)
        monkeypatch.setattr(Dataset, "save_as", save_as)
        if other == "moved-it-aside":
            os.rename(report, report.with_name(f"{report.name}.damaged"))
        else:
            assert write_structured_reports(_reported_table(1), [source], folder) == [str(report)]
            theirs.append(report.read_bytes())

    monkeypatch.setattr(Dataset, "save_as", saving)
    table = _reported_table(1)
    assert write_structured_reports(table, [source], folder) == [""]
    assert table["note"][0] == (
        f"no structured report: the earlier report {report} is damaged (it is empty), and another run writing into "
        f"{folder} at the same time moved it aside first; the name is left to that run's report, so score this "
        "file again if none is there"
    )
    assert (folder / f"{report.name}.damaged").read_bytes() == b""
    if other == "moved-it-aside":
        assert _listed(folder) == [f"{report.name}.damaged"]
    else:
        assert _listed(folder) == [report.name, f"{report.name}.damaged"]
        assert theirs == [report.read_bytes()]


def test_a_report_folder_that_can_be_written_but_not_listed_gets_its_reports(fracatlas, tmp_path, monkeypatch, caplog):
    """A drop box (a folder this user may write in but not list, mode 0333) is not swept for reports'
    temporary files left by stopped runs: the sweep's listing failed with a traceback, and the
    run lost every row's report and its results table."""
    source, folder, report = _damaged_report(fracatlas, tmp_path)
    report.unlink()
    scandir = os.scandir

    def unlistable(path=".", *args, **kwargs):
        if Path(path) == folder:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", unlistable)
    table = _reported_table(1)
    with caplog.at_level("INFO", logger="fracture.predict"):
        assert write_structured_reports(table, [source], folder) == [str(report)]
    assert report.is_file() and table["note"][0] == ""
    assert f"{folder}: not swept for reports' temporary files left by stopped runs (Permission denied)" in caplog.text


@pytest.mark.parametrize("when", ["writing-it", "moving-the-damaged-one-aside"])
def test_a_run_stopped_while_writing_a_report_leaves_no_part_of_it(fracatlas, tmp_path, monkeypatch, when):
    """A run stopped (Ctrl-C) while it writes a report, or while it moves the damaged earlier report
    aside, leaves no part of its new report in the folder, and the earlier report where it was."""
    from pydicom.dataset import Dataset

    source, folder, report = _damaged_report(fracatlas, tmp_path)
    if when == "writing-it":
        def stopped(self, filename, *args, **kwargs):
            Path(filename).write_bytes(b"half a report")
            raise KeyboardInterrupt

        monkeypatch.setattr(Dataset, "save_as", stopped)
    else:
        link = os.link

        def stopped(src, dst, **kwargs):
            monkeypatch.setattr("fracture.predict.os.link", link)
            raise KeyboardInterrupt

        monkeypatch.setattr("fracture.predict.os.link", stopped)
    with pytest.raises(KeyboardInterrupt):
        write_structured_reports(_reported_table(1), [source], folder)
    assert _listed(folder) == [report.name] and report.read_bytes() == b""


def test_report_files_left_half_written_by_runs_stopped_long_ago_are_removed(fracatlas, tmp_path):
    """A run killed while writing a report (a kill or a power cut gives it no time to clean up)
    leaves its temporary file; a later run writing into the folder removes those that have not
    changed for a day, whichever image they were for and whichever version named them, and leaves
    a recent one (another run may be writing it now), a damaged report kept under a run's own
    name, and files not its own."""
    source = tmp_path / "IM0001"
    source.write_bytes(dicom_from_jpeg(fracatlas / "images/Fractured/IMG0000019.jpg", "8-bit"))
    folder = tmp_path / "sr"
    folder.mkdir()
    name, other = f"{dcmread(source).SOPInstanceUID}.sr.dcm", "1.2.826.0.1.3680043.8.498.1.sr.dcm"
    stale = [folder / f".{name}.0123456789abcdef.partial", folder / f".{other}.fedcba9876543210.partial",
             folder / f".{name}.partial"]
    recent = folder / f".{name}.00112233445566ff.partial"
    kept = [recent, folder / f".{other}.0123456789abcdef.aside", folder / "notes.partial"]
    day_ago = time.time() - 24 * 3600
    for path in [*stale, *kept]:
        path.write_bytes(b"half a report")
        if path != recent:
            os.utime(path, (day_ago, day_ago))
    assert write_structured_reports(_reported_table(1), [source], folder) == [str(folder / name)]
    assert sorted(p.name for p in folder.iterdir()) == sorted([name, REPORT_LOCK, *(p.name for p in kept)])


def test_a_report_another_run_is_writing_beside_this_one_is_left_to_it(fracatlas, tmp_path):
    """Two runs writing the same image's report into one folder at once: each writes its own file
    beside the report and moves it into place, so neither writes into, moves or removes the
    other's while it is still being written (which would put a report cut short in place)."""
    source = tmp_path / "IM0001"
    source.write_bytes(dicom_from_jpeg(fracatlas / "images/Fractured/IMG0000019.jpg", "8-bit"))
    folder = tmp_path / "sr"
    folder.mkdir()
    name = f"{dcmread(source).SOPInstanceUID}.sr.dcm"
    theirs = folder / f".{name}.partial"  # as this version names the file it writes before moving it
    theirs.write_bytes(b"the other run's report, half written")
    [written] = write_structured_reports(_reported_table(1), [source], folder)
    assert written == str(folder / name) and dcmread(written).SOPClassUID == ComprehensiveSRStorage
    assert theirs.read_bytes() == b"the other run's report, half written"
    assert _listed(folder) == sorted([name, theirs.name])


def test_the_rows_say_which_damaged_report_was_kept_aside(registry, tmp_path):
    """As a consumer runs it: the JSON row names the damaged report kept aside, and its new report."""
    source = tmp_path / "study" / "IM0001"
    source.parent.mkdir()
    source.write_bytes(dicom_from_jpeg(require_fracatlas() / "images/Fractured/IMG0000019.jpg", "8-bit"))
    folder, out = tmp_path / "sr", tmp_path / "rows.json"
    folder.mkdir()
    damaged = folder / f"{dcmread(source).SOPInstanceUID}.sr.dcm"
    damaged.write_bytes(b"\0" * 200)  # a transfer cut off after its first bytes: no DICM prefix
    proc = run_predict(registry, str(source.parent), "--out", str(out), "--dicom-sr", str(folder),
                       "--model", f"models:/{NAME}/1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = json.loads(out.read_text())
    assert row["error"] == "" and row["sr"] == str(damaged)
    assert row["note"] == (
        f"the earlier report {damaged.name} in {folder} is damaged (it is not a DICOM file): kept as "
        f"{damaged.name}.damaged, and this one written in its place, not naming it as its predecessor, as what is "
        "left of it does not show it is on this image"
    )
    assert (folder / f"{damaged.name}.damaged").read_bytes() == b"\0" * 200
    assert dcmread(damaged).SOPClassUID == ComprehensiveSRStorage


def test_a_report_cut_short_anywhere_is_judged_damaged_and_what_is_left_of_it_reads(fracatlas, tmp_path):
    """pydicom reads a file cut between its elements, or inside one of defined length, without a
    word: wherever the cut falls, the earlier report is judged damaged (only the whole file is
    not), and what is left of it can be asked which image it is on without raising."""
    from fracture.predict import _earlier_report, _reports_on

    source = tmp_path / "IM0001"
    source.write_bytes(dicom_from_jpeg(fracatlas / "images/Fractured/IMG0000019.jpg", "8-bit"))
    [first] = write_structured_reports(_reported_table(1), [source], tmp_path / "sr")
    data, image, cut_file = Path(first).read_bytes(), dcmread(source), tmp_path / "cut.sr.dcm"
    on_this_image = 0
    for cut in [*range(0, len(data), 7), len(data) - 1]:
        cut_file.write_bytes(data[:cut])
        earlier, damaged = _earlier_report(cut_file)
        assert damaged, cut
        on_this_image += earlier is not None and _reports_on(earlier, image)
    assert on_this_image  # a cut after its evidence leaves a predecessor to name
    cut_file.write_bytes(data)
    assert _earlier_report(cut_file)[1] == ""


#: How long a run lets another it started meanwhile (a second `fracture predict` writing into the
#: same folder) go on before it goes on itself: the other's report takes a fraction of it, unless
#: that run waits for the folder.
_A_FEW_SECONDS = 3


class _AnotherRun(threading.Thread):
    """A second ``fracture predict`` writing reports into the same folder, in a thread of this
    process: it takes the folder's lock as a run in another process does."""

    def __init__(self, table: pd.DataFrame, files: list[Path], folder: Path) -> None:
        super().__init__(daemon=True)
        self.table, self.files, self.folder = table, files, folder
        self.written: list[str] | None = None
        self.stopped: BaseException | None = None

    def run(self) -> None:
        try:
            self.written = write_structured_reports(self.table, self.files, self.folder)
        except BaseException as exc:  # noqa: BLE001 - handed to the test by finished()
            self.stopped = exc

    def meanwhile(self) -> None:
        """Starts the run, and lets it go on until it is done, or for a few seconds (it waits for the folder)."""
        self.start()
        self.join(_A_FEW_SECONDS)

    def finished(self) -> list[str] | None:
        """What the run wrote, once it is done; raises what stopped it."""
        self.join(60)
        assert not self.is_alive(), "the other run is still waiting for the report folder"
        if self.stopped is not None:
            raise self.stopped
        return self.written


def _predecessor(report: Path) -> str:
    """The SOP Instance UID of the report that ``report`` names as its predecessor."""
    ds = dcmread(report)
    assert "PredecessorDocumentsSequence" in ds, f"{report.name} names no predecessor"
    return ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID


def test_two_runs_writing_one_images_report_at_once_take_turns_and_the_second_names_the_first(
        fracatlas, tmp_path, monkeypatch):
    """Two runs scoring one image into one folder at once (a batch re-run while the first still
    goes): the second starts while the first writes its report, after the first looked and found no
    report there. It waits for the folder, then finds the first's report and replaces it, naming it
    as its predecessor, so a PACS that already received the first knows which one is current. The
    last to move its report into place won, naming no other, when both looked before either wrote."""
    from pydicom.dataset import Dataset

    source = tmp_path / "IM0001"
    source.write_bytes(dicom_from_jpeg(fracatlas / "images/Fractured/IMG0000019.jpg", "8-bit"))
    folder = tmp_path / "sr"
    report = folder / f"{dcmread(source).SOPInstanceUID}.sr.dcm"
    other = _AnotherRun(_reported_table(1), [source], folder)
    save_as, saved = Dataset.save_as, []

    def saving(self, filename, *args, **kwargs):  # a run has looked at the report's name: it writes its report
        saved.append(self.SOPInstanceUID)
        save_as(self, filename, *args, **kwargs)
        if len(saved) == 1:
            other.meanwhile()

    monkeypatch.setattr(Dataset, "save_as", saving)
    assert write_structured_reports(_reported_table(1), [source], folder) == [str(report)]
    assert other.finished() == [str(report)]
    assert _listed(folder) == [report.name]
    [replaced] = [uid for uid in saved if uid != dcmread(report).SOPInstanceUID]
    assert _predecessor(report) == replaced


def test_two_runs_reporting_two_images_under_one_constant_uid_at_once_keep_both_reports(
        fracatlas, tmp_path, monkeypatch):
    """An anonymiser writes one constant (valid) SOP Instance UID on every image, and two runs at
    once score two patients' images into one folder: the second starts while the first writes its
    report at <uid>.sr.dcm, after the first found nothing there. It waits for the folder, then finds
    the first's report on another image: kept, and its own named after its file's bytes, its row's
    note saying so. When both looked before either wrote, both moved their reports onto one name,
    and one patient's report was lost."""
    from pydicom.dataset import Dataset

    images, uid = fracatlas / "images", "1.2.826.0.1.3680043.8.498.77"
    day1, day2 = tmp_path / "day1" / "IM0001", tmp_path / "day2" / "IM0001"
    for path, jpeg, patient in ((day1, "Non_fractured/IMG0000009.jpg", "A"), (day2, "Fractured/IMG0000019.jpg", "B")):
        path.parent.mkdir()
        path.write_bytes(_edited_dicom(images / jpeg, SOPInstanceUID=uid, PatientID=patient))
    folder, theirs = tmp_path / "sr", _reported_table(1)
    other = _AnotherRun(theirs, [day2], folder)
    save_as = Dataset.save_as

    def saving(self, filename, *args, **kwargs):  # a run has looked at the report's name: it writes its report
        save_as(self, filename, *args, **kwargs)
        if other.ident is None:
            other.meanwhile()

    monkeypatch.setattr(Dataset, "save_as", saving)
    [ours] = write_structured_reports(_reported_table(1), [day1], folder)
    [written] = other.finished()
    assert Path(ours).name == f"{uid}.sr.dcm" and written != ours
    assert [dcmread(p).PatientID for p in (ours, written)] == ["A", "B"]
    assert _listed(folder) == sorted([Path(ours).name, Path(written).name])
    assert theirs["note"][0] == (
        f"an earlier report on another image (its source, study or patient differs) is {uid}.sr.dcm in {folder}: "
        f"kept, and this one written as {Path(written).name}"
    )


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
@pytest.mark.parametrize("runs", [2, 3])
def test_runs_finding_one_damaged_report_at_once_set_it_aside_once_and_the_image_keeps_a_report(
        fracatlas, tmp_path, monkeypatch, runs, links):
    """Two or three runs scoring one image into one folder at once, its earlier report damaged: each
    starts while the one before writes its report, after that one found the damaged report, and the
    last is stopped (Ctrl-C, a crash) before it moves its report into place. Each waits for the
    folder: the first sets the damaged report aside and puts its report in its place, the next
    replaces that one naming it, and the one stopped costs no other run its report. When all looked
    before any wrote, the last moved the damaged report aside first, and the others left the name
    to its report, which never came: the image had none. With hard links and without."""
    from pydicom.dataset import Dataset

    source, folder, report = _damaged_report(fracatlas, tmp_path)
    if not links:
        _without_hard_links(monkeypatch)
    others = [_AnotherRun(_reported_table(1), [source], folder) for _ in range(runs - 1)]
    save_as, replace, saved = Dataset.save_as, os.replace, []

    def saving(self, filename, *args, **kwargs):  # a run has looked at the report's name: it writes its report
        saved.append(self.SOPInstanceUID)
        count = len(saved)
        save_as(self, filename, *args, **kwargs)
        if count < runs:
            others[count - 1].meanwhile()

    def replacing(src, dst, *args, **kwargs):
        if threading.current_thread() is others[-1]:
            raise KeyboardInterrupt
        replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(Dataset, "save_as", saving)
    monkeypatch.setattr("fracture.predict.os.replace", replacing)
    table = _reported_table(1)
    assert write_structured_reports(table, [source], folder) == [str(report)]
    assert table["note"][0] == _kept_aside_note(report, f"{report.name}.damaged")
    assert [other.finished() for other in others[:-1]] == [[str(report)]] * (runs - 2)
    with pytest.raises(KeyboardInterrupt):
        others[-1].finished()
    assert _listed(folder) == [report.name, f"{report.name}.damaged"]
    assert (folder / f"{report.name}.damaged").read_bytes() == b""
    assert len(saved) == runs and dcmread(report).SOPInstanceUID == saved[-2]  # the last report moved into place
    if runs == 3:
        assert _predecessor(report) == saved[0]


def _held_by_another_run(monkeypatch, folder: Path, gives_up: int) -> list[float]:
    """Another run holds ``folder``'s lock, and lets go of it just as this run gives up waiting for
    it the ``gives_up``-th time. Returns the waits this run asks for, one per report, as it asks."""
    from filelock import FileLock, Timeout

    theirs = FileLock(str(folder / REPORT_LOCK))
    theirs.acquire()
    waits: list[float] = []
    timeouts = 0

    def lock(*args, **kwargs):
        ours = FileLock(*args, **kwargs)
        acquire = ours.acquire

        def acquiring(*args, timeout=None, **kwargs):
            nonlocal timeouts
            waits.append(timeout)
            try:
                return acquire(*args, timeout=timeout, **kwargs)
            except Timeout:
                timeouts += 1
                if timeouts == gives_up:
                    theirs.release()
                raise

        ours.acquire = acquiring
        return ours

    monkeypatch.setattr("fracture.predict.FileLock", lock)
    return waits


def test_a_folder_another_run_holds_past_the_wait_costs_that_rows_report_only(fracatlas, tmp_path, monkeypatch):
    """Another run holds the report folder for longer than a run waits for it (a run stuck on a
    slow share): the row whose report waited gets none, its note saying to score the file again,
    and the rows after it get theirs once the folder is free."""
    images = fracatlas / "images"
    files = [tmp_path / "IM0001", tmp_path / "IM0002"]
    files[0].write_bytes(dicom_from_jpeg(images / "Fractured/IMG0000019.jpg", "8-bit"))
    files[1].write_bytes(dicom_from_jpeg(images / "Non_fractured/IMG0000009.jpg", "8-bit"))
    folder = tmp_path / "sr"
    folder.mkdir()
    _held_by_another_run(monkeypatch, folder, gives_up=1)
    monkeypatch.setattr("fracture.predict.REPORT_LOCK_SECONDS", 0.2)
    table = _reported_table(2)
    written = write_structured_reports(table, files, folder)
    assert written == ["", str(folder / f"{dcmread(files[1]).SOPInstanceUID}.sr.dcm")]
    assert list(table["note"]) == [
        f"no structured report: another run writing into {folder} at the same time held the folder ({REPORT_LOCK}) "
        "through the 0.2 s this run waited for it; score this file again",
        "",
    ]
    assert _listed(folder) == [Path(written[1]).name]


def _sources(fracatlas: Path, tmp_path: Path, n: int) -> list[Path]:
    """``n`` DICOM images of one X-ray, each under a SOP Instance UID of its own."""
    files = [tmp_path / f"IM{i:04d}" for i in range(1, n + 1)]
    for path in files:
        path.write_bytes(dicom_from_jpeg(fracatlas / "images/Fractured/IMG0000019.jpg", "8-bit"))
    return files


def _reports_of(files: list[Path], folder: Path) -> list[str]:
    return [str(folder / f"{dcmread(f).SOPInstanceUID}.sr.dcm") for f in files]


def test_a_run_stuck_holding_the_folder_costs_one_full_wait_not_one_per_row(fracatlas, tmp_path, monkeypatch):
    """Another run holds the report folder and does not let go (stuck on a slow share): this run
    waits the full time for its first report only, and a short time for each one after, until it
    has the folder again; then it waits the full time again. Before, every row waited the full time
    (500 rows: hours, and no reports)."""
    files = _sources(fracatlas, tmp_path, 4)
    folder = tmp_path / "sr"
    folder.mkdir()
    waits = _held_by_another_run(monkeypatch, folder, gives_up=2)
    monkeypatch.setattr("fracture.predict.REPORT_LOCK_SECONDS", 0.4)
    monkeypatch.setattr("fracture.predict.REPORT_LOCK_RETRY_SECONDS", 0.1)
    table = _reported_table(4)
    assert write_structured_reports(table, files, folder) == ["", "", *_reports_of(files[2:], folder)]
    assert waits == [0.4, 0.1, 0.1, 0.4]
    assert list(table["note"])[:2] == [
        f"no structured report: another run writing into {folder} at the same time held the folder ({REPORT_LOCK}) "
        f"through the {wait} s this run waited for it; score this file again" for wait in (0.4, 0.1)
    ]
    assert list(table["note"])[2:] == ["", ""]


@pytest.mark.parametrize("failure", [errno.ENOSYS, "a link planted there", "NotImplementedError"],
                         ids=["no-flock", "lock-file-a-link", "no-native-lock"])
def test_a_folder_whose_file_system_cannot_lock_gets_its_reports_without_the_lock(
        fracatlas, tmp_path, monkeypatch, caplog, failure):
    """A report folder on a file system that cannot lock (no flock on an SMB share, a platform
    whose lock is not there), or whose lock file is a link someone planted there (which is never
    followed, so nothing it points to is touched): every row gets its report all the same, written
    as before runs took turns, and the log says once that the folder's lock is not held."""
    files = _sources(fracatlas, tmp_path, 2)
    folder = tmp_path / "sr"
    if isinstance(failure, int):
        _without_locks(monkeypatch, failure)
        reason = os.strerror(failure)
    elif failure == "a link planted there":
        folder.mkdir()
        (tmp_path / "elsewhere").write_bytes(b"another file")
        (folder / REPORT_LOCK).symlink_to(tmp_path / "elsewhere")
        reason = os.strerror(errno.ELOOP)
    else:
        def missing(self, *args, **kwargs):
            raise NotImplementedError

        monkeypatch.setattr("fracture.predict.FileLock.acquire", missing)
        reason = "NotImplementedError"
    table = _reported_table(2)
    with caplog.at_level("WARNING", logger="fracture.predict"):
        written = write_structured_reports(table, files, folder)
    assert written == _reports_of(files, folder)
    assert list(table["note"]) == ["", ""]
    assert [record.getMessage() for record in caplog.records] == [
        f"{folder}: reports written without holding the folder's lock {REPORT_LOCK} ({reason}): another run writing "
        "reports into the folder at the same time may write over one of this run's, or this run over one of its, "
        "without naming it as its predecessor"
    ]
    if failure == "a link planted there":
        assert (tmp_path / "elsewhere").read_bytes() == b"another file"


def test_a_lock_that_fails_once_is_taken_again_for_the_next_report(fracatlas, tmp_path, monkeypatch, caplog):
    """The folder's lock fails once with an error that passes (NFS's lock service busy a moment:
    ENOLCK): that report is written without it, the log says so, and the next report takes the lock
    again. Before, one such error left the rest of the run writing without the lock."""
    import fcntl

    flock, calls = fcntl.flock, []

    def once_busy(fd, operation):
        calls.append(operation)
        if len(calls) == 1:
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", once_busy)
    files = _sources(fracatlas, tmp_path, 3)
    folder = tmp_path / "sr"
    table = _reported_table(3)
    with caplog.at_level("WARNING", logger="fracture.predict"):
        assert write_structured_reports(table, files, folder) == _reports_of(files, folder)
    assert list(table["note"]) == ["", "", ""]
    assert [record.getMessage() for record in caplog.records] == [
        f"{folder}: a report written without holding the folder's lock {REPORT_LOCK} (No locks available): another "
        "run writing reports into the folder at the same time may write over one of this run's, or this run over "
        "one of its, without naming it as its predecessor"
    ]
    assert calls.count(fcntl.LOCK_UN) == 2  # the second and third reports held it, and let go


def _lock_fails(monkeypatch, failures: list[int | None]) -> list[int]:
    """Each report's try at the folder's lock fails with the next of ``failures`` (an errno; None:
    the lock is taken), and with the last of them once they run out. Returns the descriptors let go
    of: one for each report that held the lock."""
    import fcntl

    flock, tries, lets_go = fcntl.flock, [], []

    def failing(fd, operation):
        if operation == fcntl.LOCK_UN:
            lets_go.append(fd)
        else:
            tries.append(operation)
            failure = failures[min(len(tries), len(failures)) - 1]
            if failure is not None:
                raise OSError(failure, os.strerror(failure))
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", failing)
    return lets_go


def _unlocked(folder: Path, reason: str) -> str:
    return (f"{folder}: a report written without holding the folder's lock {REPORT_LOCK} ({reason}): another run "
            "writing reports into the folder at the same time may write over one of this run's, or this run over "
            "one of its, without naming it as its predecessor")


def test_a_lock_that_fails_for_every_report_is_warned_of_once_and_counted_at_the_end(
        fracatlas, tmp_path, monkeypatch, caplog):
    """A report folder on NFS mounted without its lock service: the lock fails for every report
    (ENOLCK). Each report still tries it, and every row gets its report, but the log warns once,
    and says at the end of the run how many reports were written without the lock, and why. Before,
    it warned once a report: a batch of 5,000 images, 5,000 times the same warning."""
    lets_go = _lock_fails(monkeypatch, [errno.ENOLCK])
    files = _sources(fracatlas, tmp_path, 4)
    folder = tmp_path / "sr"
    table = _reported_table(4)
    with caplog.at_level("INFO", logger="fracture.predict"):
        assert write_structured_reports(table, files, folder) == _reports_of(files, folder)
    assert list(table["note"]) == ["", "", "", ""]
    assert [(record.levelname, record.getMessage()) for record in caplog.records] == [
        ("WARNING", _unlocked(folder, "No locks available")),
        ("WARNING", f"{folder}: 4 of this run's reports went without the folder's lock {REPORT_LOCK} "
                    "(No locks available: 4)"),
    ]
    assert lets_go == []


def test_a_lock_that_fails_with_several_errors_is_warned_of_once_for_each_and_said_once_to_be_back(
        fracatlas, tmp_path, monkeypatch, caplog):
    """The folder's lock fails for some reports with one error, for others with another, and is
    taken between: the log warns once for each error, says once that the lock is held again and how
    many reports were written without it till then, and at the end counts those written without it
    since, with the rest."""
    lets_go = _lock_fails(monkeypatch, [errno.ENOLCK, errno.EIO, errno.ENOLCK, None, errno.ENOLCK, None])
    files = _sources(fracatlas, tmp_path, 6)
    folder = tmp_path / "sr"
    table = _reported_table(6)
    with caplog.at_level("INFO", logger="fracture.predict"):
        assert write_structured_reports(table, files, folder) == _reports_of(files, folder)
    assert list(table["note"]) == [""] * 6
    assert [(record.levelname, record.getMessage()) for record in caplog.records] == [
        ("WARNING", _unlocked(folder, "No locks available")),
        ("WARNING", _unlocked(folder, "Input/output error")),
        ("INFO", f"{folder}: the folder's lock {REPORT_LOCK} is held again; 3 of this run's reports went without "
                 f"the folder's lock {REPORT_LOCK} (No locks available: 2; Input/output error: 1)"),
        ("WARNING", f"{folder}: 4 of this run's reports went without the folder's lock {REPORT_LOCK} "
                    "(No locks available: 3; Input/output error: 1)"),
    ]
    assert len(lets_go) == 2  # the fourth and sixth reports held it, and let go


@pytest.mark.parametrize("kernel", ["let-go", "kept-it"])
def test_a_lock_that_cannot_be_let_go_of_costs_no_report_and_no_row(fracatlas, tmp_path, monkeypatch, caplog, kernel):
    """Letting go of the folder's lock fails (a network file system's lock service restarted),
    whether or not the kernel let go of it: the report is in place, so the run goes on with a
    warning, and the lock's file is closed, so the next report does not wait for a lock this run
    still holds. Before, the error ended the run with a traceback, and its results table, with
    every row's score, was never written; and where the kernel kept the lock, the next report
    waited for it in vain."""
    import fcntl

    flock = fcntl.flock

    def unlock_fails(fd, operation):
        if operation == fcntl.LOCK_UN:
            if kernel == "let-go":
                flock(fd, operation)
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", unlock_fails)
    monkeypatch.setattr("fracture.predict.REPORT_LOCK_SECONDS", 2.0)
    files = _sources(fracatlas, tmp_path, 2)
    folder = tmp_path / "sr"
    table = _reported_table(2)
    with caplog.at_level("WARNING", logger="fracture.predict"):
        assert write_structured_reports(table, files, folder) == _reports_of(files, folder)
    assert list(table["note"]) == ["", ""]
    assert [record.getMessage() for record in caplog.records] == [
        f"{folder}: the folder's lock {REPORT_LOCK} could not be let go of (No locks available); its file is closed, "
        "which lets go of it"
    ] * 2


@pytest.mark.skipif(os.geteuid() != 0, reason="gives the lock file to another account: needs root")
def test_a_lock_file_another_account_left_in_a_sticky_folder_is_named_with_what_to_do(
        fracatlas, tmp_path, caplog):
    """A shared report folder with the sticky bit (mode 1777), where another account's run left the
    lock file: filelock refuses it, since that account could replace it while it is held, so the
    reports are written without the lock, and the warning tells the folder's owner how to make a
    lock file every account can take."""
    files = _sources(fracatlas, tmp_path, 1)
    folder = tmp_path / "sr"
    folder.mkdir()
    folder.chmod(0o1777)
    lock = folder / REPORT_LOCK
    lock.touch(mode=0o666)
    os.chown(lock, 12345, 12345)
    with caplog.at_level("WARNING", logger="fracture.predict"):
        assert write_structured_reports(_reported_table(1), files, folder) == _reports_of(files, folder)
    [message] = [record.getMessage() for record in caplog.records]
    assert message.startswith(f"{folder}: reports written without holding the folder's lock {REPORT_LOCK} (")
    assert message.endswith(f"; in a folder with the sticky bit, the folder's owner makes the lock file once for "
                            f"every account: rm -f {lock} && touch {lock} && chmod 666 {lock}")


def test_the_report_folders_lock_file_is_open_to_every_account_whatever_the_umask(fracatlas, tmp_path):
    """A report folder several accounts' runs write into: the lock file the first run leaves there
    is open to every account, whatever that run's umask, so another account's run can take it in a
    folder without the sticky bit (with it, see the test above)."""
    source = tmp_path / "IM0001"
    source.write_bytes(dicom_from_jpeg(fracatlas / "images/Fractured/IMG0000019.jpg", "8-bit"))
    folder = tmp_path / "sr"
    umask = os.umask(0o077)
    try:
        [written] = write_structured_reports(_reported_table(1), [source], folder)
    finally:
        os.umask(umask)
    assert written and stat.S_IMODE((folder / REPORT_LOCK).stat().st_mode) == 0o666
