"""Checks an uploaded file before the model sees it, and says in plain words what is wrong.

The model was trained and validated on FracAtlas: 8-bit greyscale (L) and RGB JPEGs with sides
inside the bounds the validate stage enforces (``validate.min_side`` / ``max_side``). Uploads
that match are passed to the model byte for byte. A few others are converted losslessly with a
note the page shows (transparency, palettes, CMYK); uploads whose pixels would need a guess to
become such an image (16- or 32-bit values, 1-bit images) are refused.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from fracture.imaging import decode

FORMATS = {"JPEG": "JPG/JPEG", "PNG": "PNG"}
AS_TRAINED = {"L", "RGB"}
HIGH_BIT_DEPTH = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
WHAT_TO_DO = "Upload an X-ray exported as an 8-bit JPG or PNG."


class UploadRejected(ValueError):
    """The upload cannot be analysed; the message says why and what to upload instead."""


@dataclass(frozen=True)
class CheckedXray:
    """An upload that passed the checks.

    Attributes:
        name: the uploaded file's name.
        image: the decoded X-ray in RGB.
        model_bytes: the file handed to the model: the upload itself, or a lossless PNG of the
            converted image when a conversion was needed.
        format: the file's actual format (``JPEG`` or ``PNG``), read from its content.
        mode: the colour mode as uploaded.
        notes: conversions applied, to show next to the result.
    """

    name: str
    image: Image.Image
    model_bytes: bytes
    format: str
    mode: str
    notes: tuple[str, ...]


def check_upload(name: str, data: bytes, min_side: int, max_side: int, max_bytes: int | None = None) -> CheckedXray:
    """Decodes and checks one uploaded file.

    Args:
        name: the file name, used in messages.
        data: the file's bytes.
        min_side: smallest accepted width or height in pixels.
        max_side: largest accepted width or height in pixels.
        max_bytes: largest accepted file size (the page's upload limit), or ``None``.

    Returns:
        The decoded image and what to hand to the model.

    Raises:
        UploadRejected: the file is empty, too large, not a JPG or PNG, has dimensions outside
            the bounds, a bit depth or mode the model was not trained on, or is cut short or
            corrupt. The message names the file, the problem and what to upload instead.
    """
    if not data:
        raise UploadRejected(f"{name} is empty. {WHAT_TO_DO}")
    if max_bytes is not None and len(data) > max_bytes:
        raise UploadRejected(
            f"{name} is {len(data) / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB. {WHAT_TO_DO}"
        )
    try:
        # Reads the header only: dimensions are checked before any pixel is decoded.
        with Image.open(io.BytesIO(data)) as header:
            fmt, mode, (width, height) = header.format, header.mode, header.size
    except Image.DecompressionBombError as exc:
        raise UploadRejected(
            f"{name} declares absurd dimensions ({exc}); the model accepts sides from {min_side} to "
            f"{max_side} px. {WHAT_TO_DO}"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UploadRejected(f"{name} is not an image file that can be read (JPG or PNG). {WHAT_TO_DO}") from exc

    if fmt not in FORMATS:
        raise UploadRejected(f"{name} is a {fmt} file, not JPG or PNG. {WHAT_TO_DO}")
    if not (min_side <= width <= max_side and min_side <= height <= max_side):
        raise UploadRejected(
            f"{name} is {width} x {height} px; the model accepts images whose sides are between "
            f"{min_side} and {max_side} px. {WHAT_TO_DO}"
        )
    if mode in HIGH_BIT_DEPTH:
        # PNG stores at most 16 bits per sample; Pillow opens some 16-bit PNGs as mode I.
        bits = 32 if mode == "F" or (mode == "I" and fmt != "PNG") else 16
        raise UploadRejected(
            f"{name} is a {bits}-bit {fmt} (mode {mode}). The model was "
            "trained and validated on 8-bit X-rays only, and turning higher bit depths into 8 bits "
            "needs the display window your viewer applies. Export the image from your viewer as an "
            "8-bit JPG or PNG and upload that."
        )
    if mode == "1":
        raise UploadRejected(f"{name} is a 1-bit black-and-white image, not an X-ray's greyscale. {WHAT_TO_DO}")

    try:
        image = decode(data)
    except OSError as exc:
        reason = "is cut short (the file ends early)" if "truncated" in str(exc) else "is corrupt"
        raise UploadRejected(f"{name} {reason} and cannot be decoded. Upload the complete file.") from exc
    except (SyntaxError, ValueError) as exc:
        raise UploadRejected(f"{name} is corrupt and cannot be decoded. Upload the complete file.") from exc

    if mode in AS_TRAINED:
        return CheckedXray(name, image.convert("RGB"), data, fmt, mode, ())
    rgb, note = _convert(image)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return CheckedXray(name, rgb, buf.getvalue(), fmt, mode, (note,))


def _convert(image: Image.Image) -> tuple[Image.Image, str]:
    """Converts an image the model was not trained on to RGB, and says what was done."""
    mode = image.mode
    if image.mode == "P":
        has_alpha = "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        if not has_alpha:
            return image, "Palette (indexed-colour) image converted to RGB."
    if image.mode in {"RGBA", "LA", "PA", "RGBa", "La"}:
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema() == (255, 255):
            return rgba.convert("RGB"), f"{mode} image: its alpha channel is fully opaque and was dropped."
        # X-ray background is black, so transparent pixels become background.
        flat = Image.new("RGB", rgba.size, (0, 0, 0))
        flat.paste(rgba, mask=alpha)
        return flat, f"{mode} image with transparency: transparent pixels are shown to the model as black background."
    return image.convert("RGB"), f"{mode} image converted to RGB."
