"""The model's preprocessing shared by training, evaluation and the served model.

This module imports only third-party packages, so the logged MLflow model can carry it and
preprocess an X-ray exactly as training did.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.transforms import MaybeToTensor
from torchvision import transforms

from fracture.data_config import DataConfig
from fracture.decoding import open_xray
from fracture.vocabulary import CLASSES, ENHANCEMENTS

__all__ = ["CLASSES", "ENHANCEMENTS", "Enhance", "PadToSquare", "Preprocessor", "ToRGB", "build_transform", "nchw"]


class PadToSquare:
    """Pads an image with black to a square around its centre, keeping its aspect ratio.

    X-ray backgrounds are black, so the padding looks like more background; no pixel is
    resampled here, the resize that follows is the only interpolation.
    """

    def __call__(self, img: Image.Image) -> Image.Image:
        side = max(img.size)
        return ImageOps.pad(img, (side, side), color=0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ToRGB:
    """Makes a greyscale image RGB (three equal channels); RGB passes unchanged.

    It runs after the resize: resizing the one grey channel and then copying it gives exactly
    the pixels of resizing three equal channels (each channel is resampled on its own with the
    same weights), for a third of the work on greyscale X-rays.
    """

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Enhance:
    """One of the paper's ablation enhancements, on the resized X-ray, with OpenCV.

    Each works on the greyscale image and returns it as three equal channels, as the
    ImageNet stem expects:

    - ``clahe``: contrast-limited adaptive histogram equalisation (clip limit 2, 8x8 tiles,
      OpenCV's defaults);
    - ``anisotropic_diffusion``: Perona-Malik gradient anisotropic diffusion with SimpleITK
      (10 iterations, time step 0.125, conductance 1 relative to the mean gradient), which
      smooths noise but keeps bone edges (OpenCV's ``ximgproc`` version is not
      deterministic, so it is not used);
    - ``canny``: the Canny edge map (hysteresis thresholds 50 and 150) in place of the image.

    It runs after the resize, on the model's input size, so the cost does not grow with the
    original image's resolution; the served model applies it the same way.
    """

    def __init__(self, mode: str) -> None:
        if mode not in ENHANCEMENTS[1:]:
            raise ValueError(f"enhance must be one of {', '.join(ENHANCEMENTS)}, got {mode!r}")
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        # Imported here: only models trained with an enhancement need OpenCV or SimpleITK.
        grey = np.asarray(img.convert("L"))
        if self.mode == "anisotropic_diffusion":
            import SimpleITK as sitk

            smoothed = sitk.GradientAnisotropicDiffusion(
                sitk.GetImageFromArray(grey.astype(np.float32)),
                timeStep=0.125,
                conductanceParameter=1.0,
                numberOfIterations=10,
            )
            out = np.clip(np.rint(sitk.GetArrayFromImage(smoothed)), 0, 255).astype(np.uint8)
        else:
            import cv2

            if self.mode == "clahe":
                out = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(grey)
            else:
                out = cv2.Canny(grey, 50, 150)
        return Image.fromarray(np.ascontiguousarray(out), mode="L").convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode!r})"


def build_transform(config: DataConfig) -> transforms.Compose:
    """timm's evaluation transform, resizing the whole image to the input size without cropping.

    The paper resizes and normalises only: a centre crop would cut fractures at the image
    corners out of view, so ``crop_mode='squash'`` with ``crop_pct=1`` resizes straight to
    the model's input size. With ``aspect: pad`` the image is first padded to a square, so
    bones keep their proportions.

    With ``enhance`` other than ``none``, the resized image is enhanced (:class:`Enhance`)
    before it becomes a tensor. A greyscale image becomes RGB after the resize (:class:`ToRGB`).

    Args:
        config: the model's data config.

    Returns:
        A transform mapping a PIL image (RGB or L) to a normalised CHW float tensor.
    """
    transform = create_transform(
        input_size=config.input_size,
        is_training=False,
        interpolation=config.interpolation,
        mean=config.mean,
        std=config.std,
        crop_pct=1.0,
        crop_mode="squash",
    )
    if config.aspect == "pad":
        transform.transforms.insert(0, PadToSquare())
    if config.enhance != "none":
        transform.transforms.insert(len(transform.transforms) - 2, Enhance(config.enhance))
    transform.transforms.insert(len(transform.transforms) - 2, ToRGB())
    return transform


def nchw(pixels: np.ndarray) -> torch.Tensor:
    """Decoded images (N, H, W, C) as an NCHW tensor without copying them.

    The tensor keeps the pixels in their decoded order, which is PyTorch's channels-last
    memory format: the layout the network runs in (``torch.channels_last``), so neither a
    transposing copy here nor one before the forward pass is needed.
    """
    return torch.from_numpy(pixels).permute(0, 3, 1, 2)


class Preprocessor:
    """timm's evaluation transform, split at the tensor boundary.

    Images are decoded (``open``) and resized once (``resize``, PIL to uint8) and normalised per batch
    (``normalize``), which computes exactly what the full transform in
    :func:`build_transform` computes for the served model.
    """

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        steps = build_transform(config).transforms
        if not (isinstance(steps[-2], MaybeToTensor) and isinstance(steps[-1], transforms.Normalize)):
            raise RuntimeError(f"unexpected timm transform layout: {steps}")
        self.resize = transforms.Compose(steps[:-2])
        self.normalize = steps[-1]

    def open(self, source: str | Path | bytes, allow_truncated: bool) -> Image.Image:
        """Decodes an X-ray as this model's inputs are decoded (greyscale stays greyscale; JPEGs
        at a reduced scale when the data config's ``decode`` is ``draft``), not yet resized."""
        return open_xray(source, allow_truncated=allow_truncated, rgb=False, draft=self.config.draft_size)

    def load(self, paths: Sequence[Path], allow_truncated: bool, workers: int) -> torch.Tensor:
        """Decodes and resizes images into one uint8 NCHW tensor (channels-last in memory, see :func:`nchw`)."""

        def one(path: Path) -> np.ndarray:
            return np.asarray(self.resize(self.open(path, allow_truncated)))

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            arrays = list(pool.map(one, paths))
        return nchw(np.stack(arrays))

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.normalize(batch.float().div_(255))

    def network_input(self, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A uint8 NCHW batch moved to ``device``, normalised and laid out channels-last, as the network runs."""
        return self(batch.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
