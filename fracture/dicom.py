"""DICOM radiographs to the 8-bit image a reader sees, with pydicom.

A hospital's X-rays come from a PACS as DICOM, mostly 12- or 16-bit, often JPEG-compressed.
The model was trained on 8-bit exports, so a DICOM image is turned into exactly what a JPEG
export of it would look like, in the standard's order (PS3.4 Annex N, the grayscale pipeline):

1. the modality LUT: Rescale Slope and Intercept, or a Modality LUT Sequence
   (:func:`pydicom.pixels.apply_modality_lut`);
2. the VOI transform (:func:`pydicom.pixels.apply_voi_lut`): the first VOI LUT of the VOI LUT
   Sequence when there is one, else the first Window Center / Width pair (the one a viewer
   opens with; the others are alternatives the modality offers). Without either, the image's
   own minimum to maximum;
3. MONOCHROME1 (white is low), or a Presentation LUT Shape of INVERSE, is inverted after the
   VOI transform, so bone is bright (DX requires INVERSE exactly when MONOCHROME1, which is
   inverted once);
4. the VOI output range mapped linearly to 0-255 (a negative Rescale Slope gives a reversed
   range, which maps as it is).

Pixel Padding Value (and Range Limit) marks pixels that are not image: they are left out of the
range step 2 takes from the image and shown black. Images FOR PROCESSING (raw detector data,
which no viewer displays) are refused, as are files without the tags that describe their pixels
and images of more than 16 bits per pixel.

Compressed transfer syntaxes decode through pydicom's pixel handlers: JPEG baseline, extended
and lossless through ``pylibjpeg-libjpeg``, JPEG-LS through ``pyjpegls``, RLE natively.

Training (a dataset holding ``.dcm`` files), the served model and the page all read DICOM
through :func:`dicom_to_image`, so they see the same pixels. Only third-party packages are
imported: the logged MLflow model carries this module.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread, uid
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.valuerep import VR

log = logging.getLogger(__name__)

#: Modalities of plain radiographs: computed and digital radiography, radiographic imaging
#: (conventional film/screen) and X-ray angiography.
RADIOGRAPHY = ("CR", "DX", "RG", "XA")
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
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422")
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
#: Group numbers a dataset written without the Part 10 preamble starts with: its file meta
#: information (0002), or, in files older than Part 10, the first data element (0008).
_RAW_START_GROUPS = (b"\x02\x00", b"\x08\x00")
#: The two-letter value representations of explicit VR encoding.
_VRS = frozenset(v.value.encode() for v in VR if len(v.value) == 2)
#: Tags every image must hold for its pixels to be read, by keyword.
PIXEL_TAGS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "PhotometricInterpretation")


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


def read_header(data: bytes) -> Dataset:
    """Parses a DICOM file without decoding its pixels (with or without the Part 10 preamble).

    Raises:
        DicomRejected: the bytes are not a readable DICOM file.
    """
    try:
        # force: a dataset without the preamble (is_dicom has already told it from other files).
        ds = dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
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
        with path.open("rb") as handle:
            start = handle.read(132)
        if not is_dicom(start):
            return None
        ds = dcmread(
            path, stop_before_pixels=True, specific_tags=["IssuerOfPatientID", "PatientID"],
            force=start[128:132] != b"DICM",
        )
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
    """Checks that compressed pixel data is whole: its frame ends with the codestream's end marker.

    pydicom hands a JPEG frame that stops early to pylibjpeg, which decodes it without complaint
    and fills the rows past the end with whatever the decoder left there. Such a file can be
    neither scored nor trained on as it stands, whatever ``on_truncated`` says for a JPEG file
    (whose missing rows Pillow fills with grey, the same in training and serving).

    Raises:
        DicomRejected: the frame of a JPEG, JPEG-LS or JPEG 2000 transfer syntax lacks its end marker.
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


def check_radiograph(ds: Dataset, modalities: Iterable[str] = RADIOGRAPHY) -> tuple[int, int]:
    """Checks that ``ds`` is one grayscale (or RGB) radiograph; returns its (width, height).

    Raises:
        DicomRejected: no pixel data (a report, PDF or other non-image object), more than one
            frame, a modality not in ``modalities``, a photometric interpretation other
            than MONOCHROME1, MONOCHROME2 or 8-bit colour (RGB, YBR_FULL, YBR_FULL_422), or
            more than 16 bits a pixel.
    """
    sop = str(ds.get("SOPClassUID", "") or _file_meta(ds).get("MediaStorageSOPClassUID", ""))
    what = NOT_IMAGES.get(sop) or ("a structured report" if sop.startswith(STRUCTURED_REPORTS) else None)
    if what or "PixelData" not in ds:
        raise DicomRejected(f"is {what or 'a DICOM object without pixel data'}, not an image; send the radiograph's own DICOM file")
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
            f"holds {frames} frames; the model reads single-frame radiographs (CR, DX): send one frame per file"
        )
    allowed = tuple(modalities)
    modality = str(ds.get("Modality") or "")
    if modality not in allowed:
        raise DicomRejected(
            f"has modality {modality or '(none)'}; the model reads {', '.join(allowed)} radiographs only "
            "(params: serve.modalities)"
        )
    photometric = str(ds.get("PhotometricInterpretation") or "")
    bits = int(ds.get("BitsAllocated") or 0)
    if photometric not in MONOCHROME and not (photometric in COLOUR and bits == 8):
        raise DicomRejected(
            f"has photometric interpretation {photometric or '(none)'} ({bits}-bit); the model reads "
            "MONOCHROME1, MONOCHROME2 or 8-bit colour (RGB, YBR_FULL, YBR_FULL_422) radiographs"
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
    return int(ds.Columns), int(ds.Rows)


def voi_range(ds: Dataset, values: np.ndarray) -> tuple[float, float]:
    """The range the VOI transform maps onto, as pydicom's ``apply_voi_lut`` produces it.

    A VOI LUT gives 0 .. 2**bits - 1 (its descriptor's bits per entry); a window gives the
    stored value range after the modality transform (pydicom's ``y_min`` / ``y_max``); with
    neither, the image's own minimum and maximum.
    """
    voi = ds.get("VOILUTSequence")
    if voi and voi[0].get("LUTDescriptor") is not None and voi[0].get("LUTData") is not None:
        return 0.0, float(2 ** int(voi[0].LUTDescriptor[2]) - 1)
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        modality_lut = ds.get("ModalityLUTSequence")
        if modality_lut:
            low, high = 0.0, float(2 ** int(modality_lut[0].LUTDescriptor[2]) - 1)
        elif int(ds.PixelRepresentation) == 0:
            low, high = 0.0, float(2 ** int(ds.BitsStored) - 1)
        else:
            low, high = float(-(2 ** (int(ds.BitsStored) - 1))), float(2 ** (int(ds.BitsStored) - 1) - 1)
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        if not modality_lut and slope is not None and intercept is not None:
            low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
        return low, high
    return float(values.min()), float(values.max())


def _apply_voi(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """pydicom's ``apply_voi_lut`` (the first VOI LUT, else the first window).

    pydicom 3.0 indexes a VOI LUT of 8-bit entries with 8-bit integers, so an index past 255
    wraps round: a value more than 255 above the first mapped one, whatever the LUT's length.
    For such a LUT the standard's rule (PS3.3 C.11.2.1.1: values below the first mapped one
    take the first entry, values past the last take the last) is applied first: with at most
    256 entries, by clipping the values into the mapped range before pydicom looks them up;
    with more (as some CR modalities write), by looking them up here.
    """
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
    """Decodes a checked radiograph into 8-bit display values (H x W, or H x W x 3 for RGB).

    Raises:
        DicomRejected: the pixel data is cut short (:func:`check_complete`) or cannot be decoded
            (a missing decoder names the package).
    """
    check_complete(ds)
    try:
        pixels = ds.pixel_array
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, OSError) as exc:
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        name = getattr(syntax, "name", str(syntax))
        raise DicomRejected(
            f"has pixel data that cannot be decoded (transfer syntax {name}): {exc}. Send the image uncompressed "
            "(Explicit VR Little Endian) or as JPEG, JPEG-LS, JPEG 2000 or RLE"
        ) from exc
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


def padding(stored: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Which stored values are padding, not image: Pixel Padding Value, up to Pixel Padding
    Range Limit when the header gives one (PS3.3 C.7.5.1.1.2); ``None`` when it declares none."""
    value = ds.get("PixelPaddingValue")
    if value is None or str(ds.get("PhotometricInterpretation") or "") not in MONOCHROME:
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    low, high = sorted((int(value), int(value if limit is None else limit)))
    return (stored >= low) & (stored <= high)


def _display_values(stored: np.ndarray, ds: Dataset, in_image: np.ndarray) -> np.ndarray:
    """The display pipeline on stored values; ``in_image``: the stored values the image holds
    (the range a VOI transform without window or LUT maps onto is theirs, padding left out, as
    the standard declares padding for: so that it does not set the dynamic range). Padding is
    shown black."""
    padded = padding(in_image, ds)
    if padded is not None and not padded.all():
        in_image = in_image[~padded]
    values = apply_modality_lut(stored, ds)
    low, high = voi_range(ds, apply_modality_lut(in_image, ds))
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


def dicom_to_image(data: bytes, modalities: Iterable[str] = RADIOGRAPHY) -> Image.Image:
    """A DICOM radiograph as the 8-bit PIL image (``L``, or ``RGB``) a JPEG export would hold.

    Args:
        data: the DICOM Part 10 file's bytes.
        modalities: the modalities accepted.

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
