"""The model's input checks (fracture.intake), the same for every consumer; synthetic and real images."""

from __future__ import annotations

import dataclasses
import io
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fracture.intake import InputPolicy, InputRejected, read_file, read_xray
from tests.conftest import require_fracatlas
from tests.synthetic import ihdr_png

POLICY = InputPolicy(min_side=64, max_side=8192, max_pixels=50_000_000, max_bytes=2**20, min_grey_std=2.0)


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def xray_like(size: tuple[int, int] = (300, 400), mode: str = "L") -> Image.Image:
    """A gradient with structure: not blank, as any radiograph."""
    rng = np.random.default_rng(0)
    grey = (np.linspace(0, 200, size[0])[None, :] + rng.normal(0, 10, (size[1], size[0]))).clip(0, 255)
    return Image.fromarray(grey.astype(np.uint8)).convert(mode)


def many_scans(extra: int) -> bytes:
    """:func:`xray_like` as a progressive JPEG with ``extra`` more AC scans of a few bytes each, each
    one end-of-band run over every block: valid, and each makes the decoder pass over the whole
    image again (so thousands of them, on a large image, take minutes to decode)."""
    base = encode(xray_like((304, 400)), "JPEG", progressive=True, quality=90)
    end = base.rindex(b"\xff\xd9")
    # AC table 1 with one symbol, 0xA0 (an EOB run of 2^10 + 10 more bits), coded "0".
    dht = b"\xff\xc4" + struct.pack(">H", 20) + bytes([0x11, 1] + [0] * 15) + b"\xa0"
    blocks = (304 // 8) * (400 // 8)
    bits = "0" + format(blocks - 2**10, "010b")
    bits += "1" * (-len(bits) % 8)
    entropy = bytes(int(bits[k : k + 8], 2) for k in range(0, len(bits), 8)).replace(b"\xff", b"\xff\x00")
    # Component 1, AC table 1, spectral selection 1-63, successive approximation 0.
    scan = b"\xff\xda" + struct.pack(">HB", 8, 1) + bytes([1, 0x01, 1, 63, 0x00]) + entropy
    return base[:end] + dht + scan * extra + base[end:]


def png_16bit(colour_type: int) -> bytes:
    """:func:`xray_like` as a 12-bit detector's export holds it (0..4080 of 0..65535), in a 16-bit PNG
    of this colour type (0 grey, 2 RGB, 4 grey and alpha, 6 RGBA; alpha opaque). Pillow writes
    16-bit greyscale only, so the file is put together by hand."""
    grey = np.asarray(xray_like()).astype(np.uint16) * 16
    opaque = np.full_like(grey, 65535)
    planes = {0: [grey], 2: [grey] * 3, 4: [grey, opaque], 6: [grey] * 3 + [opaque]}[colour_type]
    pixels = np.dstack(planes).astype(">u2")  # PNG stores samples big-endian
    rows = b"".join(b"\x00" + row.tobytes() for row in pixels)  # filter type 0 before each row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", grey.shape[1], grey.shape[0], 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (lambda: b"", "is empty"),
        (lambda: bytes(2**20 + 1), "is 1,048,577 bytes; the model accepts files up to 1,048,576 bytes (1 MiB)"),
        (lambda: b"patient notes, not an image\n" * 20, "is not an image file that can be read"),
        (lambda: encode(xray_like(), "GIF"), "is a GIF file, not JPEG, PNG or DICOM"),
        (lambda: encode(xray_like(), "BMP"), "is a BMP file"),
        (lambda: ihdr_png(12_000, 12_000), "declares 12000 x 12000 px (144 megapixels)"),
        (lambda: ihdr_png(100_000, 100_000), "declares absurd dimensions"),
        (lambda: encode(xray_like((9000, 100))), "is 9000 x 100 px; the model accepts images whose sides are between 64"),
        (lambda: encode(xray_like((40, 300))), "is 40 x 300 px"),
        (lambda: encode(Image.new("I;16", (300, 300), 40000)), "is a 16-bit PNG (mode I;16)"),
        (lambda: encode(xray_like().convert("1")), "is a 1-bit black-and-white image"),
        (lambda: encode(Image.new("L", (600, 800))), "is blank or nearly constant (greyscale standard deviation 0.00"),
        (lambda: encode(Image.new("RGB", (600, 800), (200, 200, 200))), "is blank or nearly constant"),
        (lambda: many_scans(95), "is a JPEG of 101 scans, more than the 100 any X-ray export writes: the served model"),
    ],
)
def test_refusals_say_what_is_wrong_and_what_to_send(data, message):
    with pytest.raises(InputRejected, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as info:
        read_xray(data(), POLICY)
    assert "Send" in str(info.value) or "send" in str(info.value)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (lambda: encode(xray_like(), "TIFF"), "is a TIFF file, not JPEG, PNG or DICOM"),
        (lambda: encode(xray_like(), "BMP"), "is a BMP file, not JPEG, PNG or DICOM"),
        (lambda: encode(xray_like(), "WEBP"), "is a WEBP file, not JPEG, PNG or DICOM"),
        (lambda: encode(Image.new("I;16", (300, 300), 40000)), "is a I;16 image of more than 8 bits a sample"),
        (lambda: png_16bit(2), "is a 16-bit RGB image of more than 8 bits a sample"),
        (lambda: png_16bit(4), "is a 16-bit RGBA image of more than 8 bits a sample"),
        (lambda: png_16bit(6), "is a 16-bit RGBA image of more than 8 bits a sample"),
        (lambda: encode(xray_like().convert("1")), "is a 1-bit black-and-white image"),
        (lambda: many_scans(150), "is a JPEG of 156 scans, more than the 100 any X-ray export writes"),
    ],
)
def test_training_lists_a_file_the_served_model_refuses_as_undecodable(tmp_path, data, reason):
    """A file in a hospital's export that Pillow decodes but the served model refuses is not
    trained on either: the validate stage lists it as undecodable, with the reason."""
    from fracture.manifest import inspect_image

    path = tmp_path / "IM0001"
    path.write_bytes(data())
    with pytest.raises(InputRejected):
        read_xray(path.read_bytes(), POLICY)
    facts = inspect_image(str(path))
    assert not facts.decodable and facts.error.startswith(reason) and "served model refuses it" in facts.error
    # What it serves, it trains on.
    path.write_bytes(encode(xray_like(), "PNG"))
    assert inspect_image(str(path)).decodable


@pytest.mark.parametrize(
    ("modality", "modalities"),
    [("CR", ("DX",)), ("OT", ("CR", "DX", "RG", "OT"))],
    ids=["narrowed: CR refused", "widened: OT read"],
)
def test_training_reads_the_dicom_modalities_the_served_model_reads(tmp_path, modality, modalities):
    """``serve.modalities`` decides which DICOM modalities the served model reads. Training decoded
    with a fixed list of its own (CR, DX, RG, XA then): narrowed, it trained on files the served model
    refused; widened, it refused the files the served model read, naming serve.modalities, which
    did not change that. Now the validate stage lists a file of another modality as the served
    model refuses it, and takes one it reads; the stages after it decode what validate took."""
    from fracture.decoding import open_xray
    from fracture.manifest import inspect_image
    from tests.dicom_files import dicom_from_jpeg

    policy = dataclasses.replace(POLICY, modalities=modalities)
    jpeg = tmp_path / "xray.jpg"
    jpeg.write_bytes(encode(xray_like(), "JPEG", quality=95))
    path = tmp_path / "IM0001"
    path.write_bytes(dicom_from_jpeg(jpeg, "8-bit", modality=modality))
    facts = inspect_image(str(path), min_grey_std=policy.min_grey_std, modalities=modalities)
    if modality not in modalities:
        with pytest.raises(InputRejected, match=f"modality {modality}") as refused:
            read_xray(path.read_bytes(), policy)
        assert not facts.decodable and facts.error in str(refused.value)
        assert "serve.modalities" in facts.error
        # Under the shipped list the same file is read: the list is what refuses it.
        assert inspect_image(str(path), min_grey_std=policy.min_grey_std).decodable
    else:
        served = read_xray(path.read_bytes(), policy)
        assert facts.decodable and facts.error is None
        # The prepare stage (and the detector's data) decode it as the served model does.
        trained = open_xray(path, rgb=False)
        assert served.format == "DICOM" and np.array_equal(np.asarray(trained), np.asarray(served.image))


def test_training_takes_no_dicom_file_of_a_body_part_the_served_model_refuses(tmp_path):
    """serve.body_parts refuses a chest X-ray when served: the validate stage lists it as not
    decodable with the same reason, so the model trains on no file it would refuse."""
    from pydicom import dcmread

    from fracture.manifest import inspect_image
    from tests.dicom_files import dicom_from_jpeg, to_bytes

    jpeg = tmp_path / "xray.jpg"
    jpeg.write_bytes(encode(xray_like(), "JPEG", quality=95))
    for part, read in (("CHEST", False), ("KNEE", True), (None, True)):
        ds = dcmread(io.BytesIO(dicom_from_jpeg(jpeg, "8-bit")))
        if part:
            ds.BodyPartExamined = part
        path = tmp_path / f"IM{part}"
        path.write_bytes(to_bytes(ds))
        facts = inspect_image(str(path), min_grey_std=POLICY.min_grey_std, body_parts=POLICY.body_parts)
        assert facts.decodable is read, part
        if not read:
            with pytest.raises(InputRejected) as refused:
                read_xray(path.read_bytes(), POLICY)
            assert facts.error and facts.error in str(refused.value) and "serve.body_parts" in facts.error
            assert inspect_image(str(path), body_parts=None).decodable  # the list is what refuses it


def near_constant_noise(spread: float, size: tuple[int, int] = (300, 400)) -> Image.Image:
    """Grey 128 with Gaussian noise of this spread: near-constant below ``min_grey_std``, a faint X-ray above."""
    rng = np.random.default_rng(1)
    return Image.fromarray((128 + rng.normal(0, spread, size[::-1])).round().clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize(
    ("data", "served", "listed"),
    [
        (lambda: encode(Image.new("L", (600, 800))), "is blank or nearly constant",
         "is blank or nearly constant (greyscale standard deviation 0.00, under serve.min_grey_std 2)"),
        (lambda: encode(near_constant_noise(1.0), "JPEG", quality=95), "is blank or nearly constant",
         "is blank or nearly constant (greyscale standard deviation 0.8"),  # JPEG smooths the noise
        (lambda: encode(Image.new("RGB", (600, 800), (200, 200, 200))), "is blank or nearly constant",
         "is blank or nearly constant"),
        # Transparent pixels are shown to the model as black: a fully transparent X-ray is blank.
        (lambda: encode(Image.fromarray(np.dstack([np.asarray(xray_like())] * 3 + [np.zeros((400, 300), np.uint8)]))),
         "is blank or nearly constant", "is blank or nearly constant (greyscale standard deviation 0.00"),
        (lambda: encode(xray_like((1200, 1000)), "JPEG"), "declares 1200 x 1000 px",
         "declares 1200 x 1000 px (1.2 megapixels), over serve.max_megapixels (1)"),
        (lambda: ihdr_png(12_000, 12_000), "declares 12000 x 12000 px", "declares 12000 x 12000 px (144.0 megapixels)"),
        (lambda: ihdr_png(100_000, 100_000), "declares absurd dimensions", "declares absurd dimensions, far over"),
    ],
)
def test_training_lists_a_blank_or_over_limit_file_the_served_model_refuses(tmp_path, data, served, listed):
    """The served model refuses a picture over ``serve.max_megapixels`` (a decompression bomb) and
    a blank or near-constant one (below ``serve.min_grey_std``); training decoded and trained on
    both. Now the manifest lists each as not decodable, with the served model's reason."""
    from fracture.manifest import inspect_image

    policy = dataclasses.replace(POLICY, max_pixels=1_000_000)
    path = tmp_path / "IM0001"
    path.write_bytes(data())
    with pytest.raises(InputRejected, match="^" + re.escape(served)) as refused:
        read_xray(path.read_bytes(), policy)
    facts = inspect_image(str(path), max_pixels=policy.max_pixels, min_grey_std=policy.min_grey_std)
    assert not facts.decodable and facts.error.startswith(listed), facts.error
    assert "served model refuses it" in facts.error and "serve." in facts.error  # says which setting refused it
    # Measured alike: the spread training lists is the one the served model refused.
    spread = re.compile(r"standard deviation ([0-9.]+)")
    assert spread.findall(facts.error) == spread.findall(str(refused.value))
    # What it serves, it trains on: a faint X-ray, and one within the pixel limit.
    for image in (near_constant_noise(4.0), xray_like((1000, 1000))):
        path.write_bytes(encode(image))
        read_xray(path.read_bytes(), policy)
        assert inspect_image(str(path), max_pixels=policy.max_pixels, min_grey_std=policy.min_grey_std).decodable


@pytest.mark.parametrize(("colour_type", "mode"), [(0, "I;16"), (2, "RGB"), (4, "RGBA"), (6, "RGBA")])
def test_a_16_bit_colour_png_is_refused_as_a_16_bit_grey_one_is(colour_type, mode):
    """Pillow opens a 16-bit RGB, RGBA or grey-and-alpha PNG as 8-bit RGB or RGBA, keeping each
    sample's high byte: a 12-bit X-ray (0..4080) would decode as 0..15, near black, and be
    scored. The header's bit depth refuses it as the 16-bit greyscale PNG is refused."""
    data = png_16bit(colour_type)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == mode  # what the mode alone says
    with pytest.raises(InputRejected) as info:
        read_xray(data, POLICY)
    assert str(info.value).startswith(f"is a 16-bit PNG (mode {mode}). The model was trained on 8-bit X-rays")
    assert "send the DICOM file" in str(info.value)
    # The same X-ray in 8 bits is scored as it is.
    assert read_xray(encode(xray_like(mode="RGB")), POLICY).mode == "RGB"


def test_a_progressive_jpeg_of_as_many_scans_as_any_export_writes_is_read():
    """Pillow's progressive greyscale JPEG holds 6 scans; 90 scans more of the kind a decoding bomb repeats
    still decode, as the image they refine (every scan passes over the image, adding nothing)."""
    plain = read_xray(encode(xray_like((304, 400)), "JPEG", progressive=True, quality=90), POLICY).image
    scanned = read_xray(many_scans(90), POLICY).image
    assert np.array_equal(np.asarray(scanned), np.asarray(plain))


def test_a_dicom_files_jpeg_frame_of_too_many_scans_is_refused_as_a_jpeg_file_is(monkeypatch):
    """The scan limit held for JPEG files only: the same frame inside a DICOM file (JPEG baseline)
    was decoded, a few seconds a thousand scans, on the page, the server, predict and in training."""
    from fracture import dicom
    from tests.dicom_files import encapsulated

    as_dicom = lambda extra: encapsulated(many_scans(extra), "JPEG", 400, 304)  # noqa: E731
    # 96 scans decode to the image of Pillow's 6, as in a JPEG file.
    assert np.array_equal(np.asarray(read_xray(as_dicom(90), POLICY).image), np.asarray(read_xray(as_dicom(0), POLICY).image))
    def never(_):
        raise AssertionError("decoded")

    monkeypatch.setattr(dicom.Dataset, "pixel_array", property(never))  # refused before a pixel is decoded
    with pytest.raises(InputRejected) as info:
        read_xray(as_dicom(95), POLICY)
    assert "has compressed pixel data (JPEG Baseline (Process 1)) of 101 scans, more than the 100" in str(info.value)
    assert "send it exported again uncompressed or as a plain JPEG" in str(info.value)


def test_a_bomb_is_refused_before_its_pixels_are_decoded(monkeypatch):
    from fracture import intake

    def never(*_):
        raise AssertionError("decoded")

    monkeypatch.setattr(intake, "decode", never)
    with pytest.raises(InputRejected, match="megapixels"):
        read_xray(ihdr_png(12_000, 12_000), POLICY)


def test_near_constant_noise_is_blank_but_a_faint_xray_is_not():
    rng = np.random.default_rng(1)
    noise = Image.fromarray((128 + rng.normal(0, 1.0, (400, 300))).round().clip(0, 255).astype(np.uint8))
    with pytest.raises(InputRejected, match="blank or nearly constant"):
        read_xray(encode(noise), POLICY)
    faint = Image.fromarray((100 + rng.normal(0, 4.0, (400, 300))).round().clip(0, 255).astype(np.uint8))
    assert read_xray(encode(faint), POLICY).image.size == (300, 400)


def test_jpeg_and_png_as_trained_pass_unchanged():
    img = xray_like()
    xray = read_xray(encode(img, "JPEG", quality=95), POLICY)
    assert (xray.format, xray.mode, xray.warnings) == ("JPEG", "L", ())
    assert xray.image.mode == "L"  # made RGB after the resize, by the model's transform
    png = read_xray(encode(img), POLICY)
    np.testing.assert_array_equal(np.asarray(png.image), np.asarray(img))


def test_conversions_are_reported():
    rgba = xray_like(mode="RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    xray = read_xray(encode(rgba), POLICY)
    assert "transparent pixels are shown to the model as black background" in xray.warnings[0]
    palette = read_xray(encode(xray_like(mode="RGB").convert("P")), POLICY)
    assert palette.warnings == ("Palette (indexed-colour) image converted to RGB.",)


def test_truncated_files_follow_the_policy():
    whole = encode(xray_like((600, 800)), "JPEG", quality=95)
    cut = whole[: 2 * len(whole) // 3]
    scored = read_xray(cut, POLICY)
    assert scored.image.size == (600, 800)
    (note,) = scored.warnings
    share = int(re.fullmatch(r"the file ends early: (\d+)% of its rows are missing and were scored as grey, as in "
                             r"training", note)[1])
    assert 20 <= share <= 45, share  # a third of the bytes
    # A file with almost nothing left was scored "as in training" (FracAtlas's miss at most about half).
    (note,) = read_xray(whole[: len(whole) // 30], POLICY).warnings
    assert int(re.match(r"the file ends early: (\d+)%", note)[1]) > 90
    assert note.endswith("; so little of the X-ray is there that the answer means little: send the complete file "
                         "(FracAtlas's truncated X-rays miss at most about half)")
    with pytest.raises(InputRejected, match="is cut short"):
        read_xray(cut, InputPolicy(truncated="refuse"))
    # An export padded with the very grey the missing rows decode to, cut by a tenth: counted as
    # missing every row, with the warning, while its flat band at the bottom is under a tenth.
    padded = np.full((512, 512), 128, np.uint8)
    padded[:, 64:448] = np.asarray(xray_like((384, 512)))
    whole = encode(Image.fromarray(padded), "JPEG", quality=90)
    (note,) = read_xray(whole[: int(len(whole) * 0.9)], POLICY).warnings
    assert 3 <= int(re.match(r"the file ends early: (\d+)%", note)[1]) <= 20, note
    assert "means little" not in note


def test_corrupt_jpeg_is_refused_without_server_detail():
    data = bytearray(encode(xray_like((600, 800)), "JPEG"))
    data[150:3000] = bytes(2850)
    with pytest.raises(InputRejected, match="^is corrupt and cannot be decoded") as info:
        read_xray(bytes(data), POLICY)
    assert "/" not in str(info.value)


def test_every_real_xray_in_a_sample_passes():
    root = require_fracatlas() / "images"
    paths = sorted((root / "Fractured").iterdir())[:5] + sorted((root / "Non_fractured").iterdir())[:5]
    for path in paths:
        xray = read_xray(path.read_bytes(), InputPolicy())
        assert xray.format == "JPEG" and xray.image.mode == xray.mode in {"L", "RGB"}


def test_policy_round_trips_and_defaults_for_older_models():
    policy = InputPolicy(min_side=32, truncated="refuse", modalities=("DX",), max_rows=8)
    assert InputPolicy.from_dict(policy.to_dict()) == policy
    assert InputPolicy.from_dict(None) == InputPolicy()
    with pytest.raises(ValueError, match="unknown keys"):
        InputPolicy.from_dict({"max_sides": 3})
    with pytest.raises(ValueError, match="truncated must be one of"):
        InputPolicy(truncated="keep")  # type: ignore[arg-type]


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    big.write_bytes(bytes(2**20 + 1))
    monkeypatch.setattr(type(big), "read_bytes", lambda self: pytest.fail("read"))
    with pytest.raises(InputRejected, match="^is 1,048,577 bytes; the model accepts files up to 1,048,576 bytes") as png:
        read_file(big, POLICY)
    assert str(png.value).endswith("or as its DICOM file.")
    # An uncompressed DICOM over the limit was told to send its DICOM file: it is told how to make it smaller.
    big.write_bytes(bytes(128) + b"DICM" + bytes(2**20))
    with pytest.raises(InputRejected, match=r"the model accepts files up to 1,048,576 bytes \(1 MiB\)\. Send it exported "
                                            r"from the PACS JPEG-compressed \(lossless JPEG, JPEG-LS or JPEG 2000\), "
                                            r"or as an 8-bit JPEG or PNG\.$"):
        read_file(big, POLICY)


@pytest.mark.parametrize(
    ("size", "limit", "message"),
    [
        (64 * 2**20 + 1, 64 * 2**20, "is 67,108,865 bytes; the model accepts files up to 67,108,864 bytes (64 MiB)"),
        (64 * 2**20 + 2**15, 64 * 2**20, "is 67,141,632 bytes; the model accepts files up to 67,108,864 bytes (64 MiB)"),
        (int(1.5 * 2**20), 2**20, "is 1.5 MiB; the model accepts files up to 1 MiB"),
        (2**20 + 1, 2**19, "is 1.0 MiB; the model accepts files up to 0.5 MiB"),
    ],
)
def test_a_file_over_the_size_limit_never_reads_as_the_limit_s_own_size(size, limit, message):
    """Rounded to 0.1 MiB, a file just over 64 MiB read "is 64.0 MiB; ... up to 64 MiB": where the
    rounded figures would read equal, the refusal gives both in bytes."""
    with pytest.raises(InputRejected, match="^" + re.escape(message) + r"\. Send"):
        read_xray(bytes(size), InputPolicy(max_bytes=limit))


@pytest.mark.parametrize(
    ("width", "height", "limit", "message"),
    [
        (1000, 1001, 1_000_000, "declares 1000 x 1001 px (1,001,000 pixels); the model decodes at most 1,000,000 pixels "
                                "(1 megapixels)"),
        (1200, 1000, 1_100_000, "declares 1200 x 1000 px (1,200,000 pixels); the model decodes at most 1,100,000 pixels "
                                "(1.1 megapixels)"),
        (1000, 1000, 500_000, "declares 1000 x 1000 px (1 megapixels); the model decodes at most 0.5 megapixels"),
        (12_000, 12_000, 50_000_000, "declares 12000 x 12000 px (144 megapixels); the model decodes at most 50 megapixels"),
    ],
)
def test_an_image_over_the_pixel_limit_never_reads_as_the_limit_s_own_count(width, height, limit, message):
    """Rounded to whole megapixels, 1000 x 1001 px read "(1 megapixels); ... at most 1 megapixels"
    (and a limit under 1 megapixel read "at most 0")."""
    with pytest.raises(InputRejected, match="^" + re.escape(message) + r"\. Send"):
        read_xray(ihdr_png(width, height), InputPolicy(max_pixels=limit, max_side=12_000))


def test_a_truncated_file_is_refused_even_while_another_thread_decodes_one(tmp_path):
    """Pillow accepts truncated files through a module flag, which a truncated decode in another
    thread (the pyfunc decodes rows in threads; the page serves sessions in threads) turns on.
    Meanwhile a policy that refuses truncated files must still refuse them, and one that scores
    them must still say so."""
    import threading

    from fracture.decoding import decode_truncated

    data = (require_fracatlas() / "images/Fractured/IMG0000019.jpg").read_bytes()
    cut = data[: len(data) // 2]
    stop = threading.Event()

    def decode_truncated_files() -> None:
        while not stop.is_set():
            decode_truncated(cut)

    other = threading.Thread(target=decode_truncated_files)
    other.start()
    try:
        accepted = noted = 0
        for _ in range(40):
            try:
                read_xray(cut, InputPolicy(truncated="refuse"))
                accepted += 1
            except InputRejected:
                pass
            noted += any("ends early" in w for w in read_xray(cut, InputPolicy(truncated="score")).warnings)
    finally:
        stop.set()
        other.join()
    assert (accepted, noted) == (0, 40)


@pytest.mark.parametrize("mode", ["LA", "RGBA", "P"])
def test_an_image_with_transparency_trains_on_the_pixels_it_is_served_with(mode):
    """Half transparent: the input checks paint transparent pixels black (an X-ray's background);
    training reads the file through the same conversion, not Pillow's plain convert, which would
    keep whatever values lie under the transparency."""
    from fracture.decoding import open_xray

    rng = np.random.default_rng(0)
    grey = rng.integers(20, 235, (96, 96), dtype=np.uint8)
    alpha = np.full((96, 96), 255, dtype=np.uint8)
    alpha[:, :48] = 0
    image = Image.merge("LA", (Image.fromarray(grey), Image.fromarray(alpha)))
    if mode == "RGBA":
        image = image.convert("RGBA")
    elif mode == "P":
        image = image.convert("RGBA").quantize(colors=255, method=Image.Quantize.FASTOCTREE)
        assert (np.asarray(image)[:, :48] == 0).all()  # the transparent half is palette entry 0 ...
        image.info["transparency"] = 0  # ... which the file marks transparent
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    served = np.asarray(read_xray(data, InputPolicy()).image)
    trained = np.asarray(open_xray(data))
    np.testing.assert_array_equal(trained, served)
    assert served[:, :48].max() == 0 and served[:, 48:].max() > 0


def test_a_picture_in_colour_is_scored_with_a_warning_an_xray_saved_in_colour_is_not():
    """A phone photograph or any coloured picture was scored and classified with no word that it is
    unlike every X-ray the model learnt from; FracAtlas's RGB JPEGs are greyscale saved in colour."""
    grey = xray_like(mode="RGB")
    assert read_xray(encode(grey, "JPEG", quality=95), POLICY).warnings == ()
    real = require_fracatlas() / "images" / "Non_fractured" / "IMG0000000.jpg"  # an RGB JPEG of FracAtlas
    assert read_xray(real.read_bytes(), POLICY).mode == "RGB" and read_xray(real.read_bytes(), POLICY).warnings == ()
    tinted = np.asarray(grey).astype(int)
    tinted[..., 0] = np.clip(tinted[..., 0] + 40, 0, 255)  # a reddish photograph of a film, say
    for data in (encode(Image.fromarray(tinted.astype(np.uint8)), "JPEG", quality=95),
                 encode(Image.fromarray(tinted.astype(np.uint8)).convert("P"))):
        (warning,) = [w for w in read_xray(data, POLICY).warnings if "colour" in w and "palette" not in w.lower()]
        assert re.fullmatch(r"the image holds colour \(mean channel difference \d+ of 510; an X-ray has none\): the "
                            r"model was trained on greyscale radiographs only, so its answer on a photograph or a "
                            r"coloured picture means nothing", warning), warning
