"""What the model accepts as an X-ray, checked the same way for every consumer.

The served pyfunc (in process, behind ``mlflow models serve``, in ``fracture predict``) and
the clinician's page read every input through :func:`read_xray`, with the
:class:`InputPolicy` the model was registered with, so the same bytes get the same answer
wherever they are sent. In order:

1. size: an empty file, or one over ``max_bytes``, is refused before it is parsed;
2. format: JPEG, PNG or DICOM (read by :mod:`fracture.dicom`: one frame of a radiograph of
   ``modalities``, of a body part in ``body_parts`` where its header names one); anything else
   is refused;
3. dimensions, from the header alone: sides within ``min_side`` .. ``max_side`` and at most
   ``max_pixels`` pixels, so a decompression bomb is refused before a pixel is decoded;
4. bit depth: PNGs of more than 8 bits a sample are refused, colour ones too, whose depth
   only their header tells (turning them into 8 bits needs the display window a viewer
   applies; DICOM carries that window, PNG does not); 1-bit images too;
5. decoding: a corrupt file is refused; a truncated one (it ends early) is scored with a
   warning when ``truncated`` is ``score`` (the pipeline's ``validate.on_truncated: keep``:
   the model was trained and evaluated on such files), refused when it is ``refuse``;
6. content: a blank or near-constant image (greyscale standard deviation below
   ``min_grey_std``) is refused;
7. colour: palette, CMYK and transparent images are converted to RGB with a warning
   (transparent pixels become black background).

Messages say what is wrong and what to send instead. They never name a file path, so a
served model tells a caller nothing about the server's disk. Only third-party packages and
this package's imaging modules are imported: the logged MLflow model carries this module.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fracture.decoding import (
    FORMATS,
    TooManyScans,
    convert_for_model,
    decode,
    decode_truncated,
    decoded_height,
    grey_spread,
    more_than_8_bits,
    png_bit_depth,
)
from fracture.dicom import (
    RADIOGRAPHY,
    DicomRejected,
    check_body_part,
    check_radiograph,
    is_dicom,
    read_header,
    to_display,
    unreadable,
)
from fracture.vocabulary import LIMBS

log = logging.getLogger(__name__)

Truncated = Literal["score", "refuse"]
AS_TRAINED = {"L", "RGB"}
SEND_INSTEAD = "Send an X-ray as an 8-bit JPEG or PNG, or as its DICOM file."
COMPRESS_DICOM = ("Send it exported from the PACS JPEG-compressed (lossless JPEG, JPEG-LS or JPEG 2000), or as an "
                  "8-bit JPEG or PNG.")


class InputRejected(ValueError):
    """An input the model does not score; the message says why and what to send instead."""


@dataclass(frozen=True)
class InputPolicy:
    """The checks every input passes, stored with the model (``model.json``, key ``input``).

    Attributes:
        min_side: smallest width or height in pixels (the pipeline's ``validate.min_side``).
        max_side: largest width or height (``validate.max_side``).
        max_pixels: most pixels (width x height) decoded for one image.
        max_bytes: largest file accepted.
        min_grey_std: images whose greyscale standard deviation is below this (0-255 levels)
            are blank or near-constant, and refused.
        truncated: ``score`` files that end early (the missing rows become grey), with a
            warning; or ``refuse`` them.
        modalities: DICOM modalities accepted.
        max_rows: most rows one request may hold.
        body_parts: the Body Part Examined values a DICOM file may name (one that names none is
            read); ``None``: any (:func:`fracture.dicom.check_body_part`).
    """

    min_side: int = 64
    max_side: int = 8192
    max_pixels: int = 50_000_000
    max_bytes: int = 64 * 2**20
    min_grey_std: float = 2.0
    truncated: Truncated = "score"
    modalities: tuple[str, ...] = RADIOGRAPHY
    max_rows: int = 64
    body_parts: tuple[str, ...] | None = LIMBS

    def __post_init__(self) -> None:
        if self.truncated not in get_args(Truncated):
            raise ValueError(f"input policy truncated must be one of {get_args(Truncated)}, got {self.truncated!r}")
        for name in ("min_side", "max_side", "max_pixels", "max_bytes", "max_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"input policy {name} must be a whole number of at least 1, got {value!r}")
        if self.min_side > self.max_side:
            raise ValueError(f"input policy min_side {self.min_side} is above max_side {self.max_side}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> InputPolicy:
        """Reads ``model.json``'s ``input``; absent (a model registered before it existed): the defaults."""
        data = dict(data or {})
        for name in ("modalities", "body_parts"):
            if data.get(name) is not None:
                data[name] = tuple(data[name])
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"model config input has unknown keys {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Xray:
    """An input that passed the checks.

    Attributes:
        image: the decoded X-ray, as the model sees it before resizing: greyscale (L) or RGB.
            The model's transform makes a greyscale image RGB after resizing it
            (:class:`fracture.imaging.ToRGB`).
        format: ``JPEG``, ``PNG`` or ``DICOM``.
        mode: the colour mode as stored (for DICOM, its photometric interpretation and bits stored).
        warnings: what was done to it on the way (conversions, a truncated file).
        stored_size: a DICOM's own pixel grid, ``(Columns, Rows)``: ``image`` is resampled to
            square pixels when the file's are not (:func:`fracture.dicom.display_size`), and a
            position on ``image`` is mapped back to the file's grid by :meth:`to_stored`.
            ``None`` for JPEG and PNG, whose grid is ``image``'s own (EXIF orientation applied).
    """

    image: Image.Image
    format: str
    mode: str
    warnings: tuple[str, ...] = field(default_factory=tuple)
    stored_size: tuple[int, int] | None = None

    def to_stored(self) -> tuple[float, float]:
        """``(sx, sy)``: multiply an ``x`` and a ``y`` on :attr:`image` by these for the file's own
        pixels (``(1, 1)`` unless a DICOM's pixels were resampled to square ones)."""
        if self.stored_size is None:
            return 1.0, 1.0
        width, height = self.image.size
        return self.stored_size[0] / width, self.stored_size[1] / height


def read_xray(data: bytes, policy: InputPolicy, draft: tuple[int, int] | None = None) -> Xray:
    """Checks and decodes one input file.

    Args:
        data: the file's bytes.
        policy: the checks (the model's own, from its config).
        draft: decode a JPEG at a reduced scale covering this ``(width, height)``, as the model
            was trained (its data config's :attr:`~fracture.data_config.DataConfig.draft_size`);
            ``None``: in full. The size checks read the file's own dimensions either way.

    Returns:
        The decoded image and what was done to it.

    Raises:
        InputRejected: the input fails a check; the message says which and what to send.
    """
    if not data:
        raise InputRejected(f"is empty. {SEND_INSTEAD}")
    check_size(len(data), policy, data[:132])
    if is_dicom(data):
        xray = _read_dicom(data, policy)
        _check_content(xray.image, policy)
        return xray
    return _read_picture(data, policy, draft)  # checks the content on the decoded image itself


def read_file(path: Path, policy: InputPolicy) -> bytes:
    """A file's bytes for :func:`read_xray`; one over the policy's size is refused before it is read.

    Raises:
        InputRejected: the file is larger than ``policy.max_bytes``.
        OSError: the file cannot be read.
    """
    size = path.stat().st_size
    if size > policy.max_bytes:
        with path.open("rb") as handle:  # its start only: whether it is DICOM, for what to send instead
            check_size(size, policy, handle.read(132))
    return path.read_bytes()


def over_limit(value: int, limit: int, unit: float, places: int, name: str, exact: str) -> tuple[str, str]:
    """``value`` and the ``limit`` it is over, as a refusal shows them: in ``unit`` (``value`` to
    ``places`` decimals, the limit as it is set), or in exact ``exact`` where rounding would show
    ``value`` at or under the limit ("64.0 MiB; files up to 64 MiB")."""
    shown, bound = f"{value / unit:.{places}f}", f"{limit / unit:g}"
    if float(shown) > float(bound):
        return f"{shown} {name}", f"{bound} {name}"
    return f"{value:,} {exact}", f"{limit:,} {exact} ({bound} {name})"


def check_size(size: int, policy: InputPolicy, start: bytes) -> None:
    """Refuses a file of ``size`` bytes over ``policy.max_bytes``; ``start``, its first 132 bytes,
    says whether it is DICOM, for what to send instead.

    Raises:
        InputRejected: over the limit, with the size, the limit and what to send.
    """
    if size > policy.max_bytes:
        shown, limit = over_limit(size, policy.max_bytes, 2**20, 1, "MiB", "bytes")
        # A DICOM file over the limit is told how to make it smaller, not to send the DICOM file it is.
        fix = COMPRESS_DICOM if is_dicom(start) else SEND_INSTEAD
        raise InputRejected(f"is {shown}; the model accepts files up to {limit}. {fix}")


def _check_dimensions(width: int, height: int, policy: InputPolicy) -> None:
    if width * height > policy.max_pixels:
        shown, limit = over_limit(width * height, policy.max_pixels, 1e6, 0, "megapixels", "pixels")
        raise InputRejected(
            f"declares {width} x {height} px ({shown}); the model decodes at most {limit}. {SEND_INSTEAD}"
        )
    if not (policy.min_side <= width <= policy.max_side and policy.min_side <= height <= policy.max_side):
        raise InputRejected(
            f"is {width} x {height} px; the model accepts images whose sides are between "
            f"{policy.min_side} and {policy.max_side} px. {SEND_INSTEAD}"
        )


def _unreadable(part: str, exc: Exception) -> InputRejected:
    """The refusal of a DICOM file pydicom fails on (:func:`fracture.dicom.unreadable`)."""
    return InputRejected(f"is DICOM but {unreadable(part, exc)}")


def _read_dicom(data: bytes, policy: InputPolicy) -> Xray:
    try:
        ds = read_header(data)
        width, height = check_radiograph(ds, policy.modalities)
        check_body_part(ds, policy.body_parts)
    except DicomRejected as exc:
        raise InputRejected(f"is DICOM but {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a malformed header (a missing Rows, a bad value) is this file's problem
        raise _unreadable("header", exc) from exc
    _check_dimensions(width, height, policy)
    try:
        display = to_display(ds)
    except DicomRejected as exc:
        raise InputRejected(f"is DICOM but {exc}") from exc
    except Exception as exc:  # noqa: BLE001
        raise _unreadable("pixel data", exc) from exc
    mode = f"{ds.PhotometricInterpretation} {int(ds.BitsStored)}-bit"
    stored = (int(ds.Columns), int(ds.Rows))
    notes = () if (width, height) == stored else (
        f"its pixels are not square (its header's spacing): resampled from {stored[0]} x {stored[1]} to "
        f"{width} x {height} px before scoring",
    )
    image = Image.fromarray(display)
    return Xray(image, "DICOM", mode, (*notes, *filter(None, [colour_note(image)])), stored)


def _read_picture(data: bytes, policy: InputPolicy, draft: tuple[int, int] | None) -> Xray:
    try:
        # The header only: dimensions are checked before any pixel is decoded (and Pillow's own
        # bomb warning is redundant with that check).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:
                fmt, mode, (width, height) = header.format, header.mode, header.size
    except Image.DecompressionBombError as exc:
        raise InputRejected(
            f"declares absurd dimensions; the model decodes at most {policy.max_pixels / 1e6:g} megapixels. "
            f"{SEND_INSTEAD}"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputRejected(f"is not an image file that can be read (JPEG, PNG or DICOM). {SEND_INSTEAD}") from exc
    if fmt not in FORMATS:
        raise InputRejected(f"is a {fmt} file, not JPEG, PNG or DICOM. {SEND_INSTEAD}")
    _check_dimensions(width, height, policy)
    # Pillow opens a 16-bit grey PNG as mode I;16 or I, but a 16-bit RGB, RGBA or grey-and-alpha
    # one as 8-bit RGB or RGBA, keeping each sample's high byte (a 12-bit X-ray would be scored
    # as 0..15): a PNG's own header tells its depth.
    depth = png_bit_depth(data)
    if more_than_8_bits(mode, depth):
        bits = depth or (32 if mode in {"F", "I"} else 16)
        raise InputRejected(
            f"is a {bits}-bit {fmt} (mode {mode}). The model was trained on 8-bit X-rays, and turning "
            "higher bit depths into 8 bits needs the display window a viewer applies: send the DICOM file, "
            "which carries its window, or export an 8-bit JPEG or PNG from the viewer."
        )
    if mode == "1":
        raise InputRejected(f"is a 1-bit black-and-white image, not an X-ray's greyscale. {SEND_INSTEAD}")

    notes: list[str] = []
    try:
        image = decode(data, draft)
    except TooManyScans as exc:
        raise InputRejected(str(exc)) from exc
    except OSError as exc:
        if "truncated" not in str(exc):
            raise InputRejected("is corrupt and cannot be decoded. Send the complete file.") from exc
        if policy.truncated == "refuse":
            raise InputRejected("is cut short (the file ends early) and cannot be decoded. Send the complete file.") from exc
        # Decoded once, as stored (where its missing rows are counted), then turned upright as decode turns it.
        stored = _decode_truncated(data, draft, upright=False)
        image = ImageOps.exif_transpose(stored)
        notes.append(_missing_rows_note(stored))
    except Exception as exc:
        log.info("decoding failed: %s: %s", type(exc).__name__, exc)
        raise InputRejected("is corrupt and cannot be decoded. Send the complete file.") from exc

    if mode in AS_TRAINED:
        # A greyscale X-ray stays greyscale: the model's transform resizes the one channel and
        # copies it to RGB afterwards, the same pixels as training's.
        _check_content(image, policy)
        return Xray(image, fmt, mode, (*notes, *filter(None, [colour_note(image)])))
    rgb, note = convert_for_model(image)
    _check_content(rgb, policy)
    return Xray(rgb, fmt, mode, (*notes, note, *filter(None, [colour_note(rgb)])))


#: The share of its rows a truncated file may miss before its note says the answer means little:
#: FracAtlas's 49 truncated X-rays, which the model trained on, miss at most 54% of theirs (37% the next).
MISSING_ROWS_WARNED = 0.6


def _missing_rows_note(stored: Image.Image) -> str:
    """The note of a file that ends early, with the share of its rows missing, counted as stored
    (a turned picture's missing part is a band of its stored rows, not of its upright ones)."""
    grey = np.asarray(stored.convert("L"))
    missing = 1 - decoded_height(grey) / len(grey)
    note = f"the file ends early: {missing:.0%} of its rows are missing and were scored as grey, as in training"
    if missing > MISSING_ROWS_WARNED:
        note += ("; so little of the X-ray is there that the answer means little: send the complete file "
                 "(FracAtlas's truncated X-rays miss at most about half)")
    return note


def _decode_truncated(data: bytes, draft: tuple[int, int] | None, upright: bool = True) -> Image.Image:
    try:
        return decode_truncated(data, draft, upright)
    except Exception as exc:
        raise InputRejected("is cut short and too little of it decodes. Send the complete file.") from exc


#: Mean |R - G| + |G - B| (of 510) above which a picture holds colour. FracAtlas's RGB JPEGs are
#: greyscale X-rays saved in colour and measure 0.00; a photograph measures tens to a hundred and more.
COLOUR_SPREAD = 5.0


def colour_note(image: Image.Image) -> str | None:
    """A warning for an RGB picture that holds colour (:data:`COLOUR_SPREAD`), or ``None``. It is
    scored, as the model answers any picture, but the answer says nothing of a fracture."""
    if image.mode != "RGB":
        return None
    small = np.asarray(image.reduce(max(1, max(image.size) // 256)), dtype=np.int16)  # a few hundred px a side
    spread = float((np.abs(small[..., 0] - small[..., 1]) + np.abs(small[..., 1] - small[..., 2])).mean())
    if spread <= COLOUR_SPREAD:
        return None
    return (f"the image holds colour (mean channel difference {spread:.0f} of 510; an X-ray has none): the model was "
            "trained on greyscale radiographs only, so its answer on a photograph or a coloured picture means nothing")


def _check_content(image: Image.Image, policy: InputPolicy) -> None:
    std = grey_spread(image)  # as training measures it, so it trains on no picture refused here
    if std < policy.min_grey_std:
        raise InputRejected(
            f"is blank or nearly constant (greyscale standard deviation {std:.2f}; an X-ray has at least "
            f"{policy.min_grey_std:g}). Send the X-ray itself."
        )


