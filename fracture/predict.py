"""``fracture predict``: score files, folders or a DICOM study folder with a registered model.

The model is loaded through MLflow exactly as any consumer loads it
(``models:/<name>@<alias>`` or ``models:/<name>/<version>``), in a Python of its own with its own
packaged code (:class:`fracture.consumer.ConsumerModel`), and every file goes through its own
input checks; files are read and scored a batch at a time, so one bad file costs only its
own row. Each row names the file, the probability, the label, the threshold, the model's name
and version, and the error (empty when it was scored).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import errno
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from filelock import BaseFileLock, FileLock, Timeout
from mlflow import MlflowClient
from pandas.io.common import infer_compression
from tqdm import tqdm

from fracture.consumer import ConsumerError, ConsumerModel
from fracture.decoding import export_files, not_a_regular_file, shown, unlistable
from fracture.dicom import DicomRejected, is_dicom
from fracture.intake import InputPolicy, InputRejected, read_file
from fracture.tracking import NOT_FOUND, sqlite_store

log = logging.getLogger(__name__)

#: How a row's note starts when the report ``--dicom-sr`` asked for could not be made.
NO_REPORT = "no structured report"

#: A folder's every file is a row, whatever its name: a PACS export's files often have no ending,
#: or are named after their SOP Instance UID (1.2.840....320), and a file the model cannot read
#: (empty, cut short, another format, a DICOMDIR or a report) gets its reason in the row rather
#: than no row, as does an entry that is no file to read (a broken link, a FIFO, a link back up
#: the tree: :func:`_not_a_file`). Only hidden files and folders are left out.
COLUMNS = ["id", "fracture_probability", "label", "threshold", "model", "version", "error", "note"]
#: The columns that hold numbers; every other column holds text (:func:`write`).
NUMBERS = ("fracture_probability", "threshold")
#: ``score_files``'s table keeps, in ``attrs``, the sha256 of the bytes each row was scored from
#: ("" for a row not scored): a structured report is made only from a file that still holds them.
SCORED_SHA256 = "scored_sha256"
#: ... and the MLflow run that trained the version's weights (``attrs``), which its structured
#: reports name: two models registered under one name and version are told apart by it.
MODEL_RUN_ID = "model_run_id"
#: ... and, when the run stopped before every file was scored, why (``attrs``): how the model's
#: Python ended, or the signal that interrupted the run.
STOPPED = "stopped"
#: ... and, when it stopped on a signal (Ctrl-C's SIGINT, or a scheduler's SIGTERM), which (``attrs``).
INTERRUPTED = "interrupted"

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class PredictError(ValueError):
    """Nothing to score, or the model cannot be loaded; the message says what to do."""


#: A table attribute: the run was interrupted while it wrote the structured reports, every row scored.
REPORTS_INTERRUPTED = "reports_interrupted"
#: A table attribute: how many of its rows were taken over from an earlier run's :class:`Journal`.
RESUMED = "resumed"
#: ... and, a flag per row, which (``attrs``): such a row's report from the earlier run is kept, not written again.
TAKEN_OVER = "taken_over"


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop by a signal (:func:`interruptible`); ``signal_name`` says which."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within it, SIGINT (Ctrl-C) and SIGTERM (a batch scheduler's time limit, ``kill``) raise
    :class:`Interrupted`, so that :func:`score_files` can keep the rows scored before the signal
    instead of the process ending with none written. The handlers before are put back after; off
    the main thread, where Python cannot set them, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupted(signum: int, frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    before = {s: signal.signal(s, raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


@dataclass(frozen=True)
class LoadedModel:
    """A registered version as ``fracture predict`` scores with it: loaded in a Python of its own
    with its own packaged code (:class:`fracture.consumer.ConsumerModel`), as its consumers load
    it. This process has imported the installed ``fracture``, which MLflow's ``code_paths`` cannot
    replace here, so a version loaded here would check and decode inputs as this checkout does.
    Close it (:meth:`close`) when done. ``run_id`` is the MLflow run that trained its weights
    (``""`` for a version registered from no run)."""

    uri: str
    name: str
    version: str
    model: ConsumerModel
    policy: InputPolicy
    threshold: float
    run_id: str = ""

    def close(self) -> None:
        self.model.close()


def first_line(message: str) -> str:
    """A message's first line, or ``(no message)`` for an error raised without one."""
    return message.strip().splitlines()[0] if message and message.strip() else "(no message)"


def load(uri: str, client: MlflowClient | None = None) -> LoadedModel:
    """Loads ``models:/<name>@<alias>`` or ``models:/<name>/<version>``, naming the version it resolved to.

    Raises:
        PredictError: the URI is not a registry URI, the registry has no such version, or the
            version is no fracture classifier or cannot be loaded.
    """
    match = _URI.match(uri)
    if not match:
        raise PredictError(f"--model {uri!r} is not a registry URI; give models:/<name>@<alias> or models:/<name>/<version>")
    name = match["name"]
    where = mlflow.get_registry_uri()  # MLFLOW_REGISTRY_URI, else the tracking URI
    variable = "MLFLOW_REGISTRY_URI" if os.environ.get("MLFLOW_REGISTRY_URI") else "MLFLOW_TRACKING_URI"
    try:
        store = sqlite_store(where)
    except ValueError as exc:
        raise PredictError(f"{variable}: {exc}") from exc
    if client is None and store is not None and not store.is_file():
        # MLflow would create an empty store there (in the folder of images, say) and find nothing in it.
        raise PredictError(
            f"no MLflow store at {store}: set {variable} to the registry "
            "(sqlite:///$PWD/mlflow.db in the project, or its tracking server's address), or register a model "
            "with `make main`"
        )
    try:
        client = client or MlflowClient()  # opening a file that is no MLflow store raises here
        version = client.get_model_version_by_alias(name, match["alias"]) if match["alias"] else (
            client.get_model_version(name, match["version"])
        )
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code not in NOT_FOUND:  # a store that cannot be reached or read
            raise PredictError(
                f"the registry at {where} cannot be reached or read ({first_line(exc.message)}): check that it "
                f"is up and that {variable} names it"
            ) from exc
        raise PredictError(
            f"{uri} is not in the registry at {where}: {first_line(exc.message)}. "
            f"Set {variable} to the registry, or register a model with `make main`"
        ) from exc
    except Exception as exc:  # a file that is no MLflow store (a Git LFS pointer for mlflow.db): SQLAlchemy's error
        raise PredictError(
            f"the registry at {where} cannot be reached or read ({type(exc).__name__}: {first_line(str(exc))}): "
            f"check that it is up, that {variable} names it, and that it is an MLflow store (`git lfs pull` or "
            "`dvc pull` where it is kept as a pointer)"
        ) from exc
    # Loaded by its version, so the alias cannot move between the lookup and the load.
    try:
        model = ConsumerModel(f"models:/{name}/{version.version}")
    except ConsumerError as exc:
        raise PredictError(str(exc)) from exc
    if model.threshold is None:
        model.close()
        raise PredictError(
            f"{uri} is a {model.kind}, not a fracture classifier logged by this project's register step; "
            "give --model a version of one"
        )
    if model.policy is None:
        model.close()
        raise PredictError(
            f"{uri} (version {version.version}) was logged by a release of up to 2026-11-30: its model carries no "
            "input checks and stops at the first file it cannot read, where fracture predict gives every file a row. "
            "Load it with mlflow.pyfunc, or give --model a version logged since (the gate scores it as champion; "
            "`fracture rollback --to <version> --reason ...` serves a newer one)"
        )
    known = {f.name for f in dataclasses.fields(InputPolicy)}  # a version's policy may hold more, or less
    policy = InputPolicy.from_dict({k: v for k, v in model.policy.items() if k in known})
    return LoadedModel(uri, name, str(version.version), model, policy, model.threshold, version.run_id or "")


def collect(inputs: Iterable[Path]) -> list[Path]:
    """The files to score: each file given, and every file under each folder (sorted; hidden
    files and folders aside; linked folders walked, each once). Each becomes a row; what is not
    an image the model reads gets its reason there, as does what a folder holds that is no file
    to read (a link whose target is gone, a FIFO, a link back up the tree: :func:`_not_a_file`),
    rather than being left out unseen. Inputs that overlap (a folder and a folder or file inside
    it, one given twice) give each file once, where it came first: the same entry of the same
    folder, however the path to the folder is spelt, is one row.

    Raises:
        PredictError: an input does not exist.
    """
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files.extend(export_files(item, indexes=True, unreadable=True))
        elif item.exists() or item.is_symlink():  # a FIFO or a broken link named: a row saying so
            files.append(item)
        else:
            raise PredictError(f"{item} is neither a file nor a folder")
    seen: set[Path] = set()
    once = []
    for path in files:
        # The entry itself is not resolved: a link is a name of its own, as a folder's listing keeps it.
        entry = Path(os.path.realpath(path.parent)) / path.name
        if entry not in seen:
            seen.add(entry)
            once.append(path)
    return once


def _not_a_file(path: Path) -> str:
    """Why ``path`` is no regular file to read, or ``""`` when it is one (or when reading it will
    say why not): :func:`~fracture.decoding.not_a_regular_file`, and for a folder why it is a row."""
    why = not_a_regular_file(path)
    if why is not None:
        return why
    if cannot := unlistable(path):
        return f"the folder cannot be listed ({cannot}): its files are not scored"
    if path.is_symlink():
        return ("the folder is a link to a folder listed already (a second name for one), or to the folder "
                "scored or one above it (a loop): not walked again, so each file is a row once, under its "
                "first name, and none from outside the folder scored")
    return ("the folder was listed already under another name, through a link: each file is a row once, "
            "under its first name")


def _batches(files: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(files), size):
        yield files[start : start + size]


def _read(path: Path, policy: InputPolicy) -> tuple[bytes | None, str]:
    """The file's bytes, or ``None`` and why it was not read (empty, too large, unreadable, no file)."""
    if why := _not_a_file(path):
        return None, why
    try:
        data = read_file(path, policy)
    except InputRejected as exc:
        return None, f"the image {exc}"
    except OSError as exc:
        return None, f"the file cannot be read ({exc.strerror or type(exc).__name__})"
    if not data:
        # The model reads empty bytes as a row without an image; here the file is the row.
        return None, "the image is empty (the file holds no bytes)"
    return data, ""


def score_files(
    model: LoadedModel, files: list[Path], batch_size: int = 16, progress: bool = True,
    out: Path | None = None, resume: bool = False,
) -> pd.DataFrame:
    """Scores files a batch at a time through the model's pyfunc; one row per file, in order.

    With ``out`` (the ``--out`` the rows go to), each batch's scored rows are kept as they are
    scored in that file's journal (:class:`Journal`), which outlives a kill, a crash or a power cut.
    With ``resume``, a file the journal holds a row for, scored from the same bytes (its id and the
    sha256 of its bytes now) by the same model (name, version and the run that trained its weights),
    is not scored again: its row is taken over (counted in ``attrs``, :data:`RESUMED`). A row with
    an error is never kept, so its file is scored again; another model version scores every file.

    A file the model refuses gets its message in ``error`` (naming the file, not the batch
    row), and the other files of its batch are scored as usual. A batch is at most the rows the
    model takes in one request (its ``serve.max_rows``), whatever ``batch_size`` asks. The
    sha256 of the bytes each row was scored from is kept in the table's ``attrs``
    (:data:`SCORED_SHA256`), for :func:`write_structured_reports`, and so is the run that trained
    the model's weights (:data:`MODEL_RUN_ID`), which the reports name.

    When the run stops midway, the rows scored so far are kept, and every file left gets an error
    saying it was not scored, why, and to score it again; the reason is kept in ``attrs``
    (:data:`STOPPED`), so the caller writes the rows and then fails. It stops when the model's
    Python ends (killed for memory, a decoder crashing it; a file of that batch the model never
    got keeps its own reason), and on a ``KeyboardInterrupt`` (Ctrl-C; under :func:`interruptible`
    also SIGTERM), whose signal is kept too (:data:`INTERRUPTED`).
    """
    policy = model.policy
    parts: list[pd.DataFrame] = []
    digests: list[str] = []
    taken_over: list[bool] = []
    done = taken = 0  # the files parts holds a row for; the rows of them taken over from the journal
    stopped = interrupted = why = ""
    journal: Journal | None = None
    if resume and out is None:
        log.warning("--resume takes over the rows an earlier run wrote to --out, and none is named: every file is scored")
    elif resume and streamed(out):
        log.warning("--resume takes over the rows an earlier run kept beside --out, and %s is a stream, which keeps none: "
                    "every file is scored", out)
    with tqdm(total=len(files), unit="image", disable=not progress, desc="scoring") as bar:
        try:
            journal = Journal(out, model, files, resume) if out is not None and not streamed(out) else None
            earlier = journal.rows if journal is not None else {}
            for batch in _batches(files, max(1, min(batch_size, policy.max_rows))):
                frame, batch_digests, stopped, fresh = _score_batch(model, batch, earlier)
                parts.append(frame)
                digests += batch_digests
                done += len(batch)
                taken += int((frame["error"] == "").sum()) - len(fresh)
                taken_over += [not error and i not in fresh for i, error in enumerate(frame["error"])]
                bar.update(len(batch))
                if journal is not None:
                    journal.add(frame.iloc[fresh], [batch_digests[i] for i in fresh])
                if stopped:
                    why = _ended(stopped)
                    break
        except KeyboardInterrupt as exc:
            interrupted = getattr(exc, "signal_name", "SIGINT")
            stopped = f"interrupted by {interrupted}"
            why = f"the run was interrupted ({interrupted}{', Ctrl-C' if interrupted == 'SIGINT' else ''}) before this file's answer"
        finally:
            if journal is not None:
                journal.close()
    if taken:
        log.info("%s: %d of %d files were scored from the same bytes by %s version %s in an earlier run; their rows "
                 "are taken over from %s, not scored again (without --resume every file is scored)",
                 out, taken, len(files), model.name, model.version, journal.path if journal else "")
    if why and done < len(files):
        left = files[done:]
        parts.append(_not_scored(left, why))
        digests += [""] * len(left)
        taken_over += [False] * len(left)
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)
    table["threshold"], table["model"], table["version"] = model.threshold, model.name, model.version
    table = table[COLUMNS].copy()
    table.attrs[SCORED_SHA256] = digests
    table.attrs[MODEL_RUN_ID] = model.run_id
    if stopped:
        table.attrs[STOPPED] = stopped
    if interrupted:
        table.attrs[INTERRUPTED] = interrupted
    table.attrs[RESUMED] = taken
    table.attrs[TAKEN_OVER] = taken_over
    return table


def _score_batch(
    model: LoadedModel, batch: list[Path], earlier: dict[tuple[str, str], dict[str, Any]] | None = None,
) -> tuple[pd.DataFrame, list[str], str, list[int]]:
    """One batch's rows, the sha256 each was scored from, how the model's Python ended when it ended
    on this batch ("" when it answered), and which rows the model scored now without an error.

    A file whose id and bytes' sha256 ``earlier`` holds (:attr:`Journal.rows`) is not sent to the
    model: its row is the one kept there."""
    read = [_read(p, model.policy) for p in batch]
    ids = [shown(p) for p in batch]
    digests = [hashlib.sha256(data).hexdigest() if data is not None else "" for data, _ in read]
    frame = pd.DataFrame({"id": ids, "error": [shown(why) for _, why in read]})
    frame["fracture_probability"], frame["label"], frame["note"] = float("nan"), "", ""
    present: list[int] = []
    for i, (data, _) in enumerate(read):
        if data is None:
            continue
        kept = (earlier or {}).get((ids[i], digests[i]))
        if kept is None:
            present.append(i)
        else:
            frame.loc[i, ["fracture_probability", "label", "note"]] = [
                kept["fracture_probability"], kept["label"], kept["note"]
            ]
    if not present:
        return frame, digests, "", []
    try:
        out = model.model.predict(pd.DataFrame({"image": [read[i][0] for i in present]}), params={"on_error": "report"})
    except ConsumerError as exc:
        frame.loc[present, "error"] = not_scored(_ended(str(exc)))  # a file not read keeps its own reason
        return frame, [d if i not in present else "" for i, d in enumerate(digests)], str(exc), []
    for j, i in enumerate(present):
        row = out.iloc[j]
        # The model names the row of its request; here the file is the row.
        error = re.sub(r"^row \d+: ", "", str(row["error"]))
        frame.loc[i, ["fracture_probability", "label", "note", "error"]] = [
            row["fracture_probability"], row["label"], row["note"], error
        ]
    return frame, digests, "", [i for i in present if not frame["error"].iat[i]]


class Journal:
    """The rows of ``--out`` kept as they are scored, a JSON line each, in ``.<name>.scored.jsonl``
    beside it (:meth:`path_for`): what lets a run stopped before its end (a scheduler's SIGTERM, then
    its SIGKILL; Ctrl-C; a crash; a power cut) be run again with the same ``--out`` and score only the
    files it had not scored, where ``--out`` itself is written only once scoring is over.

    A line is a row the model scored without an error, with what makes it that file's answer: the
    file's id, the sha256 of the bytes it was scored from, and the model's name, version, threshold
    and the run that trained its weights. With ``resume``, opening it reads the rows an earlier run
    kept that this run can take over (:attr:`rows`: its model's, for a file it scores) and writes the
    journal again with only those, in a file of its own moved into place (a line a kill cut short is
    dropped there); without, it starts empty. This run's rows are then added a batch at a time, each
    batch flushed to disk before the next is scored. Every run with ``--out`` keeps one, so a run
    stopped without ``--resume`` can be resumed all the same; it stays once the run is over, so a
    folder scored again into the same ``--out`` with ``--resume`` (a day's new files) scores only
    what is new or changed.

    Two runs with one ``--out`` at once: the second finds the journal's lock (``.<name>.scored.lock``)
    held, and goes on without the journal (neither taking rows over nor keeping its own), with a
    warning. A journal that cannot be read or written (a full disk) costs only the resume: a warning,
    and scoring goes on.
    """

    def __init__(self, out: Path, model: LoadedModel, files: list[Path], resume: bool) -> None:
        self.path = self.path_for(out)
        #: The rows an earlier run kept that this run takes over, by the file's id and its bytes' sha256.
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}
        self.handle: io.TextIOWrapper | None = None
        self.model = model
        #: The permission bits of the journal and its lock: ``out``'s, else its owner's alone.
        self.mode = _mode_of(out)
        self.lock: BaseFileLock | None = FileLock(str(out.with_name(f".{out.name}.scored.lock")), mode=self.mode)
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            log.warning("%s: another fracture predict is writing these rows (it holds %s): this run neither takes "
                        "over the rows scored before nor keeps its own for a later run to take over",
                        out, self.lock.lock_file)
            self.lock = None
            return
        except (NotImplementedError, OSError) as exc:  # a share that cannot lock: the journal all the same
            log.warning("%s: the journal %s is kept without its lock (%s): a second run with this --out at the "
                        "same time would share it", out, self.path.name, getattr(exc, "strerror", None) or exc)
            self.lock = None
        if resume:
            self.rows = self._read(files)
        self._start()

    @staticmethod
    def path_for(out: Path) -> Path:
        """The journal of the rows written to ``out``."""
        return out.with_name(f".{out.name}.scored.jsonl")

    def _same_model(self, row: dict[str, Any]) -> bool:
        model = self.model
        return (row["model"], row["version"], row["run_id"], row["threshold"]) == (
            model.name, model.version, model.run_id, model.threshold)

    def _read(self, files: list[Path]) -> dict[tuple[str, str], dict[str, Any]]:
        wanted = {shown(path) for path in files}
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        others = 0
        try:
            with self.path.open("rb") as handle:
                for line in handle:
                    try:
                        row = json.loads(line)
                        key = (str(row["id"]), str(row["sha256"]))
                        same = self._same_model(row)
                        float(row["fracture_probability"]), str(row["label"]), str(row["note"])
                    except (ValueError, KeyError, TypeError):  # a line a kill cut short
                        continue
                    if not same:
                        others += 1
                    elif key[0] in wanted:
                        rows[key] = row
        except FileNotFoundError:
            return rows
        except OSError as exc:
            log.warning("%s cannot be read (%s): every file is scored", self.path, exc.strerror or exc)
            return {}
        if others:
            log.info("%s: %d rows were scored by another model, version or run than %s version %s: their files "
                     "are scored again", self.path, others, self.model.name, self.model.version)
        return rows

    def _start(self) -> None:
        try:
            # Readable as --out is, or by its owner alone where it is new: its ids are often patients' names.
            _replace(self.path, lambda partial: partial.write_text(
                "".join(json.dumps(row) + "\n" for row in self.rows.values()), encoding="utf-8"), self.mode)
            self.handle = self.path.open("a", encoding="utf-8")
        except OSError as exc:
            self._lost(exc)

    def _lost(self, exc: OSError) -> None:
        log.warning("%s cannot be written (%s): the rows of this run are not kept for a later run to take over",
                    self.path, exc.strerror or exc)
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.handle.close()
        self.handle = None

    def add(self, frame: pd.DataFrame, digests: list[str]) -> None:
        """Keeps rows the model scored now (``frame``'s, each scored from the bytes of its ``digests``)."""
        if self.handle is None or frame.empty:
            return
        model = self.model
        lines = "".join(json.dumps({
            "id": row.id, "sha256": digest, "model": model.name, "version": model.version, "run_id": model.run_id,
            "threshold": model.threshold, "fracture_probability": float(row.fracture_probability),
            "label": str(row.label), "note": str(row.note),
        }) + "\n" for row, digest in zip(frame.itertuples(index=False), digests, strict=True))
        try:
            self.handle.write(lines)
            self.handle.flush()
            os.fsync(self.handle.fileno())
        except OSError as exc:
            self._lost(exc)

    def close(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.handle.close()
            self.handle = None
        if self.lock is not None:
            with contextlib.suppress(OSError):
                self.lock.release()
            self.lock = None


def not_scored(why: str) -> str:
    """The error of a file left unscored when the run stopped (``why``): to score it again."""
    return f"not scored: {why}; score the file again"


def _ended(how: str) -> str:
    """Why a file is not scored when the model's Python ended (``how``: the consumer's error)."""
    return f"the model's Python ended before this file's answer ({how})"


def _not_scored(files: list[Path], why: str) -> pd.DataFrame:
    """The rows of files left unscored when the run stopped (:func:`not_scored`)."""
    frame = pd.DataFrame({"id": [shown(p) for p in files], "error": not_scored(why)})
    frame["fracture_probability"], frame["label"], frame["note"] = float("nan"), "", ""
    return frame


def check_outputs(out: Path | None, dicom_sr: Path | None) -> None:
    """Makes sure the rows and the reports can be written, before any file is scored: a typo in
    a path then costs seconds, not a night of scoring. Makes the report folder.

    Raises:
        PredictError: ``out``'s folder does not exist or cannot be written, ``out`` is a folder,
            or ``dicom_sr`` cannot be made or written into; the message names the path.
    """
    if out is not None:
        if out.is_dir():
            raise PredictError(f"--out {out} is a folder; name a .csv or .json file to write the rows to")
        folder = out.parent
        if not folder.is_dir():
            raise PredictError(f"--out {out}: the folder {folder} does not exist; make it, or name another file")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PredictError(f"--out {out}: the folder {folder} cannot be written to; name another file")
    if dicom_sr is not None:
        try:
            dicom_sr.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PredictError(
                f"--dicom-sr {dicom_sr}: the report folder cannot be made ({exc.strerror or exc}); name a folder"
            ) from exc
        if not os.access(dicom_sr, os.W_OK | os.X_OK):
            raise PredictError(f"--dicom-sr {dicom_sr}: the report folder cannot be written to; name another")


#: The first characters by which a spreadsheet (Excel, LibreOffice Calc) takes a cell for a formula
#: and runs it: OWASP's "CSV Injection". A file name, a DICOM value quoted in a note or an error
#: can start with one (``=HYPERLINK(...)``, ``-2+3``), and the CSV is opened by clinicians.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
#: What a text cell starting with one of :data:`FORMULA_STARTS` is written with before it, as OWASP
#: advises: a spreadsheet shows the cell as text, the apostrophe hidden. A cell that starts with it
#: already gets a second, so that removing one (:func:`from_cell`) always gives the value back.
TEXT_MARK = "'"


def to_cell(value: object) -> object:
    """A text value as a CSV cell that no spreadsheet runs as a formula: :data:`TEXT_MARK` before one
    starting with one of :data:`FORMULA_STARTS` or with the mark itself; anything else as it is."""
    if isinstance(value, str) and value.startswith((*FORMULA_STARTS, TEXT_MARK)):
        return TEXT_MARK + value
    return value


def from_cell(value: object) -> object:
    """The value a CSV cell :func:`to_cell` wrote holds: without its first :data:`TEXT_MARK`."""
    if isinstance(value, str) and value.startswith(TEXT_MARK):
        return value[len(TEXT_MARK):]
    return value


def _csv(table: pd.DataFrame, out: Path | io.TextIOBase, compression: str | None = None) -> None:
    """The table as CSV, safe to open in a spreadsheet (OWASP's CSV Injection advice): every text
    cell (``id``, ``label``, ``model``, ``version``, ``error``, ``note``, ``sr``) in double quotes, so
    that a spreadsheet splitting on another separator (``;`` in much of Europe) still reads it as one
    cell, and written by :func:`to_cell`; the numbers (probability, threshold) as they are."""
    safe = table.copy()
    for column in safe.columns:
        if column not in NUMBERS:
            safe[column] = safe[column].map(to_cell)
    safe.to_csv(out, index=False, quoting=csv.QUOTE_NONNUMERIC, compression=compression)


def write(table: pd.DataFrame, out: Path | None) -> None:
    """Writes the table as CSV, or JSON records when ``out`` ends in ``.json``; stdout CSV without ``out``.

    A CSV's text cells are written safe to open in a spreadsheet (:func:`_csv`): one that starts with
    ``=``, ``+``, ``-``, ``@``, a tab, a carriage return or an apostrophe has an apostrophe before it,
    which :func:`read_rows` removes. JSON holds every value as it is.
    """
    if out is None:
        text = io.StringIO()
        _csv(table, text)
        print(text.getvalue(), end="")
    elif out.suffix.lower() == ".json":
        # Not DataFrame.to_json, which rounds numbers to 10 digits: the probabilities and the
        # threshold in full (the shortest text that reads back as the same float), as CSV,
        # model.predict and the served model give them; a missing value is null.
        records = table.astype(object).where(table.notna(), None).to_dict(orient="records")
        text = json.dumps(records, indent=2)
        if streamed(out):
            out.write_text(text)
        else:
            _replace(out, lambda partial: partial.write_text(text))
    else:
        # Compressed as its name says (rows.csv.gz, .zip, .bz2, .xz, .zst), as pandas writes it.
        compression = infer_compression(str(out), "infer")
        if streamed(out):
            _csv(table, out, compression)
        else:
            _replace(out, lambda partial: _csv(table, partial, compression))


def streamed(out: Path) -> bool:
    """Whether ``out`` is no file to replace but a stream to write into: ``/dev/stdout``, a FIFO, a
    shell's process substitution (``>(gzip > rows.csv.gz)``), anything under ``/dev`` or ``/proc``.
    Such an ``out`` is written as it is, and gets no :class:`Journal` beside it."""
    if os.path.realpath(out).startswith(("/dev/", "/proc/")):
        return True
    try:
        return not stat.S_ISREG(os.stat(out).st_mode)
    except FileNotFoundError:
        return False
    except OSError:
        return True


def _mode_of(out: Path) -> int:
    """``out``'s permission bits, for the files kept beside it; its owner's read and write alone where it is new."""
    try:
        return stat.S_IMODE(os.stat(out).st_mode) & 0o666 or 0o600
    except OSError:
        return 0o600


def _replace(out: Path, fill: Any, mode: int | None = None) -> None:
    """Writes ``out`` whole or not at all: ``fill(partial)`` writes it beside, under a name of its own
    (``.<name>.<random>.partial``), synced to disk and moved into place, so a run killed meanwhile
    leaves the earlier ``out`` as it was (the rows it scored are in its :class:`Journal`), never a
    file cut short that a reader takes for every row. Written through a link, as a link's file, and
    readable as the file it replaces was, or with the permission bits ``mode`` where they are given."""
    target = Path(os.path.realpath(out))
    partial = target.with_name(f".{target.name}.{secrets.token_hex(8)}.partial")
    try:
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if mode is not None else 0o666))
        if mode is not None:
            os.chmod(partial, mode)
        else:  # a new file as the umask says; the file it replaces as that one was
            with contextlib.suppress(OSError):
                os.chmod(partial, stat.S_IMODE(os.stat(target).st_mode))
        fill(partial)
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, target)
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)


def read_rows(path: str | os.PathLike[str] | io.StringIO) -> pd.DataFrame:
    """The rows :func:`write` wrote, each cell as it was before it was written: a CSV's text cells
    without the apostrophe that keeps a spreadsheet from running them (:func:`from_cell`), and
    empty text where a row has none; the numbers as numbers (NaN where a row has none).

    Args:
        path: the CSV or JSON file (JSON when it ends in ``.json``), or CSV text.
    """
    path = Path(path) if isinstance(path, (str, os.PathLike)) else path
    if isinstance(path, Path) and path.suffix.lower() == ".json":
        table = pd.DataFrame.from_records(json.loads(path.read_text()))
        texts = [c for c in table.columns if c not in NUMBERS]
        table[texts] = table[texts].astype(object).where(table[texts].notna(), "")
        return table
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in table.columns:
        if column in NUMBERS:
            # Python's float of the text, which reads the shortest text of a float back as that float.
            table[column] = [float(v) if v else float("nan") for v in table[column]]
        else:
            table[column] = table[column].map(from_cell)
    return table


def wants_report(table: pd.DataFrame, files: list[Path]) -> list[bool]:
    """Which rows :func:`write_structured_reports` makes a report for: those scored whose file is
    DICOM (one that cannot be read again counts, as it costs its row the report)."""

    def dicom(path: Path) -> bool:
        try:
            with path.open("rb") as handle:
                return is_dicom(handle.read(132))
        except OSError:
            return True

    return [not error and dicom(path) for path, error in zip(files, table["error"], strict=True)]


def write_structured_reports(
    table: pd.DataFrame, files: list[Path], folder: Path, uid_root: str | None = None,
) -> list[str]:
    """Writes a DICOM SR (:mod:`fracture.dicom_sr`) for each scored DICOM input; returns the paths, one per row.

    Rows that were not scored, or whose file is not DICOM, get an empty path. Each report is
    named after the source image's SOP Instance UID (``<uid>.sr.dcm``), or, when that is not a
    valid UID (a name that is not one could lead outside ``folder``) or names another report of
    this call (a clash), after a UID derived from the file's bytes (:func:`_content_name`), so a
    rerun finds and replaces it there too rather than leaving it beside a new one; a report never
    replaces one written in this call. A report an earlier call wrote there for the same
    image (its evidence names the image's SOP Instance UID, under the same study and patient, the
    Patient ID's issuer included where both name one: :func:`_reports_on`) is replaced, and the new one lists it as its predecessor (Predecessor
    Documents Sequence), so a PACS holding both knows which is current. One an earlier call
    wrote there for another image (an anonymiser's constant UID on another day's patient) is
    kept, and this image's report is named after its bytes instead, its row's note saying so. One
    that is damaged (empty, not DICOM, cut short, without its UIDs, evidence or findings, or
    deflated and inflating past the bound a deflated input is read within: :func:`_earlier_report`) is not written over: it is moved aside as ``<name>.damaged``
    (:func:`_set_aside`) and the new report takes its name, naming it as its predecessor only when
    what is left of it shows it is on this image; the row's note names the file and why it was not
    read, and a damaged report that cannot be moved aside costs this row its report, not the file.
    Runs writing into one folder at the same time (a batch re-run while the first still goes) take
    turns report by report: each holds the folder's lock (:data:`REPORT_LOCK`, :class:`_FolderLock`)
    from its look at what is at a report's name to its report's move into place, so the second finds
    the first's report whole there and replaces it, naming it as its predecessor (the same image), or
    keeps it and names its own after the file's bytes (another image under the same UID), and a
    damaged report is moved aside once. A row whose run waits for the folder in vain
    (:data:`REPORT_LOCK_SECONDS`, then :data:`REPORT_LOCK_RETRY_SECONDS` until it has it again) gets
    no report, its note saying to score the file again; a folder whose file system cannot lock, or
    whose lock file cannot be opened, gets its reports without the lock, with a warning in the log
    (:class:`_FolderLock`); one whose lock fails report by report with an error that passes (NFS's
    lock service), a warning for each kind of error and a count of those reports. There, and
    against a run of an earlier version, which does not lock, a damaged report that the other run
    moved aside first, to put its own report for the image in its place, costs this row its report.
    A report is written beside, under a temporary name of its own, and moved into place: one a run
    stopped by Ctrl-C leaves is removed, and so is one a killed run left once it is old
    (:func:`_remove_stale_partials`); the lock file stays.
    The reports of one patient's study in one call form one SR series, numbered in order and dated
    when the call began (two patients under an anonymiser's constant study UID get a series each);
    a report tracks its finding by a UID derived from the image, so the report that replaces it
    tracks the same finding (:func:`fracture.dicom_sr.tracking_uid`). A file holding
    an image already reported in this call (the same valid SOP Instance UID, study and patient
    (Patient ID and its issuer), scored alike: one image exported twice) gets no second report: its
    row points to the first's, and its note says so. Files that share a UID but differ (another
    study, patient or answer: an anonymiser's constant UID, a clash, one image exported before and
    after a patient correction) each get their own report. A source the report cannot be made for (a header without the
    study's UID, say) or written for (a full disk) gets no report, its reason in the row's
    ``note``, and the other rows theirs. A patient or study value the SR cannot carry is left
    empty or out there (a Patient ID or Accession Number, by which the PACS files the report, is
    kept), and the row's note names it (:func:`fracture.dicom_sr.invalid_value_notes`).
    A table :func:`score_files` made knows the bytes each row was scored from (:data:`SCORED_SHA256`):
    a file that holds other bytes by the time its report is made (a folder a PACS router writes into
    under reused names, IM0001 now another patient's image) gets no report, its note saying to score
    it again, and every report is made from the bytes checked, read once. Such a table also
    names the MLflow run that trained the model's weights (:data:`MODEL_RUN_ID`), and the reports
    name it (:func:`fracture.dicom_sr.structured_report`). Every UID the reports make, their series'
    included, is made under ``uid_root`` (``--sr-uid-root``) where one is given.
    """
    from pydicom import dcmread  # noqa: PLC0415 - only --dicom-sr needs it here
    from pydicom.uid import UID  # noqa: PLC0415

    from fracture.dicom_sr import (  # noqa: PLC0415
        invalid_value_notes,
        new_uid,
        pixel_digest,
        series_description,
        structured_report,
    )

    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(folder)
    folder_lock = _FolderLock(folder)
    # What costs a row its report (a header without the study's UID, a file that cannot be read again).
    unreportable = (AttributeError, KeyError, ValueError, TypeError, OSError)
    written: list[str] = []
    names: set[str] = set()
    # One SR series per patient and study in this call, its reports numbered in order: two patients
    # under one study UID (an anonymiser's constant one) are two series, never one of both. Each
    # series is dated when this call began (Series Date and Time), so a rerun's series is told from
    # the one it replaces.
    series: dict[tuple[tuple[str, str], str], str] = {}
    numbers: dict[tuple[tuple[str, str], str], int] = {}
    began = datetime.datetime.now().astimezone()  # with its zone: a report in another's converts it
    # The file and report of each source image reported in this call, by its SOP Instance UID, with
    # what a second copy must match to be the same image: its study, its patient and its row's answer.
    reported: dict[str, tuple[Path, Path, tuple[Any, ...]]] = {}

    def add_note(index: int, text: str) -> None:
        # The table's note as it is now, not the row's as the loop read it: a row may get several.
        column = table.columns.get_loc("note")
        note = table.iat[index, column]
        table.iat[index, column] = "; ".join(filter(None, [note if isinstance(note, str) else "", shown(text)]))

    def no_report(index: int, path: Path, reason: str) -> None:
        log.warning("%s: %s: %s", path, NO_REPORT, reason)
        add_note(index, f"{NO_REPORT}: {reason}")
        written.append("")

    scored = table.attrs.get(SCORED_SHA256)
    taken_over = table.attrs.get(TAKEN_OVER) or [False] * len(table)
    run_id = str(table.attrs.get(MODEL_RUN_ID) or "")
    try:
        for index, (path, row) in enumerate(zip(files, table.itertuples(index=False), strict=True)):
            if row.error:  # not scored: its row already says why
                written.append("")
                continue
            try:
                data = path.read_bytes()
            except OSError as exc:  # gone or locked since it was scored
                no_report(index, path, f"the file cannot be read again ({type(exc).__name__})")
                continue
            digest = hashlib.sha256(data).hexdigest()
            if scored is not None and scored[index] != digest:
                no_report(index, path, "the file changed since it was scored (it holds other bytes "
                          "now, another image perhaps); this row's answer is the earlier file's: score the file again")
                continue
            if not is_dicom(data[:132]):
                written.append("")
                continue
            try:
                # is_dicom said it is DICOM, preamble or not; read from the bytes checked, not the file again.
                # With its pixel data, whose digest tells apart the findings on two images under one UID.
                source = dcmread(io.BytesIO(data), force=True)
                pixels = pixel_digest(source)  # decoded once: the finding's UID, and what an earlier report is on
                study = str(source.StudyInstanceUID)
                uid = str(source.get("SOPInstanceUID", ""))
                # The patient too: one image exported before and after a patient correction (the same
                # UID, study and pixels under another Patient ID) is each patient's, each with its report.
                # Its issuer counts where both copies name one, as for an earlier run's report (_reports_on).
                patient, issuer = str(source.get("PatientID", "")), str(source.get("IssuerOfPatientID") or "").strip()
                same = (study, patient, issuer, row.fracture_probability, row.label, row.threshold, row.model, row.version,
                        pixels)
                if UID(uid).is_valid and uid in reported and _same_source(reported[uid][2], same):
                    first, report, _ = reported[uid]
                    add_note(index, f"the same image (SOP Instance UID) as {first}, whose report {report.name} is this row's")
                    written.append(shown(report))
                    continue
                # Named after the source image unless its UID is invalid or already named a report of this call.
                own = f"{uid}.sr.dcm" if UID(uid).is_valid and f"{uid}.sr.dcm" not in names else None
                name = own or _content_name(digest, names)
                invalid = invalid_value_notes(source)
            except unreportable as exc:
                no_report(index, path, str(exc))
                continue
            # From the look at what is at the report's name to its move into place, this run holds the
            # folder (:class:`_FolderLock`): another run writing into it at the same time waits, then
            # finds this one's report whole in place, never one half put there.
            with contextlib.ExitStack() as holding:
                waits = folder_lock.wait
                try:
                    holding.enter_context(folder_lock.held())
                except Timeout:
                    no_report(index, path, f"another run writing into {folder} at the same time "
                              f"held the folder ({REPORT_LOCK}) through the {waits:g} s this run waited for "
                              "it; score this file again")
                    continue
                try:
                    # A report an earlier run wrote for this image is superseded, and says so. One written
                    # there for another image (an anonymiser's constant UID on another day's patient) is
                    # that image's: kept, and this one named after the file's bytes instead.
                    # A damaged one (cut short, not DICOM, or without what tells which image it is on) is
                    # neither; it is moved aside, not written over, once this one is ready to take its name.
                    others: list[str] = []
                    replaces, damaged = None, ""
                    while (folder / name).is_file():
                        earlier, damaged = _earlier_report(folder / name)
                        if earlier is not None and all(k in earlier for k in REPORT_UIDS) and _reports_on(earlier, source, uid_root, pixels):
                            replaces = earlier
                            break
                        if damaged:
                            break
                        others.append(name)
                        name = _content_name(digest, names | set(others))
                    # A row taken over with --resume (the same bytes, model, version and run as the earlier
                    # run's) whose report that run wrote is here, on this image, from this version: kept as
                    # it is. Written again, every image of a folder scored day after day into one --out
                    # would go to the PACS again each day, each report superseding the same answer.
                    kept = (taken_over[index] and replaces is not None and not damaged
                            and str(replaces.get("SeriesDescription", "")) == series_description(str(row.model), str(row.version)))
                    if kept:
                        sr = None
                    else:
                        key = (patient, study)
                        number = numbers.get(key, 0) + 1
                        sr = structured_report(
                            source, float(row.fracture_probability), float(row.threshold), row.label == "fractured",
                            str(row.model), str(row.version),
                            series_uid=series.setdefault(key, new_uid(uid_root)), instance_number=number,
                            replaces=replaces, run_id=run_id, series_datetime=began, uid_root=uid_root, pixels=pixels,
                        )
                        numbers[key] = number
                except unreportable as exc:
                    no_report(index, path, str(exc))
                    continue
                target = folder / name
                aside: Path | None = None
                if sr is None:
                    add_note(index, f"its report from the earlier run, {name}, is kept (the row was taken over with --resume)")
                else:
                    # Written beside and moved into place: a run stopped midway leaves the earlier report whole.
                    # Under a name of its own, so that another run writing this report into the folder at the
                    # same time (a batch re-run while the first still goes) neither writes into nor moves it.
                    # Removed here whatever stops this run (a full disk, Ctrl-C); one a killed run leaves is
                    # removed by a later run once it is old (:func:`_remove_stale_partials`).
                    partial = target.with_name(f".{name}.{secrets.token_hex(8)}.partial")
                    moving = False
                    try:
                        sr.save_as(partial, enforce_file_format=True)
                        moving = bool(damaged)
                        aside = _set_aside(target) if damaged else None
                        moving = False
                        os.replace(partial, target)
                    except _MovedMeanwhile as exc:
                        # The name is left to the other run: this one's report would either write over that
                        # run's or stand beside it as a second current report, neither naming the other.
                        numbers[key] -= 1
                        no_report(index, path, f"the earlier report {target} is damaged ({damaged}), and "
                                  f"another run writing into {folder} at the same time moved it aside first; the name is "
                                  "left to that run's report, so score this file again if none is there" + (
                                      f"; that run's report, taken for the damaged one, is kept as {exc.kept.name}"
                                      if exc.kept else ""))
                        continue
                    except OSError as exc:  # a full disk, a report folder gone: this row's report, not the run
                        numbers[key] -= 1
                        reason = exc.strerror or exc
                        if moving:
                            no_report(index, path, f"the earlier report {target} is damaged ({damaged}) "
                                      f"and cannot be moved aside ({reason}), so it is left as it is")
                        else:
                            no_report(index, path, f"it cannot be written to {target} ({reason})" + (
                                f"; the damaged earlier report there ({damaged}) is kept as {aside.name}" if aside else ""))
                        continue
                    finally:
                        with contextlib.suppress(OSError):  # this run's own file; gone once moved into place
                            partial.unlink(missing_ok=True)
            names.add(name)
            if uid in reported:  # a UID two different images carry: the row says why its report is apart
                add_note(index, f"shares its SOP Instance UID with {reported[uid][0]}, but not its study, patient or answer: "
                         f"reported apart, as {name}")
            elif uid:
                reported[uid] = (path, target, same)
            if others:
                add_note(index, f"an earlier report on another image (its source, study or patient differs) is "
                         f"{' and '.join(others)} in {folder}: kept, and this one written as {name}")
            if aside is not None:
                log.warning("%s: the earlier report is damaged (%s); kept as %s", target, damaged, aside.name)
                add_note(index, f"the earlier report {name} in {folder} is damaged ({damaged}): kept as {aside.name}, "
                         "and this one written in its place, " + (
                             "naming it as its predecessor" if replaces is not None else
                             "not naming it as its predecessor, as what is left of it does not show it is on this image"
                         ))
            for note in invalid:
                add_note(index, note)
            written.append(shown(target))
    except Interrupted as exc:  # Ctrl-C or SIGTERM: the rows are written all the same, these without a report
        table.attrs[INTERRUPTED] = exc.signal_name
        table.attrs[REPORTS_INTERRUPTED] = True
        for index in range(len(written), len(table)):
            if not table["error"].iat[index]:
                add_note(index, f"{NO_REPORT}: the run was interrupted by {exc.signal_name} before it was "
                         "written; score the file again with --dicom-sr")
            written.append("")
    folder_lock.tell_unlocked()
    return written


#: The report folder's lock file, held by a run from its look at what is at a report's name to its
#: report's move into place (:class:`_FolderLock`): hidden, and named so that no ``*.dcm`` pattern
#: sending the folder to a PACS picks it up. It stays in the folder once the run is done.
REPORT_LOCK = ".fracture-sr.lock"
#: How long a run waits for another run writing into the same folder to let go of it before the
#: row gets no report: a run holds the folder for one report at a time, a fraction of a second.
REPORT_LOCK_SECONDS = 120.0
#: How long a run waits for the folder for each of its later reports once one wait ran out: a run
#: stuck holding it (on a slow share) costs the run one full wait, not one per row.
REPORT_LOCK_RETRY_SECONDS = 5.0
#: Why a lock cannot be had in a folder for as long as the run goes on: its file system has no
#: ``flock``, or the lock file cannot be made or opened (read-only, a link planted there, another
#: account's). Any other error (a network file system's lock service busy a moment) costs only
#: the report it came on the lock, and the next one tries again.
_CANNOT_LOCK = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EACCES, errno.EPERM, errno.ELOOP,
                          errno.EROFS})


class _FolderLock:
    """The report folder's operating-system lock (:data:`REPORT_LOCK`, ``filelock``'s), held for one
    report at a time, never for a whole run: two runs writing into one folder at the same time (a
    batch re-run while the first still goes) take turns report by report, so each looks at what is
    at a report's name only once the other's report there is whole, and names it as its predecessor
    or keeps it. A run that dies, even killed, lets go of it. A run waits for it
    :data:`REPORT_LOCK_SECONDS`, and once such a wait ran out, :data:`REPORT_LOCK_RETRY_SECONDS` for
    each later report, until it has the folder again.

    A folder whose file system cannot lock (no ``flock``: some network shares), or where the lock
    file cannot be made or opened (:data:`_CANNOT_LOCK`), gets its reports all the same, without the
    lock, and one warning in the log. An error of another kind (NFS's lock service: ENOLCK) costs
    only the report it came on the lock, and the next report tries again. The log warns of each
    such error once a run, not once a report (a share mounted without its lock service fails every
    report of a batch of thousands), and counts the reports that went without the lock (written or not), by error:
    when the lock is held again (said once a run), and at the end of the run for those not counted
    there (:meth:`tell_unlocked`). The claims by rename and hard link (:func:`_set_aside`) still
    keep a damaged report whole, as they do against versions of this product that do not lock. In a
    folder with the sticky bit (``/tmp``'s mode, some shared drop boxes) filelock takes a lock file
    only from this account or the folder's owner, since another account could replace it while it
    is held: there the folder's owner makes it once for every account (the warning says how: remove
    the other account's, then create it and open it to all).
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / REPORT_LOCK
        self.works = True
        self.wait = REPORT_LOCK_SECONDS
        # The reports of this run written without the lock for an error that passes, by its reason;
        # the errors warned of; how many of those reports the log told of; and whether it said the
        # lock is held again, which it says once a run.
        self.unlocked: Counter[str] = Counter()
        self.warned: set[int | None] = set()
        self.told = 0
        self.back = False

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Holds the folder for the block (without the lock where it cannot be had here).

        Raises:
            filelock.Timeout: another run held the folder for as long as this run waits for it.
        """
        lock = self._take()
        try:
            yield
        finally:
            if lock is not None:
                try:
                    lock.release()
                except OSError as exc:  # the report is in place; a network file system's lock service may fail here
                    # Closing the lock file lets go of the lock wherever the kernel still holds it, so the
                    # next report (and other runs) need not wait for this run to end. filelock keeps the
                    # descriptor when the unlock fails and offers no public way to close it.
                    fd = getattr(getattr(lock, "_context", None), "lock_file_fd", None)
                    if isinstance(fd, int):
                        with contextlib.suppress(OSError):
                            os.close(fd)
                    log.warning("%s: the folder's lock %s could not be let go of (%s); its file is closed, which lets "
                                "go of it", self.path.parent, REPORT_LOCK, exc.strerror or exc)

    def _take(self) -> BaseFileLock | None:
        if not self.works:
            return None
        # A lock of its own each time, which a second call in this process waits for as another
        # run's does. Writable by every account (whatever its umask), so that another account's
        # run in a shared folder without the sticky bit can take it. Not filelock's soft lock where
        # flock is missing: a marker file, which a run on another machine that dies leaves holding
        # the folder.
        lock = FileLock(str(self.path), mode=0o666, fallback_to_soft=False)
        try:
            lock.acquire(timeout=self.wait)
        except Timeout:
            self.wait = REPORT_LOCK_RETRY_SECONDS
            raise
        except (NotImplementedError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            risk = ("another run writing reports into the folder at the same time may write over one of this run's, "
                    "or this run over one of its, without naming it as its predecessor")
            if isinstance(exc, OSError) and exc.errno not in _CANNOT_LOCK:
                if exc.errno not in self.warned:
                    self.warned.add(exc.errno)
                    log.warning("%s: a report written without holding the folder's lock %s (%s): %s",
                                self.path.parent, REPORT_LOCK, reason, risk)
                self.unlocked[reason] += 1
                return None
            self.works = False
            sticky = ""
            with contextlib.suppress(OSError):
                folder = self.path.parent.stat()
                if folder.st_mode & stat.S_ISVTX and self.path.lstat().st_uid not in (os.geteuid(), folder.st_uid):
                    sticky = (f"; in a folder with the sticky bit, the folder's owner makes the lock file once for "
                              f"every account: rm -f {self.path} && touch {self.path} && chmod 666 {self.path}")
            log.warning("%s: reports written without holding the folder's lock %s (%s): %s%s",
                        self.path.parent, REPORT_LOCK, reason, risk, sticky)
            return None
        self.wait = REPORT_LOCK_SECONDS
        if not self.back and self.told < self.unlocked.total():
            self.back = True
            log.info("%s: the folder's lock %s is held again; %s", self.path.parent, REPORT_LOCK, self._count())
            self.told = self.unlocked.total()
        return lock

    def tell_unlocked(self) -> None:
        """Logs, at the end of the run, how many of its reports were written without the folder's lock
        for an error that passes, and why, unless the log told of them all when the lock was held again."""
        if self.told < self.unlocked.total():
            log.warning("%s: %s", self.path.parent, self._count())
            self.told = self.unlocked.total()

    def _count(self) -> str:
        total = self.unlocked.total()
        return (f"{total} of this run's reports went without the folder's lock {REPORT_LOCK} (" +
                "; ".join(f"{reason}: {count}" for reason, count in self.unlocked.items()) + ")")


#: How old (by its modification time) a report's temporary file must be for a run to remove it as
#: one a run stopped before moving it into place (a kill, a power cut) left, not as one a run still
#: going is writing: a run moves its file into place as soon as it is written, within seconds.
STALE_PARTIAL_SECONDS = 3600
#: A report's temporary file (``.<name>.<random>.partial``; ``.<name>.partial`` from earlier versions).
_PARTIAL = re.compile(r"\..+\.sr\.dcm(?:\.[0-9a-f]{16})?\.partial")


def _remove_stale_partials(folder: Path) -> None:
    """Removes from ``folder`` the reports' temporary files that runs stopped before moving them into
    place left there (a run stopped by Ctrl-C removes its own), once they are
    :data:`STALE_PARTIAL_SECONDS` old; nothing else, a damaged report kept aside included. One
    that cannot be removed (another user's) is left, and a folder this user may write in but not
    list (a drop box) is not swept: the reports are written all the same."""
    removed = 0
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        log.info("%s: not swept for reports' temporary files left by stopped runs (%s)", folder, exc.strerror or exc)
        return
    for entry in entries:
        with contextlib.suppress(OSError):  # removed by another run meanwhile, or not this user's
            if (_PARTIAL.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)
                    and now - entry.stat(follow_symlinks=False).st_mtime > STALE_PARTIAL_SECONDS):
                os.unlink(entry.path)
                removed += 1
    if removed:
        log.info("%s: removed %d report file(s) left half written by runs stopped over %d s ago",
                 folder, removed, STALE_PARTIAL_SECONDS)


def _content_name(digest: str, taken: set[str]) -> str:
    """The report's file name for a source whose SOP Instance UID cannot name it (invalid, or
    already naming another report of this call): a UID derived from the file's bytes (``digest``,
    their sha256), the same on every run over the same file, so a rerun replaces the report instead
    of leaving an orphan that a PACS would hold as a second current finding. Files with the same
    bytes (one image exported twice under an invalid UID) are told apart by their order in the
    call, which is the folder's sorted order, and so the same on every run.
    """
    from pydicom.uid import generate_uid  # noqa: PLC0415 - only --dicom-sr needs it here

    copy = 0
    while (name := f"{generate_uid(entropy_srcs=['fracture structured report', digest, str(copy)])}.sr.dcm") in taken:
        copy += 1
    return name


def _reports_on(report: Any, source: Any, uid_root: str | None = None, pixels: str | None = None) -> bool:
    """Whether an earlier report is on ``source``: its evidence names the source's SOP Instance
    UID, and it is filed under the source's study and patient. A file named after the UID is not
    enough: an anonymiser writes one constant UID on every image, so another day's patient's
    report can sit there, which this image's must neither replace nor name as its predecessor.
    The patient is the Patient ID under its Issuer of Patient ID when both name one: one ID two
    hospitals each gave (a merged archive) is two patients; an issuer on one side only does not
    tell them apart (an export that leaves it out).

    And its finding is tracked as this image's: an anonymiser that writes one constant UID, study and
    patient on every image gives two images the same of all the above, and the finding's Tracking UID
    (:func:`fracture.dicom_sr.tracking_uid`, from the decoded pixels, ``pixels``) tells them apart. A
    Tracking UID the report's own model would give this image, under ``uid_root`` or pydicom's root,
    from its pixels or, for a report of a release before the pixels counted, without them. A report
    with no Tracking UID (another writer's) is judged by the UIDs alone."""
    from fracture.dicom_sr import finding_tracked, tracking_uid  # noqa: PLC0415

    uid = str(source.get("SOPInstanceUID", ""))
    referenced = {
        str(sop.get("ReferencedSOPInstanceUID", ""))
        for study in report.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for sop in series.get("ReferencedSOPSequence", [])
    }
    issuers = [str(ds.get("IssuerOfPatientID") or "").strip() for ds in (report, source)]
    if not (
        uid in referenced
        and str(report.get("StudyInstanceUID", "")) == str(source.get("StudyInstanceUID", ""))
        and str(report.get("PatientID", "")) == str(source.get("PatientID", ""))
        and (not all(issuers) or issuers[0] == issuers[1])
    ):
        return False
    tracked = finding_tracked(report)
    if tracked is None:
        return True
    finding, algorithm = tracked
    pixels = pixels if pixels is not None else ""
    forms = set()
    for issuer in {issuers[1], issuers[0]}:  # an issuer named on one side only tells no patients apart
        named = source.copy()  # the header's elements, shared; the pixels' digest is given
        named.IssuerOfPatientID = issuer
        forms |= {tracking_uid(named, algorithm, root, digest) for root in {uid_root, None} for digest in {pixels, ""}}
    return finding in forms


#: The UIDs by which a report names the one it replaces as its predecessor.
REPORT_UIDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
#: What an earlier report must hold to be whole: its UIDs; its evidence, which tells which image it
#: is on (:func:`_reports_on`); its findings, the last of its elements.
REPORT_PARTS = (*REPORT_UIDS, "CurrentRequestedProcedureEvidenceSequence", "ContentSequence")
UNDEFINED_LENGTH = 0xFFFFFFFF


def _same_source(one: tuple[Any, ...], other: tuple[Any, ...]) -> bool:
    """Whether two copies in one call are one image with one answer: ``(study, Patient ID, Issuer of
    Patient ID, answer...)`` equal, the issuers compared only where both name one (:func:`_reports_on`)."""
    issuers = (one[2], other[2])
    return one[:2] == other[:2] and one[3:] == other[3:] and (not all(issuers) or issuers[0] == issuers[1])


def _earlier_report(path: Path) -> tuple[Any, str]:
    """The report an earlier run left at ``path``, and why it is damaged (``""`` when it is whole).

    Damaged: empty, not DICOM, cut short, without one of :data:`REPORT_PARTS`, or deflated and
    inflating past the bound every DICOM input is read within (:func:`_read_report`). pydicom reads a
    file cut short without a word when the cut falls between its elements or inside one of defined
    length, and gives what it read: here a file is whole only when every element it holds is as
    long as it says and its findings, the last of its elements, are there. What is left of a
    damaged one (its elements that still read) comes with the reason, so a report whose evidence
    still shows it is on the same image is named as the predecessor of the one that replaces it;
    ``None`` when nothing of it can be read.
    """
    from pydicom import config  # noqa: PLC0415
    from pydicom.dataelem import RawDataElement  # noqa: PLC0415
    from pydicom.errors import InvalidDicomError  # noqa: PLC0415

    try:
        if path.stat().st_size == 0:
            return None, "it is empty"
        with config.strict_reading():  # an undefined length cut short raises, rather than warns
            report = _read_report(path)
        short = [
            tag for tag in report.keys()  # noqa: SIM118 - iterating a Dataset gives its elements, read
            if isinstance(raw := report.get_item(tag), RawDataElement) and raw.length != UNDEFINED_LENGTH
            and raw.value is not None and len(raw.value) != raw.length
        ]
        if short:
            raise EOFError(f"the element {short[-1]} is cut short")
        missing = [keyword for keyword in REPORT_PARTS if keyword not in report]
    except InvalidDicomError:
        return None, "it is not a DICOM file"
    except DicomRejected as exc:  # deflated: a decompression bomb, or deflate data cut short
        return None, f"it {exc}".rsplit("; ", 1)[0]  # without the advice to the sender of an image
    except EOFError:
        why = "it is cut short"
    except Exception as exc:  # noqa: BLE001 - a damaged file's bytes can fail pydicom anywhere
        message = str(exc).splitlines()[0] if str(exc) else ""
        why = f"it cannot be read as DICOM ({type(exc).__name__}: {message[:100]})"
    else:
        if not missing:
            return report, ""
        return report, f"it has no {', '.join(missing)}"
    return _what_is_left(path), why


def _read_report(path: Path) -> Any:
    """``dcmread(path, stop_before_pixels=True)`` of a report found in the report folder, but one
    deflated (Deflated Explicit VR Little Endian) is inflated within the bound every DICOM input is
    (:func:`fracture.dicom.max_inflated`), not whole as pydicom inflates it: a small file planted
    there must not inflate to gigabytes. Nor is a large one read whole to be inflated: a file larger
    than any deflate data inflating within the bound (:func:`_deflated_bound`) is refused unread.

    Raises:
        DicomRejected: it is deflated and inflates past that bound, or its deflate data is damaged.
    """
    from pydicom import dcmread  # noqa: PLC0415
    from pydicom.filereader import read_file_meta_info  # noqa: PLC0415
    from pydicom.uid import DeflatedExplicitVRLittleEndian  # noqa: PLC0415

    from fracture import dicom  # noqa: PLC0415 - the bounded inflating read of fracture.dicom

    try:
        deflated = read_file_meta_info(path).get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    except Exception:  # noqa: BLE001 - not DICOM, or its meta damaged: dcmread says which below
        deflated = False
    if not deflated:
        return dcmread(path, stop_before_pixels=True)
    limit = dicom.max_inflated(dicom.MAX_PIXELS)  # read at each call, as fracture.dicom reads it
    bound = _deflated_bound(limit)
    with path.open("rb") as handle:
        # Its size first, and then no more than the bound read, should it grow meanwhile.
        too_large = os.fstat(handle.fileno()).st_size > bound
        data = b"" if too_large else handle.read(bound + 1)
    if too_large or len(data) > bound:
        raise DicomRejected(
            f"is deflated (transfer syntax {DeflatedExplicitVRLittleEndian}) and holds more than {bound / 1e6:.0f} MB, "
            f"so it inflates to more than the {limit / 1e6:.0f} MB a deflated dataset is read within"
        )
    return dicom.parse_bytes(data, stop_before_pixels=True)


def _deflated_bound(limit: int) -> int:
    """The most bytes a deflated file inflating to at most ``limit`` bytes can hold: deflate stores
    what it cannot compress in blocks of up to 65,535 bytes under 5 bytes of header each, and the
    file's preamble and meta information (a few hundred bytes) come before it; 1 MiB to spare."""
    return limit + 5 * (limit // 65_535 + 1) + 2**20


def _what_is_left(path: Path) -> Any:
    """The elements of a damaged file that still read (its header, before a cut), or ``None``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings on the cut: the row's note says it
        try:
            left = _read_report(path)
        except Exception:  # noqa: BLE001 - nothing of it reads; the file is kept all the same
            return None
        for tag in list(left.keys()):
            try:  # read now, a sequence to its last nested element, or dropped
                element = left[tag]
                for item in element.value if element.VR == "SQ" else ():
                    for _ in item.iterall():
                        pass
            except Exception:  # noqa: BLE001 - the element the cut fell in
                del left[tag]
    return left


class _MovedMeanwhile(Exception):  # noqa: N818 - not an error: another run got there first
    """Another run writing into the same folder moved a damaged report aside between this run's
    look at it and its own move, to put its own report for the image in its place."""

    def __init__(self, kept: Path | None = None) -> None:
        super().__init__("another run moved the damaged report aside first" + (
            f"; its own report, taken for it, is kept as {kept}" if kept else ""))
        #: Where that run's report is when this run took it for the damaged one and could not put it
        #: back, something else having taken its name since; ``None`` when it is where it was.
        self.kept = kept


def _set_aside(path: Path) -> Path:
    """Moves a damaged earlier report out of its report's way, to ``<name>.damaged`` (``.damaged-2``
    and on when that is taken), and returns where: kept for whoever looks into it, under a name that
    says why and that no ``*.dcm`` pattern sending the folder to a PACS picks up.

    Another run writing into the same folder at the same time may be setting the same report aside
    and putting its own in its place: nothing this run did not make or claim is removed or written
    over. The report is first claimed, renamed in one step to a hidden name of this run's own
    (``.<name>.<random>.aside``), which only one run can do: the other finds nothing there. What was
    claimed is read again: when it is whole, it is the report another run put there since this run
    looked, and it goes back. Then it takes the first ``.damaged`` name that is free at the moment
    of the move (:func:`_move_unless_there`), not after a look, so no damaged report another run
    keeps there is written over. When that fails, or the run is stopped (Ctrl-C) meanwhile, the
    report goes back to ``path`` unless something took that name since.

    Returns:
        Where the report is kept: its ``.damaged`` name, or, when it can neither take one nor go
        back (a full disk without hard links), its hidden name.

    Raises:
        _MovedMeanwhile: another run moved it aside first, or put its own report in its place since
            this run looked (where that report is: :attr:`_MovedMeanwhile.kept`).
        OSError: it cannot be moved aside; it is where it was.
    """
    claimed = path.with_name(f".{path.name}.{secrets.token_hex(8)}.aside")
    try:
        os.rename(path, claimed)  # a name of this run's own: it writes over nothing
    except FileNotFoundError:
        raise _MovedMeanwhile from None
    try:
        whole = not _earlier_report(claimed)[1]
        copy = 1
        while not whole:
            aside = path.with_name(f"{path.name}.damaged{'' if copy == 1 else f'-{copy}'}")
            try:
                _move_unless_there(claimed, aside)
            except FileExistsError:  # kept there by an earlier run, or by one running beside this one
                copy += 1
            else:
                return aside
    except BaseException as exc:
        if _put_back(claimed, path):
            raise
        log.warning("%s: the damaged report can be neither moved aside nor put back; it is kept as %s",
                    path, claimed.name)
        if not isinstance(exc, OSError):
            raise
        return claimed
    raise _MovedMeanwhile(None if _put_back(claimed, path) else claimed)


def _put_back(claimed: Path, path: Path) -> bool:
    """Moves a file this run claimed back to ``path`` unless anything is there now
    (:func:`_move_unless_there`); whether it did."""
    try:
        _move_unless_there(claimed, path)
    except OSError:
        return False
    return True


def _move_unless_there(path: Path, to: Path) -> None:
    """Moves the file ``path``, which this run claimed, to ``to`` unless anything is at ``to``,
    whenever it came there.

    ``to`` is made as a hard link, which the file system makes only where the name is free; on one
    without hard links (a FAT drive, an SMB share: EPERM, ENOTSUP) as a file created only where the
    name is free (``O_EXCL``), into which ``path`` is copied and synced to disk. ``path`` is removed
    only once it is whole at ``to``; where even that fails, it is left beside as a second name of
    the same file, or a copy.

    Raises:
        FileExistsError: something is at ``to``; nothing was changed.
        OSError: it cannot be moved; ``path`` is left where it was, and nothing of it at ``to``.
    """
    try:
        os.link(path, to, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError:
        # No hard links here. Any other reason (a folder this user cannot write in, the file gone)
        # fails the copy too, with its own error, so the copy is tried whatever the reason.
        _copy_unless_there(path, to)
    try:
        os.unlink(path)
    except OSError as exc:  # not ``to``: another run may have put its own report there since
        log.warning("%s: moved to %s, but cannot be removed (%s); left beside it", path, to.name, exc.strerror or exc)


def _copy_unless_there(path: Path, to: Path) -> None:
    """Copies the file ``path`` to ``to``, byte for byte and with its times, unless anything is at
    ``to``; synced to disk, so that removing ``path`` next cannot lose it to a power cut.

    Raises:
        FileExistsError: something is at ``to``; nothing was changed.
        OSError: it cannot be copied; nothing of it is left at ``to``.
    """
    with path.open("rb") as source:
        copy = to.open("xb")  # created only where nothing is, a dangling link included
        made = os.fstat(copy.fileno())
        try:
            with copy:
                shutil.copyfileobj(source, copy)
                copy.flush()
                os.fsync(copy.fileno())
        except BaseException:
            # A full disk, or a stop: only what this call made is removed, not a report another run
            # put at that name since (one moved into place over this copy).
            with contextlib.suppress(OSError):
                if os.path.samestat(made, os.stat(to, follow_symlinks=False)):
                    os.unlink(to)
            raise
    with contextlib.suppress(OSError):  # its times tell when it was written; a share may refuse them
        shutil.copystat(path, to)
