"""The manifest: one row per image id found in the dataset's files or in its csv.

Two layouts (``ingest.layout``) are read:

* ``fracatlas``: FracAtlas as published, the class folders ``images/Fractured`` and
  ``images/Non_fractured`` and ``dataset.csv`` with its flag columns;
* ``csv``: a hospital's own export, ``images/`` (DICOM, JPEG or PNG files, in any sub-folders)
  and ``labels.csv`` with a ``path`` (relative to the dataset folder) or an ``image_id`` (a
  file's name, with or without its extension), a ``label`` (1 fractured, 0 not) and optionally
  ``body_part`` (:data:`BODY_PARTS`), ``view`` (:data:`VIEWS`, or DICOM's AP, PA, LL, RL;
  several joined with ``+``) and ``patient_id`` (images of one patient are kept in one split;
  without the column, DICOM files' Patient ID). Headers are matched as
  :func:`_labels_column` spells them (``Patient_ID`` and ``Patient ID`` read ``patient_id``), and
  file names as Unicode NFC. :func:`read_csv_layout` turns it into the same columns.

It also owns the manifest's schema: the class folders, the flag columns, and the one rule
(:func:`body_part`) that gives each image a single body part, so that the split's strata, the
validation summary and the evaluation's per-part metrics all count alike.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import logging
import os
import re
import unicodedata
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
from PIL import Image
from pydicom import uid

from fracture.decoding import (
    decode,
    decode_truncated,
    export_files,
    failure_reason,
    hidden,
    near_constant,
    not_a_regular_file,
    png_bit_depth,
    too_many_pixels,
    unlistable,
    unservable,
)
from fracture.dicom import (
    COLOUR,
    FOR_PROCESSING,
    MAX_BITS,
    MONOCHROME,
    NOT_IMAGES,
    PIXEL_TAGS,
    RADIOGRAPHY,
    STRUCTURED_REPORTS,
    DicomRejected,
    check_body_part,
    is_dicom,
    patient_ids,
    patient_key,
    read_header,
)
from fracture.near_duplicates import add_near_duplicates
from fracture.vocabulary import Layout

log = logging.getLogger(__name__)

FOLDERS = {"Fractured": 1, "Non_fractured": 0}
# dataset.csv's body-part flags: four regions, and `mixed` for a film showing two or three of
# them (in FracAtlas `mixed` is never a fifth region on its own).
REGIONS = ("hand", "leg", "hip", "shoulder")
BODY_PARTS = (*REGIONS, "mixed")
# The views are not exclusive: one film can be set as two of them.
VIEWS = ("frontal", "lateral", "oblique")
FLAG_COLUMNS = (*BODY_PARTS, "hardware", "multiscan", *VIEWS)
UNKNOWN_PART = "unknown"

# The csv layout: where the files and the labels are, and how its view column may spell a view
# (the words above, or DICOM's View Position codes).
IMAGES_DIR = "images"
LABELS_CSV = "labels.csv"
VIEW_WORDS = {
    "frontal": "frontal", "ap": "frontal", "pa": "frontal",
    "lateral": "lateral", "lat": "lateral", "ll": "lateral", "rl": "lateral",
    "oblique": "oblique", "obl": "oblique",
}
# How many offending rows an error about labels.csv names.
MAX_ROWS = 10
# labels.csv's columns: where the file is, its label, and what the manifest keeps of it.
LABELS_COLUMNS = ("path", "image_id", "label", "body_part", "view", "patient_id")
# Headers that name one of them as DICOM spells its attribute (View Position, Body Part Examined).
LABELS_ALIASES = {"view_position": "view", "body_part_examined": "body_part"}
# Fields past the header's that a csv line may hold and still be read (a trailing delimiter
# leaves one, empty): up to this many are looked at, so that those not empty are named.
EXTRA_FIELDS = 16


class ManifestError(ValueError):
    """A dataset's csv cannot be read into the manifest, or a frame lacks the manifest columns an operation needs."""


class _OtherSeparator(pd.errors.ParserError):
    """A csv file whose header line holds no comma but another separator: one column, as read.
    ``not_utf8`` says why its bytes are not UTF-8 too, if they are not."""

    def __init__(self, sep: str, header: str, not_utf8: _NotUtf8 | None = None) -> None:
        super().__init__(f"looks {OTHER_SEPARATORS[sep]}-separated: its header line is {header[:80]!r}")
        self.sep = sep
        self.not_utf8 = not_utf8


#: Separators a csv file is saved with instead of commas: Excel's where the decimal mark is a
#: comma (most of continental Europe), and "Text (tab delimited)".
OTHER_SEPARATORS = {";": "semicolon", "\t": "tab"}
#: Where a spreadsheet writes each of them.
SEPARATOR_ORIGINS = {
    ";": "as a spreadsheet saves csv where the decimal mark is a comma",
    "\t": "as a spreadsheet saves \"Text (tab delimited)\"",
}
#: The encoding Windows saves text in for Western European languages (Excel's "CSV (Comma
#: delimited)", "CSV (semicolon delimited)" and "Text (tab delimited)", Notepad's "ANSI"): a csv
#: file that is not UTF-8 and whose bytes all read in it is offered a conversion from it, the
#: message saying it is taken for one.
WINDOWS_CODE_PAGE = "cp1252"
#: The encoding Excel for Mac saves "CSV (Macintosh)" in, its lines ended by a carriage return
#: alone: a file not UTF-8 whose lines end so is offered a conversion from it instead.
MAC_ENCODING = "mac_roman"
#: Where each line of a csv file ends: CRLF (Windows), LF, or CR alone (classic Mac).
_LINE_END = re.compile(rb"\r\n|\r|\n")


class _NotUtf8(pd.errors.ParserError):
    """A csv file whose bytes are not UTF-8: where the first byte UTF-8 does not read is (its offset
    in the file and its line), and the encoding it can be converted from, if one is known.

    That encoding is UTF-16 where the file begins with its byte order mark (Excel's "Unicode
    Text"), else :data:`MAC_ENCODING` where the lines end with a carriage return alone (Excel for
    Mac's "CSV (Macintosh)"), else :data:`WINDOWS_CODE_PAGE`; either only where every byte reads
    in it and none is NUL (a UTF-16 file without its mark); ``None`` otherwise. Only the conversion
    command a message gives reads it so: the file itself is read as UTF-8 or refused.
    """

    def __init__(self, data: bytes, error: UnicodeDecodeError) -> None:
        self.encoding: str | None = None
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            self.encoding = "utf-16"
            self.detail = "it begins with UTF-16's byte order mark, as Excel saves \"Unicode Text\""
        else:
            bad = data[error.start:error.end]
            line = len(_LINE_END.findall(data, 0, error.start)) + 1
            self.detail = f"byte offset {error.start:,} (line {line}) is 0x{bad.hex()}"
            mac = b"\r" in data and b"\n" not in data
            candidate = MAC_ENCODING if mac else WINDOWS_CODE_PAGE
            if b"\x00" not in data and not data.startswith(codecs.BOM_UTF8) and _decodes(data, candidate):
                self.encoding = candidate
                self.detail += f"; it reads as {bad.decode(candidate)!r} in {candidate}, " + (
                    "the encoding Excel for Mac saves \"CSV (Macintosh)\" in, whose lines end with a carriage "
                    "return alone, as this file's do" if mac
                    else "the code page Windows saves text in for Western European languages")
        super().__init__(f"is not UTF-8: {self.detail}")


def _decodes(data: bytes, encoding: str) -> bool:
    try:
        data.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def _utf8_error(data: bytes) -> _NotUtf8 | None:
    """Why ``data`` is not UTF-8 (:class:`_NotUtf8`), or ``None`` when it is."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _NotUtf8(data, exc)
    return None


@dataclass(frozen=True)
class ImageFacts:
    width: int | None
    height: int | None
    mode: str | None
    sha256: str | None  # None: not read (no regular file)
    decodable: bool
    truncated: bool
    error: str | None
    # The served model refuses the file for what it is (another body part or modality, FOR PROCESSING, too
    # many pixels, a blank picture, ...), not for damage: not decodable, and listed under `servable`.
    refused: bool = False


def not_a_file(path: Path) -> str:
    """Why ``path`` is no regular file to read, or ``""`` when it is one (or when reading it will
    say why not): :func:`~fracture.decoding.not_a_regular_file`, and for a folder why it is no image."""
    why = not_a_regular_file(path)
    if why is not None:
        return why
    if cannot := unlistable(path):
        return (f"the folder cannot be listed ({cannot}), so its images are not read; make it readable to the "
                "user running the pipeline")
    return "the entry is a folder, not an image file"


def _other_body_part(data: bytes, body_parts: Iterable[str] | None) -> str | None:
    """Why the served model refuses a DICOM file for the body part its header names, or ``None``."""
    if body_parts is None or not is_dicom(data[:132]):
        return None
    try:
        check_body_part(read_header(data), body_parts)
    except DicomRejected as exc:
        return str(exc)
    return None


def _refused_for_what_it_is(data: bytes, modalities: Iterable[str] | None) -> bool:
    """Whether a DICOM file the decode refused is one the served model refuses for what it holds
    rather than for damage: an object that is no image (a report, a PDF, raw data), an image FOR
    PROCESSING, several frames, a modality outside ``modalities`` (a CT, a mammogram; none given), a
    vendor's private transfer syntax, a palette or a colour of more than 8 bits, more than 16 bits a
    pixel. A PACS export holds
    such files beside the radiographs; they are sound, so :func:`inspect_image` marks them
    ``refused`` (rule ``servable``) and leaves a damaged file to ``decodable``. Read from the header
    as :func:`fracture.dicom.check_radiograph` reads it; a header that does not read is damage."""
    try:
        ds = read_header(data)
        meta = getattr(ds, "file_meta", None)
        sop = str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else "") or "")
        modality = str(ds.get("Modality") or "")
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        photometric = str(ds.get("PhotometricInterpretation") or "")
        bits = int(ds.get("BitsAllocated") or 0)
        if "PixelData" not in ds and ("Image Storage" in uid.UID(sop).name or any(tag in ds for tag in PIXEL_TAGS)):
            return False  # an image's class or pixel tags without the pixels: a file cut short, damage
        return (
            sop in NOT_IMAGES or sop.startswith(STRUCTURED_REPORTS) or sop in FOR_PROCESSING
            or str(ds.get("PresentationIntentType") or "").upper() == "FOR PROCESSING"
            or int(ds.get("NumberOfFrames") or 1) > 1
            or (modalities is not None and modality not in modalities)  # no Modality too, as serving reads it
            or "PixelData" not in ds  # an object without pixel data that is no image (Raw Data with Modality DX)
            # A vendor's private transfer syntax, a palette or a colour of more than 8 bits, more than
            # 16 bits a pixel: sound files in a form the served model does not decode.
            or (syntax is not None and uid.UID(str(syntax)) not in uid.AllTransferSyntaxes)
            or (bool(photometric) and photometric not in MONOCHROME and not (photometric in COLOUR and bits == 8))
            or bits > MAX_BITS
        )
    except Exception:  # noqa: BLE001 - a header that cannot be read, or a value that does not parse: damage
        return False


def _outside_sides(width: int, height: int, min_side: int | None, max_side: int | None) -> str | None:
    """Why the served model refuses a picture of this displayed size for its sides, or ``None``: a side
    under ``min_side`` or over ``max_side`` (``validate.min_side`` / ``max_side``, the served model's too)."""
    lo = min_side if min_side is not None else 1
    hi = max_side if max_side is not None else max(width, height)
    if lo <= width <= hi and lo <= height <= hi:
        return None
    return (f"is {width} x {height} px, a side outside validate.min_side to validate.max_side ({lo} to {hi} px): "
            "the served model refuses it; send the X-ray at a size within them, or change validate.min_side / "
            "max_side in params.yaml")


def inspect_image(
    path: str, max_pixels: int | None = None, min_grey_std: float | None = None,
    modalities: Iterable[str] | None = RADIOGRAPHY,
    body_parts: Iterable[str] | None = None,
    min_side: int | None = None,
    max_side: int | None = None,
) -> ImageFacts:
    """Hashes and fully decodes one file, telling a truncated JPEG from an unreadable one.

    An entry that is no regular file (a broken link, a FIFO: :func:`not_a_file`) is not opened:
    it is listed as not decodable, with that reason and no ``sha256``.

    A file the served model refuses (:mod:`fracture.intake`) is not trained on either: it is
    listed as not decodable and ``refused``, its ``error`` the served model's reason (the validate
    stage excludes it under rule ``servable``, which does not fail the stage as shipped, where a
    damaged file fails ``decodable``). Besides the format and bit depth
    (:func:`~fracture.decoding.unservable`), that is more pixels than ``max_pixels``, read
    from the header before any decode, a side outside ``min_side`` .. ``max_side`` (of the picture
    as decoded and shown: upright, a DICOM file's pixels made square), a DICOM file of a modality
    not in ``modalities``, FOR PROCESSING, of several frames or no image
    (:func:`_refused_for_what_it_is`) or whose header names a body part not in ``body_parts``, and
    a blank or near-constant picture, measured on the decode made here anyway: no second decode,
    about 1.5 ms more a FracAtlas X-ray (as much again as its decode; some 5 s of CPU over the 3,267).

    Args:
        path: the file.
        max_pixels: the served model's most pixels an image (``serve.max_megapixels`` x 10^6);
            ``None``: not checked.
        min_grey_std: the served model's least greyscale standard deviation (``serve.min_grey_std``);
            ``None``: not checked.
        modalities: the DICOM modalities the served model reads (``serve.modalities``); ``None``:
            not checked.
        body_parts: the Body Part Examined values the served model reads (``serve.body_parts``);
            ``None``: not checked.
        min_side: the served model's shortest side in pixels (``validate.min_side``); ``None``: not checked.
        max_side: its longest side (``validate.max_side``); ``None``: not checked.
    """
    if why := not_a_file(Path(path)):
        return ImageFacts(None, None, None, None, False, False, why)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:  # a file this user may not read: a fault of the copy, not of the disk the stage writes to
        return ImageFacts(None, None, None, None, False, False,
                          f"it cannot be read ({exc.strerror or exc}): make it readable by the user the pipeline runs as")
    if not data:
        return ImageFacts(None, None, None, None, False, False, "the file is empty (it holds no bytes): export it again")
    digest = hashlib.sha256(data).hexdigest()
    over = too_many_pixels(data, max_pixels) if max_pixels is not None else None
    if over:  # refused unread, as the served model refuses a decompression bomb
        return ImageFacts(None, None, None, digest, False, False, over, refused=True)
    truncated = False
    try:
        img = decode(data, modalities=modalities)
    except OSError as exc:
        if "truncated" not in str(exc):
            return ImageFacts(None, None, None, digest, False, False, failure_reason(exc))
        truncated = True
    except (SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        refused = isinstance(exc, DicomRejected) and _refused_for_what_it_is(data, modalities)
        return ImageFacts(None, None, None, digest, False, False, failure_reason(exc), refused=refused)
    if truncated:
        try:
            img = decode_truncated(data, modalities=modalities)
        except (OSError, SyntaxError, ValueError) as exc:
            return ImageFacts(None, None, None, digest, False, True, failure_reason(exc))
    # Decoded, yet refused when served (a truncated file too, as the served model checks it): not trained on either.
    refused = _outside_sides(img.width, img.height, min_side, max_side) or unservable(
        img.format, img.mode, png_bit_depth(data)
    ) or _other_body_part(data, body_parts) or (
        near_constant(img, min_grey_std) if min_grey_std is not None else None
    )
    if refused:
        return ImageFacts(img.width, img.height, img.mode, digest, False, truncated, refused, refused=True)
    return ImageFacts(img.width, img.height, img.mode, digest, True, truncated, "image file is truncated" if truncated else None)


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    # Labels and flags as nullable integers (NA where unknown), and "" for a row without a file.
    frame["path"] = frame["path"].fillna("")
    for col in ("folder_label", "csv_label", "fracture_count", *FLAG_COLUMNS):
        if col in frame:
            frame[col] = frame[col].astype("Int64")
    return frame


def join_files_and_csv(files: pd.DataFrame, csv: pd.DataFrame) -> pd.DataFrame:
    """FracAtlas's class-folder listing joined with its dataset.csv, one row per id.

    Args:
        files: ``image_id``, ``path`` and ``folder_label`` of each file in a class folder.
        csv: dataset.csv as read (its ``fractured`` becomes ``csv_label``).

    Returns:
        Both joined on ``image_id`` (unsorted), with ``has_file`` and ``in_csv``; labels and
        flags as nullable integers, ``path`` empty where only the csv names the id.
    """
    frame = files.merge(csv.rename(columns={"fractured": "csv_label"}), on="image_id", how="outer", indicator=True)
    frame["has_file"] = frame["_merge"] != "right_only"
    frame["in_csv"] = frame["_merge"] != "left_only"
    return _typed(frame.drop(columns="_merge"))


def _read_fracatlas_layout(dataset_dir: Path) -> pd.DataFrame:
    _require_fracatlas_folders(dataset_dir)
    rows = []
    for folder, label in FOLDERS.items():
        for p in sorted((dataset_dir / "images" / folder).iterdir()):
            # A hidden file (Finder's .DS_Store, a copy's ._ resource fork) is no X-ray: skipped
            # as export_files skips it in the csv layout, not failed as an undecodable image. An
            # entry that is no regular file (a broken link, a FIFO) is a row, which the decode
            # check then excludes with its reason (inspect_image), rather than left out unseen.
            if not p.is_dir() and not hidden(p.name):
                rows.append({"image_id": p.name, "path": p.relative_to(dataset_dir).as_posix(), "folder_label": label})
    files = pd.DataFrame(rows, columns=["image_id", "path", "folder_label"])
    return join_files_and_csv(files, read_dataset_csv(dataset_dir / "dataset.csv"))


def _require_fracatlas_folders(dataset_dir: Path) -> None:
    """FracAtlas's layout: each image directly in ``images/Fractured`` or ``images/Non_fractured``.

    Raises:
        ManifestError: a class folder is missing, or ``images/`` holds anything else (a file beside
            the class folders, another folder, a sub-folder of a class folder): its images would be
            read by no one, so they are named rather than left out unseen.
    """
    images = dataset_dir / "images"
    missing = [folder for folder in FOLDERS if not (images / folder).is_dir()]
    if missing:
        raise ManifestError(
            f"{images} lacks {', '.join(f'{f}/' for f in missing)}: FracAtlas's layout (ingest.layout: fracatlas) "
            f"keeps each image in images/Fractured or images/Non_fractured. Ingest the FracAtlas release again, or, "
            "for a hospital's export with a labels.csv, set ingest.layout: csv"
        )
    stray = [p for p in sorted(images.iterdir()) if p.name not in FOLDERS and not hidden(p.name)]
    stray += [p for folder in FOLDERS for p in sorted((images / folder).iterdir()) if p.is_dir() and not hidden(p.name)]
    if stray:
        shown = ", ".join(p.relative_to(dataset_dir).as_posix() + ("/" if p.is_dir() else "") for p in stray[:10])
        more = f" and {len(stray) - 10} more" if len(stray) > 10 else ""
        raise ManifestError(
            f"{images} holds what FracAtlas's layout does not, whose images no one would read: {shown}{more}. Each "
            "image lies directly in images/Fractured or images/Non_fractured, with its row in dataset.csv: move "
            "them there, or out of images/, and run ingest again"
        )


def read_dataset_csv(csv_file: Path | str, handle: IO[bytes] | None = None) -> pd.DataFrame:
    """FracAtlas's dataset.csv: ``image_id``, ``fractured`` and its other whole-number columns as numbers.

    Args:
        csv_file: the file, or the name messages give it when ``handle`` is read instead.
        handle: an open binary file to read (a past dataset version's, streamed through DVC);
            the messages then say what is wrong and not how to fix the file, which is history.

    Raises:
        ManifestError: the file cannot be read (or is saved with semicolons or tabs instead of
            commas, or in another encoding than UTF-8), lacks ``image_id`` or ``fractured``, holds
            its header row only, names no id on some row, or holds a cell in ``fractured``,
            ``fracture_count`` or a flag column that is not a whole number; the message names the
            file, the column and the lines.
    """
    fix = "; copy it again from the FracAtlas release" if handle is None else ""
    try:
        csv = _read_text_csv(csv_file if handle is None else handle)
    except _OtherSeparator as exc:
        raise ManifestError(
            f"{csv_file} {exc}, {SEPARATOR_ORIGINS[exc.sep]}; FracAtlas's "
            f"dataset.csv is comma-separated{fix}"
        ) from exc
    except _NotUtf8 as exc:
        raise ManifestError(f"{csv_file} {exc}; FracAtlas's dataset.csv is UTF-8{fix}") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError) as exc:
        raise ManifestError(f"{csv_file} is not a readable csv file ({exc}){fix}") from exc
    missing = [c for c in ("image_id", "fractured") if c not in csv]
    if missing:
        raise ManifestError(
            f"{csv_file} lacks the column(s) {', '.join(missing)} (it has {list(csv.columns)}); FracAtlas's "
            "dataset.csv names each image (image_id) and its label (fractured: 1 or 0), with the flag columns "
            f"{', '.join(FLAG_COLUMNS)} and fracture_count"
        )
    if csv.empty:  # every image would be unlabelled: the whole file is missing, not some rows
        raise ManifestError(
            f"{csv_file} holds its header row but no rows of images, where FracAtlas's dataset.csv has one row "
            f"per image{fix}"
        )
    csv["image_id"] = _named_ids(csv["image_id"], csv_file)
    for column in [c for c in ("fractured", "fracture_count", *FLAG_COLUMNS) if c in csv]:
        text = csv[column].str.strip()
        values, bad = _whole_numbers(text)
        if bad.any():
            fix = ". Fix those cells, or copy the file again from the FracAtlas release" if handle is None else ""
            raise ManifestError(
                f"{csv_file}: column {column} holds whole numbers (or is empty where unknown); "
                f"{_rows(bad, text)} do not{fix}"
            )
        csv[column] = values.astype("Int64")
    return csv


def _named_ids(raw: pd.Series, csv_file: Path | str, fix: str = "name each row's file") -> pd.Series:
    """A csv file's image_id column, stripped; raises ManifestError naming the lines where it is
    empty, and ``fix``: what to do about them."""
    ids = raw.str.strip()
    empty = ids == ""
    if empty.any():
        raise ManifestError(f"{csv_file}: column image_id is empty on {_rows(empty)}; {fix}")
    return ids


def _whole_numbers(text: pd.Series) -> tuple[pd.Series, pd.Series]:
    """A csv column's cells as numbers (NA where empty), and which non-empty cells are not whole
    numbers an int64 holds with room (a word, a fraction, infinity, more than 2^31)."""
    values = pd.to_numeric(text.replace("", None), errors="coerce")
    bad = text.ne("") & (values.isna() | ~np.isfinite(values) | (values != values.round()) | (values.abs() > 2**31))
    return values, bad


def _labels_column(header: str) -> str:
    """The column a header of labels.csv names: stripped, words of camelCase split (``PatientID``
    reads ``Patient_ID``), lower case, runs of spaces, hyphens and underscores as ``_``, and
    DICOM's attribute names for a column (:data:`LABELS_ALIASES`) as that column. Exports spell
    headers as their system does (``Patient_ID``, ``Patient ID``, ``body-part``, ``PatientID``,
    ``ViewPosition``); matched as written, such a column would be left out with a warning only."""
    words = re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", header.strip())
    name = re.sub(r"[\s_-]+", "_", words.lower())
    return LABELS_ALIASES.get(name, name)


def _read_text_csv(csv_file: Path | IO[bytes], column: Callable[[str], str] = str.strip) -> pd.DataFrame:
    """Every cell as text ("" where empty), indexed by data line (the line after the header is 0):
    blank lines are dropped but keep their numbers, so messages name the lines an editor shows.
    Each header is renamed by ``column`` (by default stripped).

    A line may end in delimiters past the header's fields (``a.png,1,hand,`` under ``path,label,
    body_part``, as some exports write every line) when those fields are empty: pandas would
    otherwise read the first column as the index and shift every other one left. A line whose
    extra fields hold something is refused (a pandas ParserError naming its lines), as no column
    says what they are.

    A file whose bytes are not UTF-8 is refused (:class:`_NotUtf8`, naming the first byte that is
    not and its line), never read in an encoding guessed from them; one saved with another
    separator is refused as such first (:class:`_OtherSeparator`), saying that too."""
    data = csv_file.read_bytes() if isinstance(csv_file, Path) else csv_file.read()
    not_utf8 = _utf8_error(data)
    # The header as written: pandas renames a repeated name (label, label.1), and the first would win.
    # In a file that is not UTF-8 it is read only to find its separator and show it.
    header = pd.read_csv(
        io.BytesIO(data), header=None, nrows=1, dtype=str, keep_default_na=False, index_col=False,
        encoding=not_utf8.encoding if not_utf8 and not_utf8.encoding else "utf-8", encoding_errors="replace",
    )
    written = [str(name) for name in header.iloc[0]] if len(header) else []
    # One column whose name holds another separator: the file was saved with it (Excel writes ";"
    # where the decimal mark is a comma). Refused naming it, not read with it (read_csv_layout says why).
    if len(written) == 1 and (found := [sep for sep in OTHER_SEPARATORS if sep in written[0]]):
        raise _OtherSeparator(found[0], written[0], not_utf8)
    if not_utf8 is not None:
        raise not_utf8
    names = [column(name) for name in written]
    named_twice = sorted({name for name in names if name and names.count(name) > 1})
    if named_twice:  # "label,label", " label" and "label", or "Label" and "label"
        spellings = "; ".join(", ".join(repr(w) for w in written if column(w) == name) for name in named_twice)
        raise pd.errors.ParserError(f"the header names column(s) {', '.join(named_twice)} twice ({spellings})")
    # Each line's fields past the header's (read by position, the header line skipped).
    fields = pd.read_csv(
        io.BytesIO(data), header=None, skiprows=1, names=range(len(written) + EXTRA_FIELDS), dtype=str,
        keep_default_na=False, skip_blank_lines=False, index_col=False,
    )
    # Joined row by row: DataFrame.agg over no rows returns a frame, not a Series.
    beyond = pd.Series([",".join(r) for r in fields.iloc[:, len(written):].itertuples(index=False)],
                       index=fields.index, dtype=str).str.rstrip(",")
    if beyond.ne("").any():
        raise pd.errors.ParserError(
            f"{_rows(beyond.ne(''), beyond)} hold fields past the header's {len(written)} ({', '.join(written)}); "
            "name their column in the header, or remove them"
        )
    with warnings.catch_warnings():  # "a loss of data with index_col=False": the fields dropped are empty
        warnings.simplefilter("ignore", pd.errors.ParserWarning)
        csv = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, skip_blank_lines=False, index_col=False)
    return csv.rename(columns=column)[csv.ne("").any(axis=1)]


def _nfc(text: str) -> str:
    # One spelling of each name: macOS writes "ö" decomposed (NFD), most exports composed (NFC).
    return unicodedata.normalize("NFC", text)


def _files_by_name(files: list[str], images: Path) -> dict[str, str]:
    """Each file's path in NFC -> its path as on disk (to read it by).

    Raises:
        ManifestError: two files' paths differ only in their Unicode normalisation, so that no
            labels.csv row could say which of them it means.
    """
    by_name: dict[str, str] = {}
    for path in files:
        other = by_name.setdefault(_nfc(path), path)
        if other != path:
            raise ManifestError(
                f"{images}: the files {other!a} and {path!a} have one name written two ways "
                "(Unicode NFC and NFD, as copies from two systems leave them); keep one of them"
            )
    return by_name


def _rows(where: pd.Series, values: pd.Series | None = None) -> str:
    # A csv file's line numbers (the header is line 1) of the first offending rows: the rows are
    # indexed by data line (_read_text_csv), and ``values`` holds theirs at the same positions.
    at = np.flatnonzero(where.to_numpy(dtype=bool))
    lines = [
        f"line {int(where.index[i]) + 2}" + (f" ({values.iloc[i]!r})" if values is not None else "") for i in at
    ]
    more = f" and {len(lines) - MAX_ROWS} more" if len(lines) > MAX_ROWS else ""
    return ", ".join(lines[:MAX_ROWS]) + more


def _csv_paths(raw: pd.Series, csv_file: Path) -> pd.Series:
    paths = raw.fillna("").astype(str).str.strip().str.replace("\\", "/", regex=False).str.removeprefix("./")
    outside = paths.map(lambda p: p == "" or p.startswith("/") or re.match(r"^[A-Za-z]:", p) is not None
                        or ".." in p.split("/"))
    if outside.any():
        raise ManifestError(
            f"{csv_file}: column path must hold each file's path relative to the folder holding "
            f"{LABELS_CSV} (e.g. {IMAGES_DIR}/study1/image1.dcm), with no '..' and not absolute or empty; "
            f"{_rows(outside, paths)} are not"
        )
    # Only images/ is read: a row naming a file elsewhere was excluded as one whose file does not exist.
    elsewhere = ~paths.str.startswith(f"{IMAGES_DIR}/")
    if elsewhere.any():
        raise ManifestError(
            f"{csv_file}: column path names files outside {IMAGES_DIR}/, where the export's images are read from "
            f"(paths are relative to the folder holding {LABELS_CSV}, e.g. {IMAGES_DIR}/study1/image1.dcm); "
            f"{_rows(elsewhere, paths)} are not under it. Move those files into {IMAGES_DIR}/ and give their paths "
            "there, then run ingest again"
        )
    return paths


def _match_ids(ids: pd.Series, files: dict[str, str], csv_file: Path) -> pd.Series:
    """Each id's file: the one whose name, or name without its extension, or path (``images/...``)
    is the id ("" for none).

    ``ids`` are in NFC, and ``files`` maps each file's path in NFC to its path on disk
    (:func:`_files_by_name`), which is what is returned. An id that is a file's path matched no
    file before: each file then took its path as its id, and the same ids failed three rules at
    once (a file without a row, a row without a file, a repeated id).
    """
    by_key: dict[str, list[str]] = {}
    for nfc_path, path in files.items():
        name = nfc_path.rsplit("/", 1)[-1]
        for key in dict.fromkeys((name, name.rsplit(".", 1)[0], nfc_path)):
            by_key.setdefault(key, []).append(path)
    matches = ids.map(lambda i: by_key.get(i, []))
    ambiguous = matches.map(len) > 1
    if ambiguous.any():
        examples = "; ".join(f"{ids[i]}: {matches[i][:3]}" for i in ambiguous[ambiguous].index[:MAX_ROWS])
        raise ManifestError(
            f"{csv_file}: image ids that name more than one file under {IMAGES_DIR}/ ({examples}); "
            "add a path column that names each file"
        )
    return matches.map(lambda m: m[0] if m else "")


def _flags(values: pd.Series, words: dict[str, str], names: tuple[str, ...], column: str, csv_file: Path) -> pd.DataFrame:
    """One 0/1 column per name from a text column (several values joined with ``+``; empty: NA)."""
    text = values.fillna("").astype(str).str.strip().str.lower()
    tokens = text.map(lambda t: [w for w in re.split(r"[+;|,/\s]+", t) if w])
    unknown = tokens.map(lambda ws: any(w not in words for w in ws))
    if unknown.any():
        raise ManifestError(
            f"{csv_file}: column {column} allows {', '.join(sorted(words))} (or empty: unknown); "
            f"{_rows(unknown, values)} hold other values. Map your terms onto these, or leave the cell empty"
        )
    known = tokens.map(bool)
    out = pd.DataFrame(
        {name: tokens.map(lambda ws, n=name: int(any(words[w] == n for w in ws))) for name in names}, index=values.index
    ).astype("Int64")
    return out.where(known, pd.NA)


def _one_row_per_file(paths: pd.Series, csv_file: Path) -> None:
    """Raises ManifestError when two rows of labels.csv name one file (``paths`` as resolved,
    "" for a row whose id matched none): both would be kept, and the file trained on twice, under
    two ids (a report joined into the export twice; ids ``a`` and ``a.png`` of one ``a.png``)."""
    named = paths[paths.ne("")]
    shared = named[named.duplicated(keep=False)]
    if shared.empty:
        return
    files = list(dict.fromkeys(shared))
    each = "; ".join(f"{_rows(paths.eq(f))} name the same file {f}" for f in files[:MAX_ROWS])
    more = f"; and {len(files) - MAX_ROWS} more files" if len(files) > MAX_ROWS else ""
    raise ManifestError(f"{csv_file}: {each}{more}; keep one row per file")


def _check_unread(ignored: list[str], csv_file: Path) -> None:
    """Raises ManifestError for a header left unread that spells a known column without its
    underscores (``patientid``, ``PATIENTID``, ``bodypart``): left out with a warning only, its
    column would be lost (a JPEG export's patients unlinked, every body part unknown)."""
    known = {c.replace("_", ""): c for c in (*LABELS_COLUMNS, *LABELS_ALIASES)}
    meant = {c: LABELS_ALIASES.get(known[c.replace("_", "")], known[c.replace("_", "")])
             for c in ignored if c.replace("_", "") in known}
    if meant:
        named = ", ".join(f"{c} (read as {m})" for c, m in meant.items())
        raise ManifestError(
            f"{csv_file}: the header(s) {named} spell a column without the breaks between its words, so they "
            f"would not be read; rename them as {', '.join(meant.values())} (headers are read in any case, with "
            "spaces, hyphens or underscores between words, or in camelCase: patient_id, Patient ID, PatientID)"
        )


def _patient_column(patients: pd.Series, csv_file: Path) -> pd.Series:
    """labels.csv's ``patient_id`` column, NA where empty.

    Raises:
        ManifestError: one value fills every row of an export of at least
            :data:`PLACEHOLDER_MIN_IMAGES` rows, as an anonymiser that writes one placeholder for
            everyone leaves it: read as one patient's, all the images would go to one split.
    """
    values = patients.unique()
    if len(patients) >= PLACEHOLDER_MIN_IMAGES and len(values) == 1 and values[0] != "":
        raise ManifestError(
            f"{csv_file}: column patient_id holds {values[0]!r} on all its {len(patients)} rows, as an anonymiser's "
            "placeholder would leave it; read as one patient's, all the images would be kept in one split and no "
            "split could be drawn. Give each row its patient's (pseudonymised) identifier, leave the cells empty "
            "(an empty cell links nothing), or remove the column (DICOM files are then linked by their Patient ID)"
        )
    return patients.replace("", pd.NA)


def _a_row(entry: Path) -> bool:
    """Whether an entry :func:`~fracture.decoding.export_files` lists under ``images/`` is a row of
    the manifest: each file, and what is no file to read (a broken link, a FIFO, a folder that
    cannot be listed) so that the decode check excludes it with its reason (:func:`not_a_file`);
    but not a linked folder it did not walk (a second name for a folder walked, or a loop), whose
    files are rows under their first name."""
    return not entry.is_dir() or bool(unlistable(entry))


def _conversion(sep: str, not_utf8: _NotUtf8 | None) -> str:
    """The advice, led by ", or", to convert labels.csv saved with ``sep`` (and, where ``not_utf8``
    is given, in its encoding) with a one-line command: "" where the encoding is not known."""
    if not_utf8 is not None and not_utf8.encoding is None:
        return ""
    options = "".join((
        f"sep={sep!r}, " if sep != "," else "",
        f"encoding={not_utf8.encoding!r}, " if not_utf8 is not None else "",
    ))
    command = (f"python -c \"import pandas as pd; pd.read_csv('{LABELS_CSV}', {options}dtype=str, "
               f"keep_default_na=False).to_csv('{LABELS_CSV}', index=False)\"")
    # cp1252 or Mac Roman is taken for the encoding of bytes that are not UTF-8 (see _NotUtf8): the message says so.
    guess = not_utf8 is not None and not_utf8.encoding in (WINDOWS_CODE_PAGE, MAC_ENCODING)
    return f", or{f', if it was saved in {not_utf8.encoding},' if guess else ''} convert it in the export's folder " \
        f"with {command}"


def read_csv_layout(dataset_dir: Path) -> pd.DataFrame:
    """A hospital's export (layout ``csv``) as the manifest's columns, before the decode.

    Every file under ``images/`` (:func:`fracture.decoding.export_files`: sub-folders too, hidden
    files and DICOMDIR indexes aside; what is no file to read too, a broken link, a FIFO or a folder
    that cannot be listed, for the decode check to exclude with its reason: :func:`_a_row`) and
    every row of ``labels.csv`` becomes a row, joined on the file: a row without a file gets
    ``has_file`` False, a file without a row ``in_csv`` False (its id is its path), and the suite
    reports both. There are no class folders, so ``folder_label`` is NA and ``labels.csv``'s
    label is ``csv_label``. Headers are read as :func:`_labels_column` spells them, and paths,
    ids and file names are compared in Unicode NFC, so a name macOS wrote decomposed (NFD)
    matches the same name typed in labels.csv.

    Args:
        dataset_dir: the folder holding ``images/`` and ``labels.csv``.

    Returns:
        ``image_id`` (in NFC: labels.csv's ``image_id``, else the path), ``path`` (relative to
        ``dataset_dir``, as on disk; empty when no file matched),
        ``folder_label``, ``csv_label``, ``has_file``, ``in_csv``, the flags of
        :data:`BODY_PARTS` and :data:`VIEWS` (NA where a cell is empty or labels.csv lacks the
        column), and ``patient_id``: labels.csv's column where it has one (NA where a cell
        is empty), else a key of each DICOM file's Patient ID and its issuer
        (:func:`fracture.dicom.patient_key`; NA for other files), and no column when no file
        has one. Other columns are left out, with a warning naming them.

    Raises:
        ManifestError: labels.csv is saved with semicolons or tabs instead of commas, or in another
            encoding than UTF-8 (the message names the first byte that is not UTF-8, its line, and
            a command that converts a file Windows or Excel for Mac saved), holds its header row only, lacks
            ``label`` or both ``path`` and ``image_id``, names a column twice (in any spelling
            :func:`_labels_column` reads alike), or a value cannot be read (a label that is not a
            number, a path outside the folder, an empty ``image_id``, an id that names two files,
            an unknown body part or view); the message names the lines. Or two files' names differ
            only in their Unicode normalisation. Or, without a ``patient_id`` column, one DICOM
            Patient ID is on more than a quarter of the images (an anonymiser's placeholder;
            :func:`_dicom_patients`).
    """
    csv_file = dataset_dir / LABELS_CSV
    for needed, what in ((csv_file, "its labels (a row per image: path or image_id, and label)"),
                         (dataset_dir / IMAGES_DIR, "its images")):
        if not (needed.is_dir() if needed.name == IMAGES_DIR else needed.is_file()):
            raise ManifestError(
                f"{needed} is missing: a hospital's export (ingest.layout: csv) holds {what} in {needed.name}"
                f"{'/' if needed.name == IMAGES_DIR else ''} beside {'images/' if needed == csv_file else LABELS_CSV}. "
                "Add it to the export and run ingest again; for FracAtlas's release, set ingest.layout: fracatlas"
            )
    try:
        csv = _read_text_csv(csv_file, _labels_column)
    except _OtherSeparator as exc:
        # Refused, not read with the separator found: labels.csv is comma-separated wherever it
        # is read (by the user's own tools too), and ingest reads what it is given, guessing nothing.
        not_utf8 = exc.not_utf8
        utf8 = f" and UTF-8, and its bytes are not UTF-8 either: {not_utf8.detail}" if not_utf8 else ""
        raise ManifestError(
            f"{csv_file} {exc}, {SEPARATOR_ORIGINS[exc.sep]}; {LABELS_CSV} must be comma-separated{utf8}. Save it "
            f"comma-separated{' as UTF-8' if not_utf8 else ''} in the export (LibreOffice Calc: File > Save As, Text "
            "CSV, Edit filter settings, field delimiter ','"
            f"{', character set Unicode (UTF-8)' if not_utf8 else ''}){_conversion(exc.sep, not_utf8)}, then run "
            "ingest again"
        ) from exc
    except _NotUtf8 as exc:
        raise ManifestError(
            f"{csv_file} {exc}. {LABELS_CSV} must be UTF-8: save it so in the export (Excel: Save As, \"CSV UTF-8 "
            "(Comma delimited)\"; LibreOffice Calc: File > Save As, Text CSV, Edit filter settings, character set "
            f"Unicode (UTF-8)){_conversion(',', exc)}, then run ingest again"
        ) from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ManifestError(f"{csv_file} is not a readable csv file ({exc}); export it again as UTF-8 csv") from exc
    if "label" not in csv or not ({"path", "image_id"} & set(csv.columns)):
        raise ManifestError(
            f"{csv_file} has columns {list(csv.columns)}; it needs label (1 fractured, 0 not) and path "
            f"(relative to {dataset_dir.name}/, e.g. {IMAGES_DIR}/image1.dcm) or image_id (a file's name), "
            "and may have body_part and view"
        )
    if csv.empty:  # every image would be unlabelled: the export lost its rows, not some labels
        raise ManifestError(
            f"{csv_file} holds its header row ({', '.join(csv.columns)}) but no rows of images; export it "
            "again with one row per image (its path or image_id, and its label), then run ingest again"
        )
    images = dataset_dir / IMAGES_DIR
    listed = export_files(images, unreadable=True)
    files = sorted(p.relative_to(dataset_dir).as_posix() for p in listed if _a_row(p))
    on_disk = _files_by_name(files, images)
    written = _csv_paths(csv["path"], csv_file).map(_nfc) if "path" in csv else None
    if written is not None and "image_id" not in csv:
        ids = written
    else:
        # Beside a path column too: an empty id would pass every rule and then be lost, as ""
        # reads back from manifest.csv as no id and the split drops the row.
        fix = "name each row's file" if written is None else (
            "give each row its id, or remove the column (each row's id is then its path)"
        )
        ids = _named_ids(csv["image_id"], csv_file, fix).map(_nfc)
    # Each row's file by its name on disk, whichever normalisation the row wrote it in.
    paths = _match_ids(ids, on_disk, csv_file) if written is None else written.map(lambda p: on_disk.get(p, p))
    _one_row_per_file(paths, csv_file)
    label_text = csv["label"].str.strip()
    labels, not_whole = _whole_numbers(label_text)
    unreadable = label_text.eq("") | not_whole  # every row needs its label
    if unreadable.any():
        raise ManifestError(
            f"{csv_file}: column label must be 1 (fractured) or 0 (not fractured); {_rows(unreadable, label_text)} "
            "are not whole numbers. Fix those cells, or remove the rows"
        )
    rows = pd.DataFrame({"image_id": ids, "path": paths, "csv_label": labels.astype("Int64"), "in_csv": True})
    # A column labels.csv lacks reads as empty cells: every image's body part or view unknown.
    empty = pd.Series("", index=csv.index)
    rows = rows.join(_flags(csv.get("body_part", empty), {p: p for p in BODY_PARTS}, BODY_PARTS, "body_part", csv_file))
    rows = rows.join(_flags(csv.get("view", empty), VIEW_WORDS, VIEWS, "view", csv_file))
    if "patient_id" in csv:
        # Whatever the hospital's identifier is (pseudonymised or not): only equality is used.
        rows["patient_id"] = _patient_column(csv["patient_id"].str.strip(), csv_file)
    ignored = [c for c in csv.columns if c not in LABELS_COLUMNS]
    _check_unread(ignored, csv_file)
    if ignored:
        log.warning(
            "%s: column(s) %s are not read (labels.csv's columns: %s)", csv_file, ", ".join(ignored), ", ".join(LABELS_COLUMNS)
        )
    listed = set(rows["path"])
    unlisted = pd.DataFrame({"path": [f for f in files if f not in listed]})
    unlisted = unlisted.assign(image_id=unlisted["path"].map(_nfc), in_csv=False)
    frame = pd.concat([rows, unlisted], ignore_index=True)
    frame["in_csv"] = frame["in_csv"].astype(bool)
    frame["has_file"] = frame["path"].isin(set(files))
    if "patient_id" not in csv:
        # Only regular files are opened: reading a FIFO would wait for a writer for ever.
        patients = _dicom_patients(dataset_dir, [f for f in files if not not_a_file(dataset_dir / f)], csv_file)
        if patients:
            frame["patient_id"] = frame["path"].map(patients).astype("string")
    frame.loc[~frame["has_file"], "path"] = ""
    frame["folder_label"] = pd.NA
    return _typed(frame)


#: One Patient ID on more than this share of an export's images, when it has at least
#: PLACEHOLDER_MIN_IMAGES of them, is taken for an anonymiser's placeholder (:func:`_dicom_patients`).
PLACEHOLDER_SHARE = 0.25
PLACEHOLDER_MIN_IMAGES = 20


def _dicom_patients(dataset_dir: Path, files: list[str], csv_file: Path) -> dict[str, str]:
    """Each DICOM file's patient key (:func:`fracture.dicom.patient_key`), for an export whose
    labels.csv has no ``patient_id`` column: the header's Patient ID links a patient's images.

    The Issuer of Patient ID is optional, and one export often holds it from some devices and
    not from others: a Patient ID written without an issuer, and under exactly one issuer
    elsewhere in the export, is that issuer's patient (one patient's AP under ``HOSP-A`` and
    lateral without an issuer are linked). Under two different issuers, the IDs stay apart (two
    hospitals' patient 7731).

    Raises:
        ManifestError: one Patient ID (under any issuer) is on more than :data:`PLACEHOLDER_SHARE`
            of the export's images, as an anonymiser that writes one placeholder for everyone
            leaves them; linked, they would all go to one split. Or one Patient ID is written
            under two or more issuers and also without one, so that the files without an issuer
            cannot be given to either patient.
    """
    ids = {f: found for f in files if (found := patient_ids(dataset_dir / f)) is not None}
    if not ids:
        return {}
    shared = pd.Series([patient for _, patient in ids.values()]).value_counts()
    if len(files) >= PLACEHOLDER_MIN_IMAGES and shared.iloc[0] > PLACEHOLDER_SHARE * len(files):
        raise ManifestError(
            f"{shared.iloc[0]} of the {len(files)} images under {dataset_dir / IMAGES_DIR} are DICOM files with one "
            "Patient ID, as an anonymiser's placeholder would leave them; read as one patient's, they would all be "
            f"kept in one split. Give {csv_file} a patient_id column saying which images share a patient (an empty "
            "cell links nothing); it is used instead of the DICOM headers"
        )
    issuers: dict[str, set[str]] = {}
    for issuer, patient in ids.values():
        issuers.setdefault(patient, set()).add(issuer)
    unclear = sorted(patient for patient, named in issuers.items() if "" in named and len(named) > 2)
    if unclear:
        def files_of(issuer: str, patient: str) -> str:
            found = [f for f, key in ids.items() if key == (issuer, patient)]
            return ", ".join(found[:MAX_ROWS]) + (f" and {len(found) - MAX_ROWS} more" if len(found) > MAX_ROWS else "")

        # The Patient ID itself is not named, as the manifest holds only a key of it (patient_key).
        each = "; ".join(
            f"{files_of('', patient)} without an issuer, beside "
            + ", ".join(f"{files_of(issuer, patient)} under {issuer!r}" for issuer in sorted(issuers[patient] - {""}))
            for patient in unclear[:MAX_ROWS]
        )
        raise ManifestError(
            f"{dataset_dir / IMAGES_DIR}: DICOM files hold one Patient ID under two or more Issuers of Patient ID and "
            f"without one, so those without cannot be told to be either issuer's patient: {each}. Give {csv_file} a "
            "patient_id column saying which images share a patient (an empty cell links nothing); it is used instead "
            "of the DICOM headers"
        )
    # A Patient ID without an issuer, beside one issuer's: that issuer's patient.
    only = {patient: min(named - {""}) for patient, named in issuers.items() if len(named - {""}) == 1}
    patients = {f: patient_key(issuer or only.get(patient, ""), patient) for f, (issuer, patient) in ids.items()}
    log.info(
        "%s has no patient_id column: %d DICOM files' Patient ID links them as %d patients",
        csv_file, len(patients), len(set(patients.values())),
    )
    return patients


def build_manifest(
    dataset_dir: Path,
    workers: int | None = None,
    near_duplicate_threshold: float | None = None,
    layout: Layout = "fracatlas",
    near_duplicate_top_threshold: float | None = None,
    max_pixels: int | None = None,
    min_grey_std: float | None = None,
    modalities: Iterable[str] | None = RADIOGRAPHY,
    body_parts: Iterable[str] | None = None,
    min_side: int | None = None,
    max_side: int | None = None,
) -> pd.DataFrame:
    """Lists every image id from the dataset's files and its csv, with its facts.

    Args:
        dataset_dir: a folder in ``layout``.
        workers: decoding processes (default: all cores).
        near_duplicate_threshold: find near-duplicate X-rays at this thumbnail correlation
            (:mod:`fracture.near_duplicates`); ``None`` makes every image its own group.
        near_duplicate_top_threshold: ... and at this correlation of the thumbnails' top halves
            (a copy corrupt in its lower part); ``None``: not compared so.
        layout: ``fracatlas`` (class folders and ``dataset.csv``) or ``csv`` (``images/`` and
            ``labels.csv``, :func:`read_csv_layout`).
        max_pixels: a file over this many pixels is refused, as the served model refuses it
            (``serve.max_megapixels`` x 10^6; :func:`inspect_image`); ``None``: not checked.
        min_grey_std: a picture whose greyscale standard deviation is below this is refused,
            as the served model refuses it (``serve.min_grey_std``); ``None``: not checked.
        modalities: a DICOM file of another modality is refused, as the served model
            refuses it (``serve.modalities``); ``None``: not checked.
        body_parts: a DICOM file whose header names a body part not in these is refused,
            as the served model refuses it (``serve.body_parts``); ``None``: not checked.
        min_side, max_side: a picture with a side outside these is refused, as the served model
            refuses it (``validate.min_side`` / ``max_side``); ``None``: not checked.

    Returns:
        One row per id, sorted by id: ``path`` (relative to ``dataset_dir``, empty when only the
        csv names it), ``folder_label`` and ``csv_label`` (NA where unknown), ``has_file``,
        ``in_csv``, the csv's flags (and ``fracture_count`` for FracAtlas), and the decoded
        ``width``, ``height``, ``mode``, ``sha256``, ``decodable``, ``truncated``, ``error`` and
        ``refused`` (a file the served model refuses, not decodable either: :func:`inspect_image`);
        then ``near_duplicate_group`` and ``near_duplicate_conflict``. An entry of an image folder
        that is no regular file (a broken link, a FIFO) is a row too, never opened: not
        decodable, its ``error`` saying why (:func:`not_a_file`), so the validate stage lists it.

    Raises:
        ManifestError: the dataset's csv (dataset.csv or labels.csv) cannot be read, is saved with
            another separator than commas, or holds its header row only (:func:`read_dataset_csv`,
            :func:`read_csv_layout`).
    """
    frame = _read_fracatlas_layout(dataset_dir) if layout == "fracatlas" else read_csv_layout(dataset_dir)
    paths = [str(dataset_dir / p) for p in frame.loc[frame["has_file"], "path"]]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        inspect = partial(inspect_image, max_pixels=max_pixels, min_grey_std=min_grey_std, modalities=modalities,
                          body_parts=body_parts, min_side=min_side, max_side=max_side)
        facts = list(pool.map(inspect, paths, chunksize=32))
    facts_frame = pd.DataFrame([asdict(f) for f in facts], index=frame.index[frame["has_file"]])
    frame = frame.join(facts_frame)
    # Rows without a file stay NA here: the missing file is its own finding, not a decode error.
    frame["decodable"] = frame["decodable"].astype("boolean")
    frame["truncated"] = frame["truncated"].astype("boolean")
    frame["refused"] = frame["refused"].astype("boolean")
    frame["width"] = frame["width"].astype("Int64")
    frame["height"] = frame["height"].astype("Int64")
    frame = frame.sort_values("image_id").reset_index(drop=True)
    if near_duplicate_threshold is None:
        return frame.assign(near_duplicate_group=frame["image_id"], near_duplicate_conflict=False)
    return add_near_duplicates(frame, dataset_dir, near_duplicate_threshold, workers, near_duplicate_top_threshold)


def body_part(frame: pd.DataFrame) -> pd.Series:
    """Each row's one body part, from dataset.csv's flags; the single rule every stage uses.

    * the region (hand, leg, hip or shoulder) when exactly that one flag is set;
    * ``mixed`` when ``mixed`` is set or several regions are (in FracAtlas ``mixed`` is set
      exactly when two or three regions are);
    * ``unknown`` when no flag is set or the id has no ``dataset.csv`` row (flags NA).

    A flag counts as set when it is above 0; a value that is not a number counts as unset.

    Args:
        frame: rows with the :data:`BODY_PARTS` columns (0/1, NA allowed).

    Returns:
        ``hand``, ``leg``, ``hip``, ``shoulder``, ``mixed`` or ``unknown`` per row, on the
        frame's index, named ``body_part``.

    Raises:
        ManifestError: a flag column is missing.
    """
    missing = [c for c in BODY_PARTS if c not in frame]
    if missing:
        raise ManifestError(
            f"manifest lacks the body-part flag columns {missing} (from dataset.csv); rebuild it "
            "with `fracture validate` from a dataset.csv that has them"
        )
    # NA (an id without a dataset.csv row) counts as not set: no flag known means unknown part.
    flags = frame[list(BODY_PARTS)].apply(pd.to_numeric, errors="coerce").fillna(0).gt(0)
    regions = flags[list(REGIONS)]
    n_set = regions.sum(axis=1)
    part = np.select(
        [flags["mixed"] | (n_set > 1), n_set == 1],
        ["mixed", regions.idxmax(axis=1)],
        default=UNKNOWN_PART,
    )
    return pd.Series(part, index=frame.index, name="body_part")
