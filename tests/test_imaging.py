"""Preprocessing: resize without crop, identical in training and serving; clear load errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fracture.data_config import DataConfig
from fracture.decoding import ImageLoadError, open_xray
from fracture.imaging import Preprocessor, build_transform
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


def test_truncated_file_fails_unless_allowed(tmp_path):
    path = tmp_path / "t.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(ImageLoadError, match="t.jpg"):
        open_xray(path)
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
