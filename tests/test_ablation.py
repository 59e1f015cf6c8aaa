"""The paper's preprocessing ablation: OpenCV and SimpleITK enhancements, a random central crop."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from fracture.config import ConfigError, load_params, parse_params
from fracture.data_config import DataConfig
from fracture.decoding import open_xray
from fracture.imaging import ENHANCEMENTS, Enhance, Preprocessor, build_transform
from fracture.model import profile_data_config
from fracture.prepare import cache_key, open_prepared, prepare_images
from fracture.training import RandomCentralCrop, augmentation
from tests.conftest import FRACATLAS, REPO, require_fracatlas
from tests.synthetic import make_dataset, training_frame

CONFIG = DataConfig((3, 64, 64), "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), aspect="squash")


def _xray() -> Image.Image:
    require_fracatlas()
    return open_xray(next((FRACATLAS / "images" / "Fractured").iterdir()))


@pytest.mark.parametrize("mode", ENHANCEMENTS[1:])
def test_each_enhancement_is_opencvs_on_the_resized_greyscale_image(mode):
    resized = build_transform(CONFIG).transforms[0](_xray())
    grey = np.asarray(resized.convert("L"))
    expected = {
        "clahe": lambda: cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(grey),
        "anisotropic_diffusion": lambda: np.clip(np.rint(sitk.GetArrayFromImage(sitk.GradientAnisotropicDiffusion(
            sitk.GetImageFromArray(grey.astype(np.float32)), timeStep=0.125, conductanceParameter=1.0,
            numberOfIterations=10))), 0, 255).astype(np.uint8),
        "canny": lambda: cv2.Canny(grey, 50, 150),
    }[mode]()
    out = np.asarray(Enhance(mode)(resized))
    assert out.shape == (64, 64, 3)
    assert all(np.array_equal(out[..., c], expected) for c in range(3))
    assert not np.array_equal(out[..., 0], grey)  # it did change the image
    if mode == "canny":
        assert set(np.unique(out)) <= {0, 255}


def test_enhanced_cache_pixels_equal_the_served_transform(tmp_path):
    make_dataset(tmp_path, 2, 2)
    frame = training_frame(tmp_path)
    config = dataclasses.replace(CONFIG, enhance="clahe")
    key = cache_key(config, True)
    prepare_images(frame, tmp_path, Preprocessor(config), True, tmp_path / "cache", workers=1)
    cached = Preprocessor(config)(open_prepared(tmp_path / "cache", key).dataset(frame).tensors[0])
    served = torch.stack([build_transform(config)(open_xray(tmp_path / p)) for p in frame["path"]])
    assert torch.allclose(cached, served, atol=1e-6)
    plain = torch.stack([build_transform(CONFIG)(open_xray(tmp_path / p)) for p in frame["path"]])
    assert not torch.allclose(served, plain)


def test_profile_data_config_carries_the_enhancement():
    params = load_params(REPO)
    config = profile_data_config(params.profiles["cpu"], "squash", "anisotropic_diffusion")
    assert config.enhance == "anisotropic_diffusion"
    assert cache_key(config, True)["enhance"] == "anisotropic_diffusion"
    assert "Enhance('anisotropic_diffusion')" in repr(build_transform(config))
    assert "Enhance" not in repr(build_transform(profile_data_config(params.profiles["cpu"])))


def test_unknown_enhancement_or_augmentation_is_a_clear_params_error():
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["prepare"]["enhance"] = "sharpen"
    with pytest.raises(ConfigError, match="prepare.enhance must be one of 'none', 'clahe', 'anisotropic_diffusion', 'canny'; got 'sharpen'"):
        parse_params(raw)
    raw["prepare"]["enhance"] = "none"
    raw["profiles"]["cpu"]["augment"] = "crop"
    with pytest.raises(ConfigError, match="profiles.cpu.augment must be one of 'none', 'light', 'central_crop'; got 'crop'"):
        parse_params(raw)


def test_random_central_crop_keeps_the_centre_and_the_size():
    torch.manual_seed(0)
    # A frame of 255 around a 0 interior: any crop of at least half of each side removes it.
    image = torch.zeros((3, 40, 60), dtype=torch.uint8)
    image[:, :4, :] = image[:, -4:, :] = image[:, :, :4] = image[:, :, -4:] = 255
    crop = RandomCentralCrop(min_scale=0.5)
    outs = [crop(image) for _ in range(20)]
    assert all(o.shape == image.shape and o.dtype == torch.uint8 for o in outs)
    assert all(o[:, 18:22, 28:32].max() == 0 for o in outs)  # the centre stays the centre
    assert any(o[:, 0, 30].max() < 128 for o in outs)  # the frame was cut off at least once
    assert len({o.sum().item() for o in outs}) > 1  # the share is drawn per image
    assert isinstance(augmentation("central_crop"), RandomCentralCrop) and augmentation("none") is None
