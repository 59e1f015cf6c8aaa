"""Preprocessing: resize without crop, identical in training and serving; clear load errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from fracture.data_config import DataConfig
from fracture.decoding import (
    ImageLoadError,
    decode,
    decode_truncated,
    open_xray,
    shown_size,
    upright_size,
)
from fracture.imaging import Preprocessor, build_transform
from fracture.intake import InputPolicy, read_xray
from fracture.manifest import inspect_image
from fracture.near_duplicates import thumbnail
from tests.conftest import require_fracatlas

CONFIG = DataConfig((3, 64, 64), "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def corner_marked(width: int, height: int) -> Image.Image:
    """Black image with white squares at the top-left and bottom-right corners."""
    a = np.zeros((height, width), dtype=np.uint8)
    s = max(width, height) // 10
    a[:s, :s] = 255
    a[-s:, -s:] = 255
    return Image.fromarray(a, mode="L")


def test_no_centre_crop_keeps_the_corners_of_a_tall_image():
    x = build_transform(CONFIG)(corner_marked(120, 360).convert("RGB"))
    assert x.shape == (3, 64, 64)
    assert x[0, 0, 0] > 0.9 and x[0, -1, -1] > 0.9  # both corner marks survive (normalised white ~ 1)


def test_training_preprocessing_equals_serving_transform(tmp_path):
    path = tmp_path / "x.png"
    corner_marked(200, 150).save(path)
    pre = Preprocessor(CONFIG)
    batch = pre(pre.load([path], allow_truncated=False, workers=1))
    served = build_transform(CONFIG)(open_xray(path))
    assert torch.allclose(batch[0], served, atol=1e-6)


def test_greyscale_becomes_three_channels(tmp_path):
    path = tmp_path / "g.jpg"
    corner_marked(50, 50).save(path)
    assert open_xray(path).mode == "RGB"
    assert open_xray(path, rgb=False).mode == "L"
    assert build_transform(CONFIG)(open_xray(path, rgb=False)).shape == (3, 64, 64)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("aspect", ["squash", "pad"])
def test_resizing_grey_then_copying_to_rgb_gives_the_pixels_of_resizing_rgb(interpolation, aspect):
    """A greyscale X-ray is resized as one channel and made RGB afterwards (the fast path the
    prepared cache, evaluation and the served model take): pixel for pixel what resizing its RGB
    copy gives, on a real FracAtlas X-ray at its full size and on a synthetic one."""
    config = DataConfig((3, 352, 352), interpolation, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), aspect=aspect)
    resize = Preprocessor(config).resize
    real = [p for p in sorted((require_fracatlas() / "images" / "Fractured").iterdir())[:40]
            if Image.open(p).mode == "L"][:2]
    rng = np.random.default_rng(0)
    images = [open_xray(p, rgb=False) for p in real] + [
        Image.fromarray(rng.integers(0, 256, (454, 373), dtype=np.uint8), mode="L")
    ]
    assert len(images) == 3 and all(img.mode == "L" for img in images)
    for grey in images:
        fast = np.asarray(resize(grey))
        assert fast.shape == (352, 352, 3)
        np.testing.assert_array_equal(fast, np.asarray(resize(grey.convert("RGB"))))


def xray_like_jpeg(path, width: int, height: int, quality: int = 90) -> None:
    """A greyscale JPEG with bone-like edges and grain: a smooth gradient, bars and noise."""
    rng = np.random.default_rng(1)
    x = np.mgrid[0:height, 0:width][1]
    a = 60 + 120 * x / width + 30 * ((x // max(1, width // 12)) % 2) + rng.normal(0, 8, (height, width))
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L").save(path, quality=quality)


@pytest.mark.parametrize(
    ("size", "decoded"),
    [((1200, 1500), (600, 750)), ((2400, 3000), (600, 750)), ((373, 454), (373, 454))],
    ids=["half-size copy: 1/2", "as published: 1/4", "small: in full"],
)
def test_draft_decodes_a_jpeg_at_the_smallest_scale_covering_the_input(tmp_path, size, decoded):
    path = tmp_path / "x.jpg"
    xray_like_jpeg(path, *size)
    draft = open_xray(path, rgb=False, draft=(352, 352))
    assert draft.size == decoded and draft.mode == "L"
    if decoded == size:  # nothing to reduce: the very pixels of a full decode
        np.testing.assert_array_equal(np.asarray(draft), np.asarray(open_xray(path, rgb=False)))


def test_draft_leaves_png_in_full(tmp_path):
    path = tmp_path / "x.png"
    corner_marked(1200, 1500).save(path)
    draft = open_xray(path, rgb=False, draft=(352, 352))
    assert draft.size == (1200, 1500)
    np.testing.assert_array_equal(np.asarray(draft), np.asarray(open_xray(path, rgb=False)))


@pytest.mark.parametrize("aspect", ["squash", "pad"])
def test_a_draft_data_config_decodes_at_draft_scale_and_resizes_to_nearly_the_full_pixels(tmp_path, aspect):
    """``decode: draft`` changes the model's pixels, by little: what the prepared cache and the
    served model both compute (``Preprocessor.open`` then ``resize``), on a large JPEG."""
    path = tmp_path / "x.jpg"
    xray_like_jpeg(path, 2400, 3000)
    full = DataConfig((3, 352, 352), "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), aspect=aspect)
    draft = DataConfig((3, 352, 352), "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), aspect=aspect, decode="draft")
    assert full.draft_size is None and draft.draft_size == (352, 352)
    assert Preprocessor(draft).open(path, allow_truncated=False).size == (600, 750)
    a = Preprocessor(full).load([path], allow_truncated=False, workers=1).numpy().astype(int)
    b = Preprocessor(draft).load([path], allow_truncated=False, workers=1).numpy().astype(int)
    assert a.shape == b.shape == (1, 3, 352, 352)
    assert not np.array_equal(a, b)
    assert np.abs(a - b).mean() < 1.0  # grey levels of 255


def test_data_config_decode_is_checked_and_defaults_to_full_for_older_models():
    recorded = CONFIG.to_dict()
    assert recorded["decode"] == "full"
    del recorded["decode"]  # a model.json written before the setting existed
    assert DataConfig.from_dict(recorded) == CONFIG
    assert DataConfig.from_dict(recorded | {"decode": "draft"}).draft_size == (64, 64)
    with pytest.raises(ValueError, match="decode must be one of"):
        DataConfig.from_dict(recorded | {"decode": "fast"})


def test_truncated_file_fails_unless_allowed(tmp_path):
    path = tmp_path / "t.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(ImageLoadError) as refused:
        open_xray(path)
    # Most of its rows decode: it ends early, which Pillow's "image file is truncated" says of any such file.
    assert str(refused.value) == (f"{path}: not a decodable image (it ends early: its image data stops before its "
                                  "last rows, or before any (an interrupted transfer or a damaged export); export it "
                                  "again)")
    assert open_xray(path, allow_truncated=True).size == (200, 200)


def test_not_an_image_names_the_input(tmp_path):
    with pytest.raises(ImageLoadError, match="<bytes>"):
        open_xray(b"hello")
    with pytest.raises(ImageLoadError, match="missing.jpg"):
        open_xray(tmp_path / "missing.jpg")


def test_concurrent_truncated_loads_leave_pillows_flag_unset(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from PIL import ImageFile

    path = tmp_path / "t.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 300), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-3000])
    with ThreadPoolExecutor(4) as pool:
        sizes = list(pool.map(lambda _: open_xray(path, allow_truncated=True).size, range(32)))
    assert sizes == [(300, 300)] * 32
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageLoadError):
        open_xray(path)


def _turned_by_exif(path, upright: Image.Image, orientation: int, fmt: str = "JPEG") -> None:
    """Saves ``upright`` stored as a camera or viewer export does: the pixels turned, and an EXIF
    Orientation tag saying how to turn them back (Pillow's ``exif_transpose`` table inverted)."""
    stored = {
        3: upright.transpose(Image.Transpose.ROTATE_180),
        6: upright.transpose(Image.Transpose.ROTATE_90),
        8: upright.transpose(Image.Transpose.ROTATE_270),
    }[orientation]
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    stored.save(path, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))


def _upright_xray(width: int = 120, height: int = 80) -> Image.Image:
    """No turn or mirror of it equals it: a bright square at the top-left, a grey bar along the bottom."""
    a = np.full((height, width), 40, dtype=np.uint8)
    a[:20, :20] = 250
    a[-10:, :] = 140
    return Image.fromarray(a, mode="L")


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_picture_stored_turned_is_decoded_upright_as_its_exif_orientation_says(tmp_path, orientation, fmt):
    """A viewer, a browser and whoever drew the fracture boxes see it upright; so do training
    (the manifest and the prepared cache decode through ``open_xray``) and the served model."""
    upright = _upright_xray()
    path = tmp_path / f"x.{fmt.lower()}"
    _turned_by_exif(path, upright, orientation, fmt)
    with Image.open(path) as stored:
        assert stored.size == ((80, 120) if orientation in (6, 8) else (120, 80))
        assert upright_size(stored) == (120, 80)  # from the header, undecoded
    assert shown_size(path) == (120, 80)
    for decoded in (open_xray(path, rgb=False), decode(path.read_bytes())):
        assert decoded.size == (120, 80)
        assert np.abs(np.asarray(decoded, dtype=int) - np.asarray(upright, dtype=int)).max() <= 12
    if fmt == "JPEG":  # decoded at half scale, then turned
        half = open_xray(path, rgb=False, draft=(32, 32))
        assert half.size == (60, 40)
        assert np.abs(np.asarray(half, dtype=int) - np.asarray(upright.reduce(2), dtype=int)).max() <= 12
    served = read_xray(path.read_bytes(), InputPolicy())
    np.testing.assert_array_equal(np.asarray(served.image), np.asarray(open_xray(path, rgb=False)))
    facts = inspect_image(str(path))
    assert (facts.width, facts.height, facts.decodable) == (120, 80, True)


def test_a_pngs_shown_size_is_read_without_decoding_its_image_wherever_its_exif_lies(tmp_path):
    """Pillow's getexif decodes a PNG whole to reach an eXIf chunk after the image data, and fails on
    one that ends early: the detector's box check stopped on a truncated PNG with a traceback."""
    import struct

    _turned_by_exif(tmp_path / "before.png", _upright_xray(), 6, "PNG")
    data = (tmp_path / "before.png").read_bytes()
    chunks, at = [], 8
    while at < len(data):
        length = struct.unpack(">I", data[at : at + 4])[0]
        chunks.append(data[at : at + 12 + length])
        at += 12 + length
    exif = next(c for c in chunks if c[4:8] == b"eXIf")
    rest = [c for c in chunks if c is not exif]
    after = tmp_path / "after.png"  # eXIf between the image data and IEND, as PNG allows
    after.write_bytes(data[:8] + b"".join(rest[:-1]) + exif + rest[-1])
    for path in (tmp_path / "before.png", after):
        assert shown_size(path) == decode(path.read_bytes()).size == (120, 80), path.name
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) - 60])  # ends inside its image data, which training keeps
    assert shown_size(cut) == decode_truncated(cut.read_bytes()).size == (120, 80)
    _upright_xray().save(tmp_path / "plain.png")  # no eXIf at all: getexif looked past the image data
    plain = (tmp_path / "plain.png").read_bytes()
    cut.write_bytes(plain[: len(plain) - 60])
    assert shown_size(cut) == decode_truncated(cut.read_bytes()).size == (120, 80)
    with pytest.raises(ImageLoadError, match=r"empty\.png: its size cannot be read"):
        (tmp_path / "empty.png").write_bytes(b"")
        shown_size(tmp_path / "empty.png")


@pytest.mark.parametrize("after_image_data", [False, True])
@pytest.mark.parametrize("where", ["Raw profile type exif", "XMP"])
def test_a_pngs_turn_stated_in_a_text_chunk_is_read_as_decode_reads_it(where, after_image_data, tmp_path):
    """ImageMagick writes a PNG's EXIF as a "Raw profile type exif" text chunk, and XMP states
    tiff:Orientation: decode turns the image by either, and shown_size, which read only an eXIf
    chunk, gave the stored frame, so the detector's box check refused boxes drawn on the image."""
    import struct

    from PIL import PngImagePlugin

    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    info = PngImagePlugin.PngInfo()
    if where == "XMP":
        info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf='
                      '"http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff='
                      '"http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    else:
        raw = exif.tobytes()
        info.add_text("Raw profile type exif", f"\nexif\n{len(raw):8}\n{raw.hex()}\n", zip=True)
    path = tmp_path / "turned.png"
    _upright_xray().transpose(Image.Transpose.ROTATE_90).save(path, pnginfo=info)  # stored 80 x 120
    if after_image_data:
        data, chunks, at = path.read_bytes(), [], 8
        while at < len(data):
            length = struct.unpack(">I", data[at : at + 4])[0]
            chunks.append(data[at : at + 12 + length])
            at += 12 + length
        text = [c for c in chunks if c[4:8] in (b"zTXt", b"iTXt")]
        rest = [c for c in chunks if c not in text]
        path.write_bytes(data[:8] + b"".join(rest[:-1]) + b"".join(text) + rest[-1])
    assert decode(path.read_bytes()).size == (120, 80)
    assert shown_size(path) == (120, 80)


def test_a_copy_whose_turn_is_written_into_its_pixels_is_the_near_duplicate_of_one_that_only_states_it(tmp_path):
    xray = Image.fromarray(
        (np.random.default_rng(3).integers(0, 255, (12, 9)).repeat(16, 0).repeat(16, 1)).astype(np.uint8), mode="L"
    )
    _turned_by_exif(tmp_path / "stated.jpg", xray, 6)
    xray.save(tmp_path / "written.jpg", quality=95)
    a, b = thumbnail(tmp_path / "stated.jpg"), thumbnail(tmp_path / "written.jpg")
    assert float(a @ b) / len(a) > 0.99


def test_fracatlas_x_rays_stored_on_their_side_are_decoded_upright(fracatlas):
    """18 X-rays of FracAtlas are stored on their side with an EXIF orientation (6 or 8), such as
    the pelvis IMG0001753, and two upside down (3), such as the forearm IMG0002588, whose fracture
    boxes lie on its radius and ulna only once it is turned."""
    pelvis = fracatlas / "images" / "Non_fractured" / "IMG0001753.jpg"
    with Image.open(pelvis) as stored:
        assert stored.size == (373, 454)
    assert open_xray(pelvis).size == (454, 373)
    forearm = fracatlas / "images" / "Fractured" / "IMG0002588.jpg"
    with Image.open(forearm) as stored:
        raw = np.asarray(stored)
    np.testing.assert_array_equal(np.asarray(open_xray(forearm, rgb=False)), raw[::-1, ::-1])
