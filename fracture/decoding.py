"""Reading X-ray files: JPEG, PNG and DICOM decoded upright, and a folder of them listed.

What every path that opens an image shares: the manifest and validation, the input checks,
the prepared cache, evaluation and the served model. It imports no torch, so the stages that
only read images (ingest, validate, split) start in a fraction of the time; the model's
transform is in :mod:`fracture.imaging`.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import struct
import threading
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import (
    ExifTags,
    Image,
    ImageFile,
    ImageOps,
    ImageStat,
    PngImagePlugin,
    UnidentifiedImageError,
)

from fracture.dicom import (
    MAX_JPEG_SCANS,
    dicom_to_image,
    display_size,
    is_dicom,
    read_header,
)

__all__ = [
    "FORMATS",
    "HIGH_BIT_DEPTH",
    "INDEX_FILES",
    "MAX_JPEG_SCANS",
    "ImageLoadError",
    "TooManyScans",
    "decode",
    "decode_truncated",
    "decoded_height",
    "export_files",
    "failure_reason",
    "grey_spread",
    "hidden",
    "more_than_8_bits",
    "near_constant",
    "open_xray",
    "png_bit_depth",
    "shown_size",
    "too_many_pixels",
    "unservable",
    "upright_size",
]

#: The picture formats the served model reads besides DICOM (Pillow's names); training takes the same.
FORMATS = ("JPEG", "PNG")
#: Pillow modes of more than 8 bits a sample, which only a display window turns into 8 bits.
HIGH_BIT_DEPTH = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})


#: A PNG file's first bytes, then its IHDR chunk's length and type; the bit depth is the IHDR's 9th byte.
_PNG_START = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"
_PNG_BIT_DEPTH_AT = 24

class TooManyScans(ValueError):
    """A JPEG file with more than :data:`MAX_JPEG_SCANS` scans, refused before it is decoded."""


def png_bit_depth(data: bytes) -> int | None:
    """The bits a sample a PNG's header (IHDR) declares, or ``None`` for any other file.

    Pillow's mode does not tell: it opens a 16-bit greyscale PNG as ``I;16``, but a 16-bit RGB,
    RGBA or grey-and-alpha one as 8-bit ``RGB`` or ``RGBA``, keeping only each sample's high
    byte, so a 12-bit X-ray's 0..4080 decodes as 0..15.
    """
    if data.startswith(_PNG_START) and len(data) > _PNG_BIT_DEPTH_AT:
        return data[_PNG_BIT_DEPTH_AT]
    return None


def more_than_8_bits(mode: str, bit_depth: int | None = None) -> bool:
    """Whether a picture holds more than 8 bits a sample: by Pillow's mode, or by the depth its
    file declares (:func:`png_bit_depth`), which a 16-bit colour PNG's mode hides. The served
    model refuses such a picture (:mod:`fracture.intake`), and training takes none (:func:`unservable`)."""
    return mode in HIGH_BIT_DEPTH or (bit_depth or 0) > 8


def unservable(fmt: str | None, mode: str, bit_depth: int | None = None) -> str | None:
    """Why the served model (:mod:`fracture.intake`) refuses a picture of this Pillow format and
    mode, in its words, or ``None``: training takes no file the model would refuse when served.
    A DICOM file's decoded image (format ``None``) is 8-bit by then, and always served. The
    served model's two other refusals need more than the format and mode: the pixels the header
    declares (:func:`too_many_pixels`) and the decoded pixels' spread (:func:`near_constant`).

    Args:
        fmt: Pillow's format name (``None`` for a decoded DICOM file).
        mode: Pillow's mode of the decoded image.
        bit_depth: the bits a sample the file itself declares (:func:`png_bit_depth`), which a
            16-bit colour PNG's mode hides; ``None``: the mode tells.
    """
    if fmt is not None and fmt not in FORMATS:
        return f"is a {fmt} file, not JPEG, PNG or DICOM: the served model refuses it; export it as one of those"
    if more_than_8_bits(mode, bit_depth):
        stored = mode if mode in HIGH_BIT_DEPTH else f"{bit_depth}-bit {mode}"
        return (f"is a {stored} image of more than 8 bits a sample: the served model refuses it; send the DICOM "
                "file, which carries its display window, or an 8-bit export")
    if mode == "1":
        return "is a 1-bit black-and-white image: the served model refuses it; send the X-ray's greyscale"
    return None


def too_many_pixels(data: bytes, max_pixels: int) -> str | None:
    """Why the served model refuses a file for the pixels its header declares, in its words, or
    ``None``: more than ``max_pixels`` (``serve.max_megapixels``), the decompression-bomb guard
    :mod:`fracture.intake` applies before a pixel is decoded. Read from the header alone, so a
    bomb is listed without being decoded; a header that cannot be read is left to the decode.

    Args:
        data: the file's bytes (JPEG, PNG, ... or DICOM, whose Rows and Columns are read, as its
            pixels resampled to square ones will be: :func:`fracture.dicom.display_size`).
        max_pixels: the most pixels (width x height) the served model decodes.
    """
    limit = f"serve.max_megapixels ({max_pixels / 1e6:g})"
    fix = "export it at a lower resolution, or raise serve.max_megapixels in params.yaml"
    try:
        if is_dicom(data):
            # The size the served model decodes it to: pixels that are not square are resampled first.
            width, height = display_size(read_header(data))
        else:
            with warnings.catch_warnings():  # Pillow's bomb warning says less than this check
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as header:
                    width, height = header.size
    except Image.DecompressionBombError:  # Pillow's own guard, at twice its MAX_IMAGE_PIXELS
        return f"declares absurd dimensions, far over {limit}: the served model refuses it; export it at a lower resolution"
    except Exception:  # noqa: BLE001 - not readable as a header: the decode says why
        return None
    if width * height > max_pixels:
        return (f"declares {width} x {height} px ({width * height / 1e6:.1f} megapixels), over {limit}: "
                f"the served model refuses it; {fix}")
    return None


def grey_spread(image: Image.Image) -> float:
    """The greyscale standard deviation (0-255) of a decoded picture, measured as the served model
    measures it (:mod:`fracture.intake`): in the colours the model sees (:func:`convert_for_model`
    for modes other than L and RGB), from at most 512 x 512 pixels of it."""
    if image.mode not in {"L", "RGB"}:
        image = convert_for_model(image)[0]
    grey = image.convert("L")
    grey.thumbnail((512, 512))
    return float(ImageStat.Stat(grey).stddev[0])


def near_constant(image: Image.Image, min_grey_std: float) -> str | None:
    """Why the served model refuses a decoded picture as blank or near-constant, in its words, or
    ``None``: its :func:`grey_spread` is below ``min_grey_std`` (``serve.min_grey_std``).

    Args:
        image: the decoded picture (:func:`decode`), in its stored mode.
        min_grey_std: the least greyscale standard deviation the served model scores.
    """
    std = grey_spread(image)
    if std < min_grey_std:
        return (f"is blank or nearly constant (greyscale standard deviation {std:.2f}, under serve.min_grey_std "
                f"{min_grey_std:g}): the served model refuses it; replace it with the X-ray itself, or remove it")
    return None


class _DecodeGate:
    """Decodes run side by side; a decode of a file that ends early runs alone.

    Pillow reads whether to accept a truncated file from a module flag, ``LOAD_TRUNCATED_IMAGES``,
    while it loads. A truncated decode sets it; any other decode running meanwhile would then
    accept a truncated file too, and a policy that refuses them would let it through unnoticed.
    So the flag is set only while no other decode runs. Turns alternate: a truncated decode
    waiting goes before decodes that arrive after it, and the decodes that waited for it go
    before the next truncated one, so neither kind starves the other.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._alone = False
        self._waiting_alone = 0
        self._waiting_shared = 0
        self._shared_turn = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._waiting_shared += 1
            while self._alone or (self._waiting_alone and not self._shared_turn):
                self._cond.wait()
            self._waiting_shared -= 1
            if not self._waiting_shared:
                self._shared_turn = False
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._cond:
            self._waiting_alone += 1
            while self._alone or self._running or self._shared_turn:
                self._cond.wait()
            self._waiting_alone -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._shared_turn = self._waiting_shared > 0
                self._cond.notify_all()


_GATE = _DecodeGate()


class ImageLoadError(ValueError):
    """An input could not be read as an X-ray image."""


def open_xray(
    source: str | Path | bytes, allow_truncated: bool = False, rgb: bool = True, draft: tuple[int, int] | None = None
) -> Image.Image:
    """Opens an X-ray from a path or raw bytes and returns it decoded, in RGB or greyscale.

    FracAtlas holds both greyscale (L) and RGB files; the ImageNet-pretrained stem expects three
    channels, so every image reaches the network as RGB. With ``rgb=False`` a greyscale image
    stays greyscale: the model's transform (:func:`build_transform`) resizes it first and makes
    it RGB afterwards, which gives the same pixels at a third of the resizing work.

    Args:
        source: a file path or the file's bytes (JPEG, PNG, ... or a DICOM radiograph).
        allow_truncated: decode files that end early (the missing rows become grey) instead of
            failing. Training may allow it per ``validate.on_truncated``; serving does not.
        rgb: convert greyscale images to RGB too; other modes always become RGB.
        draft: decode a JPEG at the smallest reduced scale covering this ``(width, height)``
            (the model's :attr:`~fracture.data_config.DataConfig.draft_size`); ``None``: in full.

    Returns:
        The decoded image in RGB mode, or L when ``rgb`` is false and the file is greyscale.

    Raises:
        ImageLoadError: the input is not a decodable image.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        return _model_mode(decode(source, draft), rgb)
    except FileNotFoundError as exc:
        raise ImageLoadError(f"{name}: file not found") from exc
    except OSError as exc:
        if not (allow_truncated and "truncated" in str(exc)):
            raise ImageLoadError(f"{name}: not a decodable image ({failure_reason(exc)})") from exc
    except (SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"{name}: not a decodable image ({failure_reason(exc)})") from exc
    try:
        return _model_mode(decode_truncated(source, draft), rgb)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"{name}: not a decodable image ({failure_reason(exc)})") from exc


def failure_reason(exc: BaseException) -> str:
    """A decoder's error as the pipeline reports it: the same for the same file on every run.

    Pillow names the in-memory buffer it read by its address ("cannot identify image file
    <_io.BytesIO object at 0x7f63...>"), which changed ``manifest.csv``'s bytes from run to run.
    """
    if isinstance(exc, UnidentifiedImageError):
        return "it is not an image file that can be read (JPEG, PNG or DICOM)"
    if isinstance(exc, OSError) and str(exc).startswith("Truncated File Read"):
        # Pillow's words for a file that stops before enough of its image data to decode anything.
        return ("none of its image data decodes: it stops early, or holds something else after a JPEG's start "
                "(an interrupted transfer or a damaged export); export it again")
    if isinstance(exc, OSError) and str(exc).startswith("image file is truncated"):
        # Pillow's words for any file that ends before its last rows, read where such files are refused.
        return ("it ends early: its image data stops before its last rows, or before any (an interrupted transfer "
                "or a damaged export); export it again")
    return re.sub(r" ?<[^<>]* object at 0x[0-9a-fA-F]+>", "", str(exc))


def _model_mode(img: Image.Image, rgb: bool) -> Image.Image:
    if img.mode == "RGB" or (img.mode == "L" and not rgb):
        return img
    return img.convert("RGB") if img.mode == "L" else convert_for_model(img)[0]


def convert_for_model(image: Image.Image) -> tuple[Image.Image, str]:
    """Converts an image of a mode the model was not trained on (not L or RGB) to RGB, and says what was done.

    Training (:func:`open_xray`) and the input checks (:mod:`fracture.intake`) both convert
    through here, so a PNG with transparency trains on the pixels it is served with.
    """
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


#: Files in an export that index the others rather than hold an image (a DICOM export's DICOMDIR).
INDEX_FILES = {"DICOMDIR"}


def hidden(name: str) -> bool:
    """Whether a file or folder name is hidden (``.DS_Store``, a copy's ``._`` resource fork): no X-ray,
    wherever a folder of them is listed (:func:`export_files`, the FracAtlas layout, a past version)."""
    return name.startswith(".")


def shown(path: Path | str) -> str:
    """A path (or a message naming one) as text the rows can hold. A file name that is not UTF-8
    (``R\\xd6NTGEN.jpg``, Latin-1 from a Windows or an old PACS share) reaches Python with its
    bytes escaped as lone surrogates, which pandas' strings, CSV and JSON refuse, and which would
    cost every row of the run: here its undecodable bytes are written ``\\xd6`` instead. The file
    itself is read by its :class:`~pathlib.Path`, not by this text."""
    text = os.fspath(path)
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def not_a_regular_file(path: Path) -> str | None:
    """Why ``path`` is no regular file to read, judged by ``stat`` alone, before anything opens it:
    opening a FIFO would wait for a writer for ever.

    Returns:
        ``""`` for a regular file (or an entry ``stat`` cannot read that is no link: reading it
        will say why), the reason for a broken link, a loop of links, a FIFO, socket or device,
        and ``None`` for a folder, which each caller names in its own terms (:func:`unlistable`).
    """
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if not path.is_symlink():
            return ""
        if exc.errno == errno.ELOOP:
            return "the file is a link that leads back to itself (a loop of links); remove the link"
        return (f"the file is a link whose target does not exist ({shown(os.readlink(path))}); restore its target "
                "or remove the link")
    if stat.S_ISREG(mode):
        return ""
    if stat.S_ISDIR(mode):
        return None
    kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    return f"the file is {kind}, not a regular file, and is not read; copy the image into a file"


def unlistable(folder: Path) -> str:
    """Why ``folder`` cannot be listed (``"Permission denied"``), or ``""`` when it can."""
    try:
        with os.scandir(folder):
            return ""
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def export_files(folder: Path, indexes: bool = False, unreadable: bool = False) -> list[Path]:
    """Every file under ``folder`` (sub-folders too), sorted; hidden files and folders aside, and
    index files unless ``indexes``.

    How a folder of X-rays is listed wherever one is read: a hospital's export
    (:mod:`fracture.manifest`), and with its indexes the folders ``fracture predict`` scores.

    Folders linked into it are walked too: a study folder or a PACS share often links each series
    from where it is stored, and ``Path.rglob`` leaves them out unseen. The folder's own tree is
    walked first, then each linked folder, each once by where it resolves: a link to a folder
    already walked (a second name for one of the tree's folders, or a second link) lists no file
    twice, and its files keep their own folder's name; a link to the folder itself or to one
    above it (a loop, or the root of a share) is not walked at all, so no file from outside
    ``folder`` is listed.

    With ``unreadable``, the entries that are no regular file to read are listed too, for
    ``fracture predict`` to give each a row saying why rather than leave it out unseen: a link
    whose target does not exist, a FIFO, socket or device, a linked folder not walked (above),
    and a folder that cannot be listed. Without it they are left out, as before.
    """
    found: list[Path] = []
    top = folder.resolve()
    walked: set[Path] = set()
    links: list[Path] = []  # linked folders met, followed once the tree itself is walked

    def unlisted(exc: OSError) -> None:  # a folder os.walk cannot list (no permission)
        if unreadable and exc.filename is not None:
            found.append(Path(exc.filename))

    def walk(start: Path) -> None:
        for root, dirs, names in os.walk(start, onerror=unlisted):
            here = Path(root)
            walked.add(here.resolve())
            walk_on = []
            # In order, so that of two links to one folder the same one is walked on every run.
            for name in sorted(dirs):
                path = here / name
                if hidden(name):
                    continue
                if path.is_symlink():
                    links.append(path)
                elif path.resolve() in walked:  # in a linked folder: reached already under another name
                    if unreadable:
                        found.append(path)
                else:
                    walk_on.append(name)
            dirs[:] = walk_on
            found.extend(
                here / name for name in names
                if not hidden(name) and (indexes or name not in INDEX_FILES) and (unreadable or (here / name).is_file())
            )

    walk(folder)
    while links:
        link = links.pop(0)
        try:
            real = link.resolve(strict=True)
        except (OSError, RuntimeError):  # gone meanwhile, or a loop of links
            real = None
        if real is None or real in walked or top.is_relative_to(real):
            if unreadable:
                found.append(link)
            continue
        walk(link)
    return sorted(found)


def decode(
    source: str | Path | bytes, draft: tuple[int, int] | None = None, upright: bool = True,
    modalities: Iterable[str] | None = None,
) -> Image.Image:
    """Opens and fully decodes an image upright (mode unchanged; size too, unless ``draft``).

    A JPEG or PNG whose EXIF Orientation tag says its pixels are stored turned or mirrored is
    turned upright, as every viewer and browser shows it, and as whoever labelled it or drew its
    fracture boxes saw it: in FracAtlas, 18 X-rays stored on their side and two upside down,
    one a forearm whose fracture boxes lie on its fractures only once it is turned. Training,
    validation, evaluation, the page and the served model all decode through here, so they see
    the same upright pixels.

    A DICOM file becomes the 8-bit image a reader sees (:func:`fracture.dicom.dicom_to_image`:
    modality LUT, VOI transform, MONOCHROME1 inverted), so a dataset of DICOM files trains on
    the pixels the served model scores.

    With ``draft``, a JPEG is decoded at 1/2, 1/4 or 1/8 of its size, the smallest whose sides
    are still at least ``draft``'s (Pillow's ``draft``: libjpeg scales while it decodes, in the
    DCT domain). A 2304 x 2880 X-ray meant for a 352 px input is decoded at 576 x 720 in a
    fraction of the time, and the resize after it does the rest. Files too small to reduce,
    other formats and DICOM decode in full.

    ``upright=False`` keeps the stored orientation, for a reader that must know where in the
    stored rows a truncated file stops.

    ``modalities``: the DICOM modalities accepted, ``serve.modalities`` where a file is accepted
    or not (the validate stage, as the served model's :mod:`fracture.intake` does); ``None``
    (the default) accepts any, as the stages after validate do: they decode only the files it
    accepted.
    """
    with _GATE.shared():
        return _decode(source, draft, upright, modalities)


def _decode(
    source: str | Path | bytes, draft: tuple[int, int] | None, upright: bool = True,
    modalities: Iterable[str] | None = None,
) -> Image.Image:
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if is_dicom(data):
        return dicom_to_image(data, modalities)
    with Image.open(io.BytesIO(data)) as img:
        # Entropy-coded data stuffs every 0xFF byte, so only a marker reads FF DA.
        if img.format in ("JPEG", "MPO") and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
            raise TooManyScans(
                f"is a JPEG of {scans} scans, more than the {MAX_JPEG_SCANS} any X-ray export writes: the served "
                "model refuses it, since decoding passes over the whole image once a scan (minutes for thousands "
                "of them); send it exported again as a plain JPEG"
            )
        if draft is not None:
            img.draft(img.mode, draft)  # JPEG only; other formats ignore it
        img.load()
        if upright:
            ImageOps.exif_transpose(img, in_place=True)  # keeps the format, which the callers check
        return img


def decoded_height(grey: np.ndarray) -> int:
    """Rows above the grey a truncated JPEG's missing part decodes to: the flat rows at the
    bottom, and above them the rows of the last, partly decoded block row, whose pixels from some
    column to the right edge hold that same grey: at most :data:`_MCU_ROWS`, so that a picture
    whose right margin is that grey is not counted as missing all its rows."""
    fill = grey[-1, -1]
    flat = (grey == fill).all(axis=1)
    height = len(grey)
    while height > 0 and flat[height - 1]:
        height -= 1
    floor = max(0, height - _MCU_ROWS)
    while height > floor and grey[height - 1, -2:].tolist() == [fill, fill]:
        height -= 1
    return height


#: The most rows one block row of a JPEG spans: 8 times the largest vertical sampling factor, 4
#: (ITU-T T.81 A.1.1). FracAtlas's 49 truncated files' partly decoded rows span 16 at most.
_MCU_ROWS = 32


#: EXIF orientations whose upright image is the stored one turned a quarter: width and height swap.
_QUARTER_TURNS = frozenset({5, 6, 7, 8})


def upright_size(img: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of an opened, not necessarily decoded, picture once :func:`decode` has
    turned it upright: the header's size, swapped when its EXIF orientation turns it a quarter."""
    turned = img.getexif().get(ExifTags.Base.Orientation, 1) in _QUARTER_TURNS
    return (img.height, img.width) if turned else img.size


def shown_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of a file as :func:`decode` gives it, read from its header: a picture
    turned upright (:func:`upright_size`), a DICOM radiograph with square pixels
    (:func:`~fracture.dicom.display_size`). The frame boxes drawn on the image are in.

    A PNG's orientation is read from its chunks without decoding the image, wherever they lie
    (Pillow's ``getexif`` decodes the whole image to reach one after the image data, and fails on
    a file that ends early, which training keeps): :func:`_png_orientation`.

    Raises:
        ImageLoadError: the file cannot be read, or is neither a picture nor DICOM (named).
    """
    try:
        with Path(path).open("rb") as handle:
            start = handle.read(132)
        if is_dicom(start):
            ds = read_header(Path(path).read_bytes())
            if missing := [keyword for keyword in ("Rows", "Columns") if keyword not in ds]:
                raise ValueError(f"its DICOM header has no {' or '.join(missing)}")
            return display_size(ds)
        if start.startswith(_PNG_START[:8]):
            with Image.open(path) as img:
                size = img.size
            turned = _png_orientation(Path(path)) in _QUARTER_TURNS
            return (size[1], size[0]) if turned else size
        with Image.open(path) as img:
            return upright_size(img)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageLoadError(f"{path}: its size cannot be read ({failure_reason(exc)})") from exc


#: The chunks from which Pillow reads a PNG's orientation: EXIF in an eXIf chunk, or in a text chunk
#: "Raw profile type exif" (ImageMagick's), or XMP's tiff:Orientation in an iTXt chunk.
_PNG_ORIENTATION_CHUNKS = frozenset({b"eXIf", b"tEXt", b"zTXt", b"iTXt"})


def _png_orientation(path: Path) -> int:
    """The EXIF orientation of a PNG (1 without one) as :func:`decode` turns it: its chunks are read
    one by one, past the image data rather than decoding it, with Pillow's own chunk readers, and
    the orientation found with Pillow's own ``getexif`` (eXIf, the text chunk ImageMagick writes,
    then XMP), so that the size boxes are checked against is the size of the image trained on."""
    with path.open("rb") as handle:
        handle.seek(8)  # the signature
        stream = PngImagePlugin.PngStream(handle)
        while True:
            try:
                kind, position, length = stream.read()
            except (struct.error, SyntaxError):  # the file ends, or what follows is no chunk
                break
            if kind == b"IEND":
                break
            if kind in _PNG_ORIENTATION_CHUNKS:
                try:
                    stream.call(kind, position, length)
                except OSError:  # the file ends inside the chunk
                    break
            else:
                handle.seek(length, io.SEEK_CUR)
            handle.seek(4, io.SEEK_CUR)  # the chunk's CRC
    found = Image.new("1", (1, 1))
    found.info = stream.im_info
    return int(found.getexif().get(ExifTags.Base.Orientation, 1))


def decode_truncated(
    source: str | Path | bytes, draft: tuple[int, int] | None = None, upright: bool = True,
    modalities: Iterable[str] | None = None,
) -> Image.Image:
    """Like :func:`decode`, but decodes files that end early; the missing rows become grey.

    Pillow allows truncated files only through a module flag: it is set for this decode alone,
    while no other decode of this process runs (:class:`_DecodeGate`), so that no other file is
    accepted truncated meanwhile and no thread leaves it set.
    """
    with _GATE.alone():
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            return _decode(source, draft, upright, modalities)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
