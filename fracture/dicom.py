"""DICOM radiographs to the 8-bit image a reader sees, with pydicom.

A hospital's X-rays come from a PACS as DICOM, mostly 12- or 16-bit, often JPEG-compressed.
The model was trained on 8-bit exports, so a DICOM image is turned into exactly what a JPEG
export of it would look like, in the standard's order (PS3.4 Annex N, the grayscale pipeline):

1. the modality LUT: Rescale Slope and Intercept, or a Modality LUT Sequence
   (:func:`pydicom.pixels.apply_modality_lut`; entries of 10 to 15 bits read as 16-bit words);
2. the VOI transform (:func:`pydicom.pixels.apply_voi_lut`): the first VOI LUT of the VOI LUT
   Sequence when there is one, else the first Window Center / Width pair (the one a viewer
   opens with; the others are alternatives the modality offers). Without either, the image's
   own minimum to maximum;
3. MONOCHROME1 (white is low), or a Presentation LUT Shape of INVERSE, is inverted after the
   VOI transform, so bone is bright (DX requires INVERSE exactly when MONOCHROME1, which is
   inverted once);
4. the VOI output range mapped linearly to 0-255 (a negative Rescale Slope gives a reversed
   range, which maps as it is; a VOI LUT's range is that of its entries' bit depth where its
   descriptor claims more, as viewers read it: :func:`voi_lut_bits`).

Pixel Padding Value (and Range Limit) marks pixels that are not image: they are left out of the
range step 2 takes from the image and shown black. Pixels that are not square (Pixel Spacing,
Imager Pixel Spacing or Pixel Aspect Ratio unequal by more than 1%) are resampled to square ones
along the coarser axis, so a round bone stays round (:func:`square_pixels`). Images FOR
PROCESSING (raw detector data, which no viewer displays) are refused, as are files without the
tags that describe their pixels, compressed frames whose size is not the header's, and images of
more than 16 bits per pixel.

Compressed transfer syntaxes decode through pydicom's pixel handlers: JPEG baseline, extended
and lossless through ``pylibjpeg-libjpeg``, JPEG-LS through ``pyjpegls``, RLE natively. A
deflated dataset (Deflated Explicit VR Little Endian) is inflated here, to at most
:func:`max_inflated` bytes, before pydicom parses it: pydicom inflates the whole of it first, and
a small file of zeros inflates to gigabytes before any size or pixel check could refuse it.

Training (a dataset holding ``.dcm`` files), the served model and the page all read DICOM
through :func:`dicom_to_image`, so they see the same pixels. Only third-party packages and
:mod:`fracture.vocabulary` are imported: the logged MLflow model carries this module.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread, uid
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import (
    _at_pixel_data,
    _read_file_meta_info,
    read_dataset,
    read_preamble,
)
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.valuerep import VR

from fracture.vocabulary import LIMB_CODES, LIMBS

log = logging.getLogger(__name__)

#: Modalities of plain radiographs: computed and digital radiography and radiographic imaging
#: (conventional film/screen). Not X-ray angiography (XA), whose contrast-filled vessels, subtracted
#: images and C-arm fluoroscopy frames the model never saw: a site that has validated it on its own
#: C-arm images adds XA to ``serve.modalities``.
RADIOGRAPHY = ("CR", "DX", "RG")
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
#: SOP classes that never hold a radiograph, named in the refusal.
NOT_IMAGES = {
    "1.2.840.10008.5.1.4.1.1.104.1": "an encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.104.2": "an encapsulated CDA document",
    "1.2.840.10008.5.1.4.1.1.88.11": "a structured report",
    "1.2.840.10008.5.1.4.1.1.88.22": "a structured report",
    "1.2.840.10008.5.1.4.1.1.88.33": "a structured report",
    "1.2.840.10008.5.1.4.1.1.88.59": "a key object selection",
    "1.2.840.10008.5.1.4.1.1.11.1": "a presentation state",
    "1.2.840.10008.1.3.10": "a DICOMDIR (the index of the files on a DICOM medium)",
}
#: Every SOP class under this root is a structured report of some kind (PS3.4 B.5: Basic Text SR,
#: Comprehensive 3D SR, X-Ray Radiation Dose SR, Key Object Selection, ...).
STRUCTURED_REPORTS = "1.2.840.10008.5.1.4.1.1.88."
#: Colour photometric interpretations read as RGB: pydicom converts YCbCr to RGB as it decodes
#: (lossy JPEG colour must be stored as YBR_FULL_422, PS3.5 8.2.1).
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")
#: JPEG 2000's colour transforms, reversible and irreversible (PS3.5 8.2.4): only its codestreams
#: hold them, and pydicom's JPEG 2000 decoder gives RGB.
JPEG2000_COLOUR = ("YBR_RCT", "YBR_ICT")
#: Radiographs store at most 16 bits per pixel (DX and XA: Bits Allocated 8 or 16, PS3.3
#: C.8.11.3 and C.8.7); more would make the per-level display table below unbounded.
MAX_BITS = 16


#: SOP classes of images FOR PROCESSING: detector data before the modality's image processing.
FOR_PROCESSING = {
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "Digital Mammography X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.3.1": "Digital Intra-Oral X-Ray Image Storage - For Processing",
}
#: Transfer syntaxes whose frames are JPEG, JPEG-LS or JPEG 2000 codestreams: each ends with the
#: marker FF D9 (End of Image; JPEG 2000's End of Codestream), so a frame without it is cut short.
MARKED_END = frozenset(
    {
        uid.JPEGBaseline8Bit,
        uid.JPEGExtended12Bit,
        uid.JPEGLossless,
        uid.JPEGLosslessSV1,
        uid.JPEGLSLossless,
        uid.JPEGLSNearLossless,
        uid.JPEG2000Lossless,
        uid.JPEG2000,
        uid.HTJ2KLossless,
        uid.HTJ2KLosslessRPCL,
        uid.HTJ2K,
    }
)
#: Transfer syntaxes whose frames are JPEG or JPEG-LS codestreams (their size in a SOF segment)
#: and JPEG 2000 ones (in the SIZ segment).
JPEG_FAMILY = MARKED_END - {uid.JPEG2000Lossless, uid.JPEG2000, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K}
#: The most scans (SOS markers, FF DA) a JPEG file, or a DICOM file's JPEG or JPEG-LS frame, may
#: hold. A progressive JPEG's decoder passes over every block of the image once a scan, so a small
#: file of thousands of tiny scans takes minutes to decode (libjpeg-turbo's djpeg has
#: ``-maxscans`` for this). libjpeg's progressive scripts write 6 (greyscale) to 10 (colour)
#: scans; every FracAtlas X-ray holds 1. An embedded thumbnail's own scan counts too.
#: Entropy-coded data stuffs every FF byte, so only a marker reads FF DA.
MAX_JPEG_SCANS = 100
#: JPEG's Start of Frame markers (SOF0-SOF15 less DHT C4, JPG C8 and DAC CC) and JPEG-LS's SOF55 (F7).
_SOF = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})
#: Pixels are resampled to square ones when their height and width differ by more than this fraction.
ASPECT_TOLERANCE = 0.01
#: Pixels more than this many times as tall as wide (or wide as tall) are no radiograph's: the
#: header is corrupt, and resampling to square pixels would multiply the pixels decoded by as much.
MAX_PIXEL_ASPECT = 4.0
#: Where a pixel's height and width are read from, in order: the spacing in the patient (or
#: the calibrated plane), the spacing at the detector, then the bare ratio (PS3.3 C.7.6.3.1.7).
#: Each holds the vertical (between rows) value first.
ASPECT_TAGS = ("PixelSpacing", "ImagerPixelSpacing", "PixelAspectRatio")
#: Group numbers a dataset written without the Part 10 preamble starts with: its file meta
#: information (0002), or, in files older than Part 10, the first data element (0008).
_RAW_START_GROUPS = (b"\x02\x00", b"\x08\x00")
#: The two-letter value representations of explicit VR encoding.
_VRS = frozenset(v.value.encode() for v in VR if len(v.value) == 2)
#: Tags every image must hold for its pixels to be read, by keyword.
PIXEL_TAGS = (
    "Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation",
    "PhotometricInterpretation",
)


class DicomRejected(ValueError):
    """A DICOM file that is not a single-frame radiograph the model can read.

    The message says what the file is and what to send instead; it never names a path.
    """


def unreadable(part: str, exc: Exception) -> DicomRejected:
    """The refusal of a DICOM file pydicom fails on, in pydicom's own words (they name the
    attribute: a VOI LUT descriptor, a value that does not parse), never a path.

    Args:
        part: ``header`` or ``pixel data``.
        exc: what pydicom (or the display pipeline on its values) raised.
    """
    log.info("DICOM %s unreadable: %s: %s", part, type(exc).__name__, exc)
    detail = " ".join(str(exc).split())[:200] or type(exc).__name__
    return DicomRejected(
        f"its {part} cannot be read ({type(exc).__name__}: {detail}); send the file as the modality or PACS wrote it"
    )


def is_dicom(data: bytes) -> bool:
    """True when ``data`` starts like a DICOM file.

    That is a Part 10 file (128-byte preamble, then ``DICM``), or a little-endian dataset
    written without the preamble, as some PACS exports and older (ACR-NEMA era) archives hold
    them (:func:`_is_raw_dataset`; big-endian ones are not recognised). ``data`` needs only the
    file's first 132 bytes.
    """
    if len(data) >= 132 and data[128:132] == b"DICM":
        return True
    return _is_raw_dataset(data)


def _is_raw_dataset(data: bytes) -> bool:
    """A little-endian dataset without the preamble: its first element, read as explicit VR
    (a VR the standard defines), or as implicit VR (group 0008 only: file meta information is
    always explicit) whose even-length value lies inside ``data`` and is followed, where
    ``data`` reaches that far, by an element of the same group with a higher number."""
    if len(data) < 8 or data[:2] not in _RAW_START_GROUPS:
        return False
    if data[4:6] in _VRS:
        return True
    if data[:2] != b"\x08\x00":
        return False
    length = int.from_bytes(data[4:8], "little")
    if length % 2 or length > len(data) - 8:
        return False
    after = data[8 + length : 12 + length]
    if len(after) < 4:
        return True
    return after[:2] == b"\x08\x00" and int.from_bytes(after[2:4], "little") > int.from_bytes(data[2:4], "little")


def _file_meta(ds: Dataset) -> Dataset:
    """The file meta information, or an empty dataset for a file written without it."""
    meta = getattr(ds, "file_meta", None)
    return meta if meta is not None else Dataset()


#: The pixels of the largest radiograph a deflated dataset is inflated for: ``serve.max_megapixels``'
#: default. One bound for training, validation and every consumer, whatever the policy says, so
#: that a file is accepted or refused alike everywhere (the policy's own pixel limit applies after).
MAX_PIXELS = 50_000_000


def max_inflated(max_pixels: int = MAX_PIXELS) -> int:
    """The most bytes a deflated dataset may inflate to: an image of ``max_pixels`` at 24 bits (RGB;
    a greyscale one takes 16 at most), and 16 MiB of header around it."""
    return 3 * max_pixels + 16 * 2**20


def parse_bytes(data: bytes, **kwargs: object) -> Dataset:
    """``dcmread`` of a Part 10 file's bytes (with or without the preamble), inflating a deflated
    dataset here, to at most :func:`max_inflated` bytes, rather than in pydicom, which inflates all
    of it: how anything in the product reads DICOM it did not write (an input, a report found in a
    report folder), so that a small deflated file cannot inflate to gigabytes there.

    Args:
        data: the file's bytes.
        **kwargs: ``dcmread``'s ``stop_before_pixels`` and ``specific_tags``, read as it reads them.

    Raises:
        DicomRejected: a deflated dataset inflates to more than that, or is not deflate data.
    """
    # force: a dataset without the preamble (is_dicom has already told it from other files).
    force = data[128:132] != b"DICM"
    fp = DicomBytesIO(data)
    read_preamble(fp, force)
    meta = _read_file_meta_info(fp)
    if meta.get("TransferSyntaxUID") != uid.DeflatedExplicitVRLittleEndian:
        return dcmread(io.BytesIO(data), force=force, **kwargs)
    limit = max_inflated(MAX_PIXELS)  # read at each call, so a test can lower it
    deflated = f"is deflated (transfer syntax {uid.DeflatedExplicitVRLittleEndian})"
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    source, start = memoryview(data), fp.tell()
    pending, parts, total = source[start:start], [], 0
    try:
        while not inflater.eof:  # in pieces, so a bomb is refused holding no more than the bound
            if not pending and start < len(source):
                # The input fed in slices too: unconsumed_tail copies what is left of the input given.
                pending, start = source[start : start + _INFLATE_FEED], start + _INFLATE_FEED
            # With the input all given, zlib may still hold output (a piece stopped at 1 MiB inside a
            # run of zeros): it comes with no more input, and only nothing coming means a cut stream.
            part = inflater.decompress(pending, 2**20)
            pending = inflater.unconsumed_tail
            if not part and not pending and start >= len(source) and not inflater.eof:
                raise DicomRejected(f"{deflated} but its deflate data ends early (a damaged or cut-off file); "
                                    "export it again")
            total += len(part)
            if total > limit:
                raise DicomRejected(
                    f"{deflated} and inflates to more than {limit / 1e6:.0f} MB, more than a radiograph of "
                    f"{MAX_PIXELS / 1e6:g} megapixels holds: a decompression bomb, or a dataset carrying far more "
                    "than its image; export it uncompressed or JPEG-compressed"
                )
            parts.append(part)
    except zlib.error as exc:
        raise DicomRejected(f"{deflated} but its deflate data is damaged ({exc}); export it again") from exc
    body = DicomBytesIO(b"".join(parts))
    del parts
    # The inflated dataset is Explicit VR Little Endian (PS3.5 A.5), read as pydicom reads it, not
    # searched for a preamble (a value reading DICM at byte 128 would be taken for one); the meta,
    # the deflated transfer syntax among it, is the file's own.
    tags = kwargs.get("specific_tags")
    dataset = read_dataset(
        body, is_implicit_VR=False, is_little_endian=True,
        stop_when=_at_pixel_data if kwargs.get("stop_before_pixels") else None,  # dcmread's own test
        specific_tags=None if tags is None else [Tag(t) for t in tags],
    )
    ds = FileDataset(body, dataset, None, meta, is_implicit_VR=False, is_little_endian=True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds


#: How much deflated input is handed to zlib at a time.
_INFLATE_FEED = 2**18


def read_header(data: bytes) -> Dataset:
    """Parses a DICOM file without decoding its pixels (with or without the Part 10 preamble).

    Raises:
        DicomRejected: the bytes are not a readable DICOM file, or a deflated one inflates past
            :func:`max_inflated`.
    """
    try:
        ds = parse_bytes(data)
    except DicomRejected:
        raise
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError) as exc:
        raise DicomRejected(f"is not a readable DICOM file ({type(exc).__name__})") from exc
    if "TransferSyntaxUID" not in ds.file_meta:
        # A dataset without file meta information is uncompressed (an encapsulated one cannot be
        # read without it); its transfer syntax is the encoding pydicom found it in.
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            uid.ImplicitVRLittleEndian if implicit else uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian
        )
    return ds


def patient_ids(path: Path) -> tuple[str, str] | None:
    """A DICOM file's Issuer of Patient ID and Patient ID, read from its header alone.

    Returns:
        Both, stripped (the issuer may be empty); None for a file that is not DICOM, whose
        header cannot be read (the validate stage reports an unreadable file when it decodes
        it), or whose Patient ID is empty.
    """
    try:
        tags = {"stop_before_pixels": True, "specific_tags": ["IssuerOfPatientID", "PatientID"]}
        with path.open("rb") as handle:
            start = handle.read(132)
            if not is_dicom(start):
                return None
            handle.seek(0)
            read_preamble(handle, start[128:132] != b"DICM")
            deflated = _read_file_meta_info(handle).get("TransferSyntaxUID") == uid.DeflatedExplicitVRLittleEndian
        if deflated:  # pydicom would inflate all of it to read two tags: inflated here, bounded
            ds = parse_bytes(path.read_bytes(), **tags)
        else:
            ds = dcmread(path, force=start[128:132] != b"DICM", **tags)
        patient = str(ds.get("PatientID") or "").strip()
        issuer = str(ds.get("IssuerOfPatientID") or "").strip()
    except Exception:  # noqa: BLE001 - an unreadable file or a damaged header (unknown VR) links nothing
        log.debug("%s: no Patient ID could be read", path, exc_info=True)
        return None
    return (issuer, patient) if patient else None


def patient_key(issuer: str, patient: str) -> str:
    """A pseudonymous key of a patient: ``dicom-`` and 16 hex digits of the sha256 of the Issuer
    of Patient ID and the Patient ID, so two files share it exactly when both agree.

    Only equality is used (a patient's images are kept in one split); the identifier itself is
    not copied into the tables the pipeline writes. A hash of a short identifier is no
    anonymisation (every value can be tried), so those tables stay where the export is kept.
    """
    return "dicom-" + hashlib.sha256(f"{issuer}\0{patient}".encode()).hexdigest()[:16]


def check_complete(ds: Dataset) -> None:
    """Checks that compressed pixel data is whole and is the image its header describes.

    pydicom hands a JPEG frame that stops early to pylibjpeg, which decodes it without complaint
    and fills the rows past the end with whatever the decoder left there. Such a file can be
    neither scored nor trained on as it stands, whatever ``on_truncated`` says for a JPEG file
    (whose missing rows Pillow fills with grey, the same in training and serving).

    The codestream's own size must be Columns x Rows (PS3.5 8.2): pydicom decodes whatever the
    codestream holds and reshapes it to the header's size, so a header with Rows and Columns
    swapped gave scrambled pixels, and a codestream larger than its header was decoded in full
    before anything noticed (past the size checks made on the header). The size is read from the
    codestream's header (:func:`codestream_size`), before a pixel is decoded.

    A JPEG or JPEG-LS frame of more than :data:`MAX_JPEG_SCANS` scans is refused before it is
    decoded, as such a JPEG file is.

    Raises:
        DicomRejected: the frame of a JPEG, JPEG-LS or JPEG 2000 transfer syntax lacks its end
            marker, holds too many scans, or its size is not the header's Columns x Rows.
    """
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax not in MARKED_END or "PixelData" not in ds:
        return
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except (StopIteration, ValueError, KeyError) as exc:
        raise DicomRejected(f"has compressed pixel data ({syntax.name}) whose fragments cannot be read: {exc}") from exc
    # The marker ends the codestream; encoders pad a frame to even length (00), and some write
    # fill bytes (FF) or a few bytes of their own after it. Inside the coded data FF D9 cannot
    # occur (JPEG stuffs FF as FF 00; JPEG 2000 forbids FF followed by a byte above 8F), so the
    # marker among the last bytes means the codestream is whole.
    if b"\xff\xd9" not in frame.rstrip(b"\x00\xff")[-16:]:
        raise DicomRejected(
            f"has compressed pixel data ({syntax.name}) that ends early: the codestream stops before its end "
            "marker, so the file is cut short (an interrupted transfer or export); send the complete file"
        )
    if syntax in JPEG_FAMILY and (scans := frame.count(b"\xff\xda")) > MAX_JPEG_SCANS:
        raise DicomRejected(
            f"has compressed pixel data ({syntax.name}) of {scans} scans, more than the {MAX_JPEG_SCANS} any X-ray "
            "export writes: it is refused, since decoding passes over the whole image once a scan (minutes for "
            "thousands of them); send it exported again uncompressed or as a plain JPEG"
        )
    size = codestream_size(frame, jpeg=syntax in JPEG_FAMILY)
    if size is None:
        return  # a header this reader does not follow: the decoder judges the codestream
    width, height = size
    columns, rows = int(ds.Columns), int(ds.Rows)
    # A JPEG may leave its height to a DNL marker after the first scan (height 0 in its SOF).
    if width != columns or (height and height != rows):
        shown = f"{width} x {height}" if height else f"{width} px wide"
        raise DicomRejected(
            f"has compressed pixel data ({syntax.name}) whose image is {shown} px (width x height) while its header "
            f"declares Columns {columns} and Rows {rows}; the two must agree (PS3.5 8.2), or the pixels would be "
            "misplaced: re-export the image from the PACS"
        )


def codestream_size(frame: bytes, jpeg: bool) -> tuple[int, int] | None:
    """The (width, height) a JPEG, JPEG-LS or JPEG 2000 codestream declares, read from its header.

    Pillow reads neither JPEG-LS nor 12-bit or lossless JPEG headers, so the segments are
    followed here: JPEG and JPEG-LS to their Start of Frame (SOF0-15, SOF55: ITU-T T.81 B.2.2),
    JPEG 2000 (HTJ2K too) to its SIZ segment (ISO/IEC 15444-1 A.5.1), inside a JP2 file's
    codestream box if an encoder wrapped it in one.

    Args:
        frame: the codestream.
        jpeg: a JPEG or JPEG-LS codestream; else JPEG 2000.

    Returns:
        The size, with height 0 where a JPEG leaves it to a DNL marker; ``None`` for a header
        that cannot be followed.
    """
    return _jpeg_size(frame) if jpeg else _j2k_size(frame)


def _jpeg_size(frame: bytes) -> tuple[int, int] | None:
    if frame[:2] != b"\xff\xd8":
        return None
    offset = 2
    while offset + 9 <= len(frame):
        if frame[offset] != 0xFF:
            return None
        marker = frame[offset + 1]
        if marker == 0xFF:  # fill byte before a marker
            offset += 1
            continue
        if marker in _SOF:  # FF Cn, length, precision, then height and width
            width, height = frame[offset + 7 : offset + 9], frame[offset + 5 : offset + 7]
            return int.from_bytes(width, "big"), int.from_bytes(height, "big")
        if marker in (0xDA, 0xD9):  # Start of Scan or End of Image before any frame header
            return None
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            offset += 2
            continue
        offset += 2 + int.from_bytes(frame[offset + 2 : offset + 4], "big")
    return None


def _j2k_size(frame: bytes) -> tuple[int, int] | None:
    offset = 0
    if frame[4:8] == b"jP  ":  # a JP2 file: its boxes, up to the contiguous codestream box (jp2c)
        offset = None
        at = 0
        while at + 8 <= len(frame):
            length, box = int.from_bytes(frame[at : at + 4], "big"), frame[at + 4 : at + 8]
            if box == b"jp2c":
                offset = at + 8
                break
            if length < 8:
                return None
            at += length
        if offset is None:
            return None
    # SOC, then SIZ: length, capabilities, then Xsiz, Ysiz, XOsiz, YOsiz (4 bytes each).
    siz = frame[offset : offset + 24]
    if len(siz) < 24 or siz[:4] != b"\xff\x4f\xff\x51":
        return None
    xsiz, ysiz, xosiz, yosiz = (int.from_bytes(siz[i : i + 4], "big") for i in (8, 12, 16, 20))
    if xosiz > xsiz or yosiz > ysiz:
        return None
    return xsiz - xosiz, ysiz - yosiz


#: Words of a Body Part Examined value that say which side, not which part ("HAND LT", "L WRIST",
#: "KNEE RIGHT"): left out before the value is matched (:func:`names_body_part`).
LATERALITY = frozenset({"L", "R", "LT", "RT", "LEFT", "RIGHT", "BILAT", "BILATERAL"})
#: Words of a Body Part Examined value that say how the X-ray was taken, not of which part ("KNEE AP",
#: "HAND OBL", "FOOT LAT", "ANKLE MORTISE"), as modalities append the view to it: View Position
#: (0018,5101)'s defined terms (AP, PA, LL, RL, RLD, LLD, RLO, LLO), the projections spelled out or
#: cut short (LATERAL, LAT, OBLIQUE, OBL, DP and PD for dorsopalmar or dorsoplantar, AXIAL, FRONTAL)
#: and the named limb views. Left out before the value is matched, as laterality is: the part is
#: what the value names besides them, so "CHEST PA" is still the chest.
VIEWS = frozenset({
    "AP", "PA", "LL", "RL", "RLD", "LLD", "RLO", "LLO", "LAT", "LATERAL", "OBL", "OBLQ", "OBLIQUE", "DP", "PD",
    "AX", "AXIAL", "FRONTAL", "VIEW", "VIEWS", "MORTISE", "SUNRISE", "SKYLINE", "FROG",
})
#: Plurals that are not the term with an S (FINGERS, HANDS), -AE (ULNAE, TIBIAE) or -I (RADII,
#: HUMERI), as a Body Part Examined value may be written: English and Latin ones.
PLURALS = {"FEET": "FOOT", "CALVES": "CALF", "FEMORA": "FEMUR", "PELVES": "PELVIS", "PHALANGES": "PHALANX"}
#: Words that name bones of more than one listed part, with those parts: PS3.16 Annex L has no
#: defined term for them. A phalanx is a bone of a finger (the thumb's too) or of a toe, so PHALANX
#: (or PHALANGES) names a listed part only where FINGER and TOE are both listed; a site that reads
#: the fingers alone is not sent a toe's phalanges.
WITHIN = {"PHALANX": ("FINGER", "TOE")}


def _compact(term: str) -> str:
    """A body part term in capitals, without the spaces, underscores or other non-letters
    between its words (LOWER LIMB and LOWER_LIMB are LOWERLIMB)."""
    return re.sub(r"[^A-Z]", "", term.upper())


def _singulars(word: str) -> set[str]:
    """The terms one word may be, itself or the singular of its plural: English (FINGERS, EXTREMITIES,
    FEET) or Latin (ULNAE, RADII, FEMORA, PHALANGES)."""
    found = {word}
    if word in PLURALS:
        found.add(PLURALS[word])
    if word.endswith("S"):
        found.add(word[:-1])
    if word.endswith("IES"):
        found.add(word[:-3] + "Y")
    if word.endswith("AE"):  # ULNAE, TIBIAE, FIBULAE, PATELLAE, SCAPULAE
        found.add(word[:-1])
    if word.endswith("I"):  # RADII, HUMERI, CALCANEI
        found.add(word[:-1] + "US")
    return found


def _listed_word(word: str, listed: frozenset[str]) -> bool:
    """Whether one word (or several run together) is a listed term, or a plural of one (FINGERS,
    HANDS, FEET, EXTREMITIES, UPPERARMS, ULNAE, RADII), or a :data:`WITHIN` word every part of
    which is listed (PHALANGES)."""
    return any(
        term in listed or (term in WITHIN and all(part in listed for part in WITHIN[term]))
        for term in _singulars(word)
    )


def names_body_part(value: str, body_parts: Iterable[str]) -> bool:
    """Whether one Body Part Examined value names a part in ``body_parts``, written as modalities
    and technologists write it.

    The value is read in capitals and split into words on whatever is not a letter (spaces,
    underscores, slashes); words of :data:`LATERALITY` and :data:`VIEWS` are left out. It names a
    listed part when the value as a whole is a listed term (a site's "L SPINE"), when its words, run
    together, are one listed term or its plural (LOWER_LIMB, "UPPER ARMS", "HAND LT", "KNEE AP"), or
    when every word is a listed term or its plural, English or Latin ("L WRIST", FINGERS, "ANKLE/FOOT",
    RADII, PHALANGES: :func:`_listed_word`). So "CHEST PA", THORAX or WHOLEBODY name no limb, and a
    term in another language (HANDGELENK) is not read as one: a site that writes it adds it to
    ``serve.body_parts``.
    """
    listed = frozenset(_compact(part) for part in body_parts)
    if _compact(value) in listed:  # as listed, a site's own term with a side word in it (L SPINE) too
        return True
    left_out = LATERALITY | VIEWS
    words = [word for word in re.split(r"[^A-Z]+", value.upper()) if word and word not in left_out]
    return bool(words) and (_listed_word("".join(words), listed) or all(_listed_word(word, listed) for word in words))


def _multi(value: object) -> list[str]:
    """An attribute's values as strings, stripped, empty ones left out (one, or several of a
    multi-valued attribute such as ``HAND\\WRIST``)."""
    values = value if isinstance(value, (MultiValue, list, tuple)) else [value]
    return [text for v in values if v is not None and (text := str(v).strip())]


def coded_region(item: Dataset) -> tuple[str, str] | None:
    """One Anatomic Region Sequence (0008,2218) item as (how a message names it: its meaning and
    code; what it is matched as: the :data:`~fracture.vocabulary.LIMBS` term DICOM maps its code to
    (PS3.16 Annex L, :data:`~fracture.vocabulary.LIMB_CODES`; a legacy SNOMED-RT code matches its
    SNOMED CT one, as pydicom's :class:`~pydicom.sr.coding.Code` compares them), else its Code
    Meaning, read as a Body Part Examined value). ``None``: an item with neither code nor meaning."""
    value = str(item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue") or "").strip()
    scheme = str(item.get("CodingSchemeDesignator") or "").strip()
    meaning = str(item.get("CodeMeaning") or "").strip()
    if not value and not meaning:
        return None
    from pydicom.sr.coding import Code  # noqa: PLC0415 - pydicom.sr loads SNOMED's tables (0.1 s): only where needed

    code = Code(value, scheme, meaning)
    term = next((term for sct, term in LIMB_CODES.items() if code == Code(sct, "SCT", term)), None)
    named = ", ".join(part for part in (meaning, f"{scheme} {value}".strip()) if part)
    return named, term or meaning


def check_body_part(ds: Dataset, body_parts: Iterable[str] | None = LIMBS) -> None:
    """Refuses a radiograph whose header names a region outside ``body_parts`` (a chest, a spine, a
    skull: X-rays the model never saw, on which its "not fractured" would read as a finding). A
    header that names none is read: it cannot tell. ``None`` accepts any.

    The region is named in two places: Body Part Examined (0018,0015), a defined term, and Anatomic
    Region Sequence (0008,2218), a code (:func:`coded_region`; the DX IOD's Type 2 anatomy, where
    Body Part Examined is Type 3). Each value of the one (a multi-valued one, ``HAND\\WRIST``, has
    several) and each item of the other must name a listed part, as :func:`names_body_part` reads
    it: laterality, the view and plurals allowed. A code outside the limbs is read by its Code Meaning
    (``Chest``, ``Cervical spine``), which a site that reads such regions lists.

    Raises:
        DicomRejected: the region named, with the setting that lists those read; where the two
            attributes disagree (HAND, and a code for the thorax), both.
    """
    if body_parts is None:
        return
    parts = tuple(body_parts)
    values = _multi(ds.get("BodyPartExamined"))
    regions = [region for item in ds.get("AnatomicRegionSequence") or () if (region := coded_region(item))]
    examined_read = all(names_body_part(value, parts) for value in values)
    coded_read = all(names_body_part(match, parts) for _, match in regions)
    if examined_read and coded_read:
        return
    examined = "\\".join(values) + " (its Body Part Examined)"  # several values as DICOM writes them
    coded = "; ".join(named for named, _ in regions) + " (its Anatomic Region Sequence)"
    if values and regions and examined_read != coded_read:
        raise DicomRejected(
            f"names two regions that disagree, {examined} and {coded}, and the {'second' if examined_read else 'first'} "
            f"is none the model reads: correct the header at the modality or PACS; {_body_parts_read(parts)}"
        )
    named = [what for what, read in ((examined, examined_read), (coded, coded_read)) if not read]
    raise DicomRejected(f"is an X-ray of {' and '.join(named)}; {_body_parts_read(parts)}")


def _body_parts_read(body_parts: tuple[str, ...]) -> str:
    """What a refusal for the body part says the model reads, and what to do: the regions
    FracAtlas shows when ``body_parts`` is the default list, else the list itself."""
    if frozenset(body_parts) == frozenset(LIMBS):
        read = ("the model was trained on X-rays of the hand, leg, hip and shoulder, and reads the body parts "
                "params' serve.body_parts lists only")
    else:
        read = f"the model reads the body parts params' serve.body_parts lists only ({', '.join(body_parts)})"
    return (
        f"{read}, with laterality (L, RIGHT), the view (AP, LAT) or a plural in the value allowed: send an X-ray of one of them, or, where "
        "the value or code meaning names one in other words (a local term such as HANDGELENK), add it to "
        "serve.body_parts"
    )


def check_radiograph(ds: Dataset, modalities: Iterable[str] | None = RADIOGRAPHY) -> tuple[int, int]:
    """Checks that ``ds`` is one grayscale (or RGB) radiograph; returns the (width, height) of the
    image :func:`to_display` makes of it (Columns x Rows, unless its pixels are resampled to square
    ones: :func:`display_size`), so that size limits hold for what is decoded and shown.

    ``modalities``: the modalities accepted; ``None`` accepts any, for a file whose modality was
    accepted before (the stages after validate decode only the files it accepted).

    Raises:
        DicomRejected: no pixel data (a report, PDF or other non-image object), a transfer
            syntax that is not the standard's (a vendor's private one), more than one
            frame, a modality not in ``modalities``, a photometric interpretation other
            than MONOCHROME1, MONOCHROME2 or 8-bit colour (RGB, YBR_FULL, YBR_FULL_422, and
            YBR_RCT or YBR_ICT in JPEG 2000 pixel data), or more than 16 bits a pixel; a missing tag that describes the pixels (named); pixels
            more than :data:`MAX_PIXEL_ASPECT` times as tall as wide or the reverse.
    """
    sop = str(ds.get("SOPClassUID", "") or _file_meta(ds).get("MediaStorageSOPClassUID", ""))
    what = NOT_IMAGES.get(sop) or ("a structured report" if sop.startswith(STRUCTURED_REPORTS) else None)
    if what:
        raise DicomRejected(f"is {what}, not an image; send the radiograph's own DICOM file")
    if "PixelData" not in ds and ("FloatPixelData" in ds or "DoubleFloatPixelData" in ds):
        raise DicomRejected("holds floating-point pixel data, which no radiograph is stored as (a parametric map, "
                            "say); send the radiograph's own DICOM file")
    if "PixelData" not in ds:
        # An image's SOP class, or the tags that describe pixels, without the pixels: a file cut
        # short inside its header (an interrupted transfer), not a report or a document.
        # The file meta's class too: a file cut inside the dataset's own SOP Class UID.
        classes = [uid.UID(str(c)).name for c in (ds.get("SOPClassUID"), _file_meta(ds).get("MediaStorageSOPClassUID")) if c]
        image = next((name for name in classes if "Image Storage" in name), None)
        if image or any(tag in ds for tag in PIXEL_TAGS):
            kind = f"a {image} object" if image else "an image"
            raise DicomRejected(
                f"is {kind} that ends before its pixel data: the file is cut short or damaged (an interrupted "
                "transfer or export); send the complete file"
            )
        raise DicomRejected("is a DICOM object without pixel data, not an image; send the radiograph's own DICOM file")
    syntax = _file_meta(ds).get("TransferSyntaxUID")
    if syntax is not None and uid.UID(str(syntax)) not in uid.AllTransferSyntaxes:
        whose = "a vendor's private one" if uid.UID(str(syntax)).is_private else "one this reader does not know"
        raise DicomRejected(
            f"has its pixel data in transfer syntax {syntax}, {whose}, which this reader cannot decode; send the "
            "image uncompressed (Explicit VR Little Endian) or as JPEG, JPEG-LS, JPEG 2000 or RLE, as the PACS exports it"
        )
    intent = str(ds.get("PresentationIntentType") or "").upper()
    if sop in FOR_PROCESSING or intent == "FOR PROCESSING":
        raise DicomRejected(
            f"is an image FOR PROCESSING ({FOR_PROCESSING.get(sop, 'Presentation Intent Type FOR PROCESSING')}): raw "
            "detector data that no viewer displays; send the FOR PRESENTATION image the PACS shows"
        )
    missing = [tag for tag in PIXEL_TAGS if ds.get(tag) is None]
    if missing:
        raise DicomRejected(f"lacks {', '.join(missing)}, which describe its pixels; the file is incomplete")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise DicomRejected(
            f"holds {frames} frames; the model reads single-frame radiographs: send one frame per file"
        )
    allowed = tuple(modalities) if modalities is not None else None
    modality = str(ds.get("Modality") or "")
    if allowed is not None and modality not in allowed:
        raise DicomRejected(
            f"has modality {modality or '(none)'}; the model reads {', '.join(allowed)} radiographs only "
            "(params: serve.modalities)"
        )
    photometric = str(ds.get("PhotometricInterpretation") or "")
    bits = int(ds.get("BitsAllocated") or 0)
    if photometric not in MONOCHROME and not (photometric in COLOUR and bits == 8):
        raise DicomRejected(
            f"has photometric interpretation {photometric or '(none)'} ({bits}-bit); the model reads "
            "MONOCHROME1, MONOCHROME2 or 8-bit colour (RGB, YBR_FULL, YBR_FULL_422; JPEG 2000's YBR_RCT and "
            "YBR_ICT) radiographs"
        )
    if photometric in JPEG2000_COLOUR and syntax not in uid.JPEG2000TransferSyntaxes:
        raise DicomRejected(
            f"has photometric interpretation {photometric}, which only JPEG 2000 pixel data holds (PS3.5 8.2.4), in "
            f"transfer syntax {getattr(syntax, 'name', syntax)}; the header is corrupt: re-export the image from the PACS"
        )
    samples = int(ds.SamplesPerPixel)
    if samples != (1 if photometric in MONOCHROME else 3):
        raise DicomRejected(
            f"has Samples per Pixel {samples} with photometric interpretation {photometric}, which has "
            f"{1 if photometric in MONOCHROME else 3} (PS3.3 C.7.6.3.1.1); the header is corrupt: re-export the image "
            "from the PACS"
        )
    # Type 1C for colour (PS3.3 C.7.6.3.1.3); pydicom's decoders need it, compressed or not.
    if samples > 1 and ds.get("PlanarConfiguration") is None:
        raise DicomRejected(
            "lacks PlanarConfiguration, which says how its colour samples are laid out; the file is incomplete: "
            "re-export the image from the PACS"
        )
    stored = int(ds.get("BitsStored") or 0)
    if bits > MAX_BITS or stored > MAX_BITS:
        raise DicomRejected(
            f"has {bits} bits allocated and {stored} stored per pixel; radiographs hold at most {MAX_BITS} "
            "(PS3.3 C.8.11.3): send the image as the modality stored it"
        )
    for tag in ("RescaleSlope", "RescaleIntercept"):
        if tag in ds and ds.get(tag) in (None, ""):
            raise DicomRejected(f"has an empty {tag}, which the modality transform needs; the header is corrupt")
    high_bit = ds.get("HighBit")
    if high_bit is not None and stored and int(high_bit) != stored - 1:
        # pydicom reads the low Bits Stored bits and ignores High Bit: a shifted layout would
        # decode into other values, silently.
        raise DicomRejected(
            f"has High Bit {int(high_bit)} with {stored} bits stored; the standard requires High Bit to be one "
            "less than Bits Stored (PS3.3 C.7.6.3.1), as pre-DICOM (ACR-NEMA) layouts were not: re-export the "
            "image from the PACS"
        )
    width = ds.get("WindowWidth")
    if width is not None and not ds.get("VOILUTSequence"):  # an empty sequence holds no LUT: the window applies
        first = float(width[0] if isinstance(width, MultiValue) else width)
        function = str(ds.get("VOILUTFunction") or "LINEAR").upper()
        if function == "LINEAR" and first < 1:
            raise DicomRejected(f"has WindowWidth {first:g}; the standard requires at least 1 (PS3.3 C.11.2.1.2)")
        if first <= 0:
            raise DicomRejected(
                f"has WindowWidth {first:g} with VOI LUT Function {function}; the standard requires more than 0 "
                "(PS3.3 C.11.2.1.3)"
            )
    slope = ds.get("RescaleSlope")
    if slope is not None and not ds.get("ModalityLUTSequence") and float(slope) == 0:
        raise DicomRejected("has RescaleSlope 0, which maps every pixel to one value; the header is corrupt")
    aspect = pixel_aspect(ds)
    if aspect is not None and max(aspect[0], 1 / aspect[0]) > MAX_PIXEL_ASPECT:
        ratio, tag = aspect
        raise DicomRejected(
            f"has {tag} {_values(ds.get(tag))}: pixels {max(ratio, 1 / ratio):g} times as "
            f"{'tall as wide' if ratio > 1 else 'wide as tall'}, where a radiograph's are square or nearly "
            f"(at most {MAX_PIXEL_ASPECT:g} apart here); the header is corrupt: re-export the image from the PACS"
        )
    return display_size(ds)


def _values(value: object) -> str:
    """A multi-valued attribute as DICOM writes it (``0.2\\0.1``)."""
    return "\\".join(f"{float(v):g}" for v in value) if isinstance(value, (MultiValue, list, tuple)) else str(value)


def pixel_aspect(ds: Dataset) -> tuple[float, str] | None:
    """A pixel's height over its width, and the attribute it is read from; ``None`` when the
    header gives none (square pixels, as a viewer assumes).

    From the first of :data:`ASPECT_TAGS` that holds two positive numbers: Pixel Spacing, Imager
    Pixel Spacing (row spacing, then column spacing, in mm) or Pixel Aspect Ratio (vertical,
    then horizontal). One that cannot be read (a wrong count, a value that is not a number, 0)
    says nothing, and the next one is read.
    """
    for tag in ASPECT_TAGS:
        try:
            value = ds.get(tag)
            if value is None:
                continue
            vertical, horizontal = (float(v) for v in value)
        except (TypeError, ValueError, OverflowError):  # a count other than 2, or not numbers
            log.debug("DICOM %s unreadable, ignored", tag, exc_info=True)
            continue
        if np.isfinite(vertical) and np.isfinite(horizontal) and vertical > 0 and horizontal > 0:
            return vertical / horizontal, tag
    return None


def display_size(ds: Dataset) -> tuple[int, int]:
    """The (width, height) :func:`to_display` gives ``ds``: Columns x Rows, with the axis along
    which pixels are coarser stretched to square pixels when their height and width differ by
    more than :data:`ASPECT_TOLERANCE` (upsampled, as MONAI's ``Spacing`` and viewers resample,
    so no detail along the finer axis is lost)."""
    width, height = int(ds.Columns), int(ds.Rows)
    aspect = pixel_aspect(ds)
    if aspect is None or max(aspect[0], 1 / aspect[0]) <= 1 + ASPECT_TOLERANCE:
        return width, height
    ratio = aspect[0]
    if ratio > 1:  # taller than wide: more rows
        return width, max(1, round(height * ratio))
    return max(1, round(width / ratio)), height


def square_pixels(display: np.ndarray, ds: Dataset) -> np.ndarray:
    """``display`` resampled to :func:`display_size` (bilinear, MONAI's ``Spacing`` default), or
    ``display`` itself when its pixels are square."""
    height, width = display.shape[:2]
    size = display_size(ds)
    if size == (width, height):
        return display
    ratio, tag = pixel_aspect(ds) or (1.0, "")
    log.info(
        "DICOM pixels %g times as tall as wide (%s %s): resampled from %d x %d to %d x %d px, square pixels",
        ratio, tag, _values(ds.get(tag)), width, height, *size,
    )
    return np.asarray(Image.fromarray(display).resize(size, Image.Resampling.BILINEAR))


def voi_range(ds: Dataset, values: np.ndarray) -> tuple[float, float]:
    """The range the VOI transform maps onto, as pydicom's ``apply_voi_lut`` produces it.

    A VOI LUT gives 0 .. 2**bits - 1 (its bits per entry: :func:`voi_lut_bits`); a window gives
    the stored value range after the modality transform (pydicom's ``y_min`` / ``y_max``); with
    neither, the image's own minimum and maximum.
    """
    voi = ds.get("VOILUTSequence")
    if voi and voi[0].get("LUTDescriptor") is not None and voi[0].get("LUTData") is not None:
        return 0.0, float(2 ** voi_lut_bits(ds) - 1)
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        modality_lut = ds.get("ModalityLUTSequence")
        if modality_lut:
            return 0.0, float(2 ** int(modality_lut[0].LUTDescriptor[2]) - 1)
        return _rescaled_range(ds)
    return float(values.min()), float(values.max())


def voi_lut_bits(ds: Dataset) -> int:
    """The bits per entry of ``ds``'s first VOI LUT: its descriptor's third value, unless that is
    more than 12 and every entry fits in 12 bits (the largest below 2**12), in which case the
    entries' own bit depth (the bits their largest value needs, at least 8).

    Some CR modalities (Agfa's among them) write a descriptor of 16 bits per entry over entries
    that only reach 4095: taken at its word, the output range 0..65535 leaves the image within
    its darkest sixteenth, near-blank. Cornerstone and Horos take the range from the entries'
    largest value, and dcmtk offers a check of the LUT's bit depth (``CIF_CheckLutBitDepth``, off by
    default); this reader does so only for 12-bit entries under a wider descriptor, the case seen,
    so that a LUT of 16-bit entries that stops short of its range (at 30000, say) is read at its
    word. pydicom's ``apply_voi_lut`` returns the entries as they are and leaves the range to its caller.
    """
    bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
    if bits <= 8:
        return bits
    entries, first, _ = (int(v) for v in _voi_dataset(ds).VOILUTSequence[0].LUTDescriptor)
    table = _apply_voi(np.arange(first, first + (entries or 2**16), dtype=np.int32), ds)
    largest = int(table.max()) if table.size else 0
    if bits <= 12 or largest >= 2**12:
        return bits
    actual = max(largest.bit_length(), 8)
    log.info("DICOM VOI LUT of %d bits per entry whose largest entry is %d: read as %d bits", bits, largest, actual)
    return actual


def _rescaled_range(ds: Dataset) -> tuple[float, float]:
    """The stored values' range (Bits Stored, signed or not) taken through the rescale, as pydicom
    applies it (both Rescale Slope and Intercept given; otherwise the stored range itself). The
    ends are in stored order: a negative slope gives ``low`` above ``high``."""
    bits = int(ds.BitsStored)
    if int(ds.PixelRepresentation) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return low, high


def _signed(value: int) -> int:
    """A 16-bit value of a signed image written with VR US read as the signed value it encodes
    (32768 is -32768): the standard lets such values be US or SS, and a signed image's are SS in
    meaning (PS3.3 C.7.5.1.1.2, C.11.2.1.1); pydicom resolves the VR only in implicit VR files."""
    return value - 2**16 if value >= 2**15 else value


def _fixed_lut(ds: Dataset, keyword: str, signed: bool, words: bool = False) -> DataElement | None:
    """``ds``'s LUT sequence ``keyword`` (a Modality or VOI LUT Sequence) as pydicom must see it;
    ``None`` when its first LUT Descriptor needs no change. The items are new datasets of the same
    elements: the caller's are left as they were.

    - ``signed`` (the LUT's input can be negative): the first mapped value, written as US (63488
      for -2048), is read as the signed value it encodes.
    - ``words``: 10 to 15 bits per entry are declared as 16. Such entries are 16-bit words
      (PS3.3 C.11.1.1.1 allows only 8 or 16 for a Modality LUT, but files with 12 exist); pydicom
      reads a Modality LUT's entries as ``uint<bits>``, which is no type for 12, as it already
      does for a VOI LUT's 10 to 16 (pydicom issue #2317).
    """
    lut = ds.get(keyword)
    item = lut[0] if lut else None
    descriptor = item.get("LUTDescriptor") if item is not None else None
    if descriptor is None or len(descriptor) != 3:
        return None
    entries, first, bits = (int(v) for v in descriptor)
    read_first = _signed(first) if signed else first
    read_bits = 16 if words and 10 <= bits < 16 else bits
    if (read_first, read_bits) == (first, bits):
        return None
    fixed = Dataset(dict(item.items()))
    fixed["LUTDescriptor"] = DataElement(0x00283002, "US or SS", [entries, read_first, read_bits])
    return DataElement(ds[keyword].tag, "SQ", Sequence([fixed, *lut[1:]]))


def _voi_input_signed(ds: Dataset) -> bool:
    """Whether the VOI transform's input, the modality transform's output, can be negative, which
    makes a VOI LUT's first mapped value SS (PS3.3 C.11.2.1.1): with a rescale, the stored values'
    range taken through it (signed values 0x8000 and up, shifted by an intercept of 32768, come
    out unsigned; unsigned ones less an intercept of 1024 come out signed); without one, the
    stored values' own sign (Pixel Representation)."""
    return min(_rescaled_range(ds)) < 0


def _view(ds: Dataset) -> Dataset:
    """A shallow copy of ``ds`` whose elements can be replaced without changing the caller's.

    ``Dataset(ds)`` and ``copy.copy`` share the elements' dictionary: this is a new one, of the
    same elements, with the file meta and the encoding ``ds`` was read with. pydicom needs them to
    unpack a LUT Data element of VR OW (the VR most writers give it, and the only one explicit VR
    allows for a 16-bit LUT of 65,536 entries): without them it cannot tell the bytes' order.
    """
    view = Dataset(dict(ds.items()))
    if (meta := getattr(ds, "file_meta", None)) is not None:
        view.file_meta = meta
    view.set_original_encoding(*ds.original_encoding, ds.original_character_set)
    return view


def _modality_dataset(ds: Dataset) -> Dataset:
    """``ds`` as pydicom's ``apply_modality_lut`` must see it; a shallow copy where it differs, so
    the caller's dataset is never changed.

    A signed image's Modality LUT Descriptor whose first mapped value was written as US (63488
    for -2048) gets its signed value, which it is by Pixel Representation (PS3.3 C.11.1.1):
    pydicom subtracts it from the image in the image's own type and overflows. Entries of 10 to
    15 bits are read as the 16-bit words they are stored in (:func:`_fixed_lut`); the output
    range a window maps from stays the descriptor's (:func:`voi_range`).

    Raises:
        DicomRejected: a descriptor of bits per entry other than 8 or 10 to 16.
    """
    sequence = ds.get("ModalityLUTSequence")
    descriptor = sequence[0].get("LUTDescriptor") if sequence else None
    if descriptor is not None and len(descriptor) == 3 and int(descriptor[2]) not in (8, *range(10, 17)):
        raise DicomRejected(
            f"has a Modality LUT Descriptor of {int(descriptor[2])} bits per entry ({_values(descriptor)}); the "
            "standard allows 8 or 16 (PS3.3 C.11.1.1.1), and 10 to 15 are read as 16-bit words: the header is "
            "corrupt: re-export the image from the PACS"
        )
    lut = _fixed_lut(ds, "ModalityLUTSequence", int(ds.PixelRepresentation) == 1, words=True)
    if lut is None:
        return ds
    view = _view(ds)
    view["ModalityLUTSequence"] = lut
    return view


def _apply_modality(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """pydicom's ``apply_modality_lut`` on :func:`_modality_dataset`.

    pydicom subtracts a Modality LUT's first mapped value from the stored values in their own
    type: a signed 16-bit image's values past 32767 + first (0 and up for a LUT from -32768)
    would wrap round to below the LUT, so signed values are widened first.
    """
    ds = _modality_dataset(ds)
    if ds.get("ModalityLUTSequence") and values.dtype.kind == "i" and values.dtype.itemsize < 4:
        values = values.astype(np.int32)
    return apply_modality_lut(values, ds)


def _voi_dataset(ds: Dataset) -> Dataset:
    """``ds`` as pydicom's ``apply_voi_lut`` must see it; a shallow copy where it differs, so the
    caller's dataset is never changed.

    - With a Modality LUT Sequence, Rescale Slope and Intercept are left out: the LUT is the
      modality transform (PS3.3 C.11.1), and pydicom's windowing would rescale its output range
      with them all the same, squeezing the contrast.
    - A VOI LUT Descriptor whose first mapped value was written as US (63488 for -2048) gets its
      signed value where the VOI's input can be negative (:func:`_voi_input_signed`: a signed
      image's stored values, or what its rescale makes of them): pydicom compares the image with
      it and overflows. Not after a Modality LUT Sequence, whose output is unsigned: the VOI LUT's
      input, and so its first mapped value, is then US (PS3.3 C.11.1.1.1, C.11.2.1.1); nor after a
      rescale whose output cannot be negative (signed values shifted by 32768).
    """
    modality_lut = bool(ds.get("ModalityLUTSequence"))
    drop = [tag for tag in ("RescaleSlope", "RescaleIntercept") if tag in ds] if modality_lut else []
    voi = None if modality_lut else _fixed_lut(ds, "VOILUTSequence", _voi_input_signed(ds))
    if not drop and voi is None:
        return ds
    view = _view(ds)
    for tag in drop:
        del view[tag]
    if voi is not None:
        view["VOILUTSequence"] = voi
    return view


def _apply_voi(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """pydicom's ``apply_voi_lut`` (the first VOI LUT, else the first window), on
    :func:`_voi_dataset`.

    pydicom 3.0 indexes a VOI LUT of 8-bit entries with 8-bit integers, so an index past 255
    wraps round: a value more than 255 above the first mapped one, whatever the LUT's length.
    For such a LUT the standard's rule (PS3.3 C.11.2.1.1: values below the first mapped one
    take the first entry, values past the last take the last) is applied first: with at most
    256 entries, by clipping the values into the mapped range before pydicom looks them up;
    with more (as some CR modalities write), by looking them up here.
    """
    ds = _voi_dataset(ds)
    voi = ds.get("VOILUTSequence")
    if voi and voi[0].get("LUTDescriptor") is not None and voi[0].get("LUTData") is not None:
        entries, first, bits = (int(v) for v in voi[0].LUTDescriptor)
        entries = entries or 2**16
        if bits == 8 and entries > 256:
            data = voi[0].LUTData
            lut = np.frombuffer(data, dtype="<u2") if isinstance(data, bytes) else np.asarray(data)
            index = np.clip(values.astype(np.int64) - first, 0, entries - 1)
            return lut[:entries][index]
        if bits == 8:
            values = np.clip(values, first, first + entries - 1)
    return apply_voi_lut(values, ds, index=0)


def to_display(ds: Dataset) -> np.ndarray:
    """Decodes a checked radiograph into 8-bit display values (H x W, or H x W x 3 for RGB), with
    square pixels (:func:`square_pixels`).

    Raises:
        DicomRejected: the pixel data is cut short (:func:`check_complete`, :func:`check_length`),
            disagrees with the header's size, or cannot be decoded (a missing decoder names the
            transfer syntax; damaged compressed data says so).
    """
    check_complete(ds)
    check_length(ds)
    try:
        pixels = ds.pixel_array
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, OSError) as exc:
        raise undecodable(ds, exc) from exc
    return square_pixels(_display(pixels, ds), ds)


def _display(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    if str(ds.PhotometricInterpretation) in COLOUR:  # YCbCr arrives as RGB (pydicom's as_rgb)
        return np.ascontiguousarray(pixels.astype(np.uint8))
    if pixels.dtype.kind not in "iu":
        return _display_values(pixels, ds, pixels)
    # Stored values are integers: the pipeline runs once per level between the image's minimum
    # and maximum (at most 65,536 of them), and the image is read through that table. The
    # same values as running it on every pixel, without the per-pixel float64 copies (measured
    # on a 20-megapixel detector image: 610 MB allocated per pixel, 153 MB per level;
    # bench/dicom_display.py).
    low, high = int(pixels.min()), int(pixels.max())
    # Wider than 8 bits: pydicom subtracts a LUT's first mapped value in the array's own type, so
    # signed 8-bit levels past 127 - |first| would wrap round.
    levels = np.arange(low, high + 1).astype(pixels.dtype if pixels.dtype.itemsize > 1 else np.int16)
    offsets = pixels.astype(np.int32) - low if pixels.dtype.itemsize < 4 else (pixels - low).astype(np.int64)
    present = np.zeros(len(levels), dtype=bool)
    present[offsets.ravel()] = True
    return _display_values(levels, ds, levels[present])[offsets]


def check_length(ds: Dataset) -> None:
    """Checks that uncompressed pixel data holds the bytes its header says it needs.

    Uncompressed YBR_FULL_422 holds two samples a pixel, not three: each pair of pixels shares
    its Cb and Cr (PS3.3 C.7.6.3.1.2).

    Raises:
        DicomRejected: fewer bytes than Rows x Columns x Samples per Pixel x Bits Allocated:
            the file is cut short.
    """
    syntax = _file_meta(ds).get("TransferSyntaxUID")
    if syntax is None or syntax.is_encapsulated or "PixelData" not in ds:
        return
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.BitsAllocated)
    stored = 2 if str(ds.get("PhotometricInterpretation") or "") == "YBR_FULL_422" else samples
    needed = (rows * columns * stored * bits + 7) // 8
    held = len(ds.PixelData)
    if held < needed:
        raise DicomRejected(
            f"has pixel data that cannot be decoded: it is cut short, {held:,} bytes where Rows x Columns x "
            f"samples stored a pixel x Bits Allocated ({rows} x {columns} x {stored} x {bits} bits) need {needed:,} "
            "(an interrupted transfer or export); send the complete file"
        )


def undecodable(ds: Dataset, exc: Exception) -> DicomRejected:
    """The refusal of pixel data pydicom fails to decode, saying what is wrong.

    A compressed transfer syntax no installed decoder reads is told to come uncompressed or in
    one that is read; compressed data the decoder is there for but fails on is damaged or cut
    short (RLE has no end marker to tell it by beforehand); uncompressed data that fails
    (:func:`check_length` has passed it) has a header that does not describe it.
    """
    syntax = _file_meta(ds).get("TransferSyntaxUID")
    name = getattr(syntax, "name", str(syntax))
    detail = " ".join(str(exc).split())
    if syntax is not None and syntax.is_encapsulated and not _decoder_available(syntax):
        return DicomRejected(
            f"has pixel data that cannot be decoded (transfer syntax {name}): {detail}. Send the image uncompressed "
            "(Explicit VR Little Endian) or as JPEG, JPEG-LS, JPEG 2000 or RLE"
        )
    if syntax is not None and syntax.is_encapsulated:
        return DicomRejected(
            f"has compressed pixel data ({name}) that cannot be decoded: {detail}. The data is damaged or cut short "
            "(an interrupted transfer or export); send the complete file as the modality or PACS wrote it"
        )
    return DicomRejected(
        f"has pixel data that cannot be decoded ({name}): {detail}. Its header (group 0028: rows, columns, "
        "bits) does not describe the data; re-export the image from the PACS"
    )


def _decoder_available(syntax: uid.UID) -> bool:
    """Whether pydicom has a decoder for ``syntax`` whose plugin's packages are installed."""
    try:
        return bool(get_decoder(syntax).is_available)
    except NotImplementedError:
        return False


def padding(stored: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Which stored values are padding, not image: Pixel Padding Value, up to Pixel Padding
    Range Limit when the header gives one (PS3.3 C.7.5.1.1.2); ``None`` when it declares none.
    A signed image's values written with VR US are read as the signed ones they encode."""
    value = ds.get("PixelPaddingValue")
    if value is None or str(ds.get("PhotometricInterpretation") or "") not in MONOCHROME:
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    bounds = [int(value), int(value if limit is None else limit)]
    if int(ds.get("PixelRepresentation") or 0) == 1:  # written as US, as explicit VR files may
        bounds = [_signed(v) for v in bounds]
    low, high = sorted(bounds)
    return (stored >= low) & (stored <= high)


def _display_values(stored: np.ndarray, ds: Dataset, in_image: np.ndarray) -> np.ndarray:
    """The display pipeline on stored values; ``in_image``: the stored values the image holds
    (the range a VOI transform without window or LUT maps onto is theirs, padding left out, as
    the standard declares padding for: so that it does not set the dynamic range). Padding is
    shown black."""
    padded = padding(in_image, ds)
    if padded is not None and not padded.all():
        in_image = in_image[~padded]
    values = _apply_modality(stored, ds)
    low, high = voi_range(ds, _apply_modality(in_image, ds))
    values = _apply_voi(values, ds).astype(np.float64)
    # A negative Rescale Slope reverses the window's output range (high below low): it maps as it is.
    scaled = (values - low) / (high - low) if high != low else np.zeros_like(values)
    if str(ds.PhotometricInterpretation) == "MONOCHROME1" or str(ds.get("PresentationLUTShape") or "") == "INVERSE":
        scaled = 1.0 - scaled
    shown = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
    pad = padding(stored, ds)
    if pad is not None:
        shown[pad] = 0
    return shown


def dicom_to_image(data: bytes, modalities: Iterable[str] | None = RADIOGRAPHY) -> Image.Image:
    """A DICOM radiograph as the 8-bit PIL image (``L``, or ``RGB``) a JPEG export would hold.

    Args:
        data: the DICOM Part 10 file's bytes.
        modalities: the modalities accepted; ``None``: any (:func:`check_radiograph`).

    Raises:
        DicomRejected: not a readable single-frame radiograph of an accepted modality.
    """
    try:
        ds = read_header(data)
        check_radiograph(ds, modalities)
    except DicomRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed header (a missing Rows, a bad value) is this file's problem
        raise unreadable("header", exc) from exc
    try:
        display = to_display(ds)
    except DicomRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - a LUT or value the display pipeline fails on
        raise unreadable("pixel data", exc) from exc
    return Image.fromarray(display)  # uint8 H x W is L, H x W x 3 is RGB
