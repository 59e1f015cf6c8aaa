"""Image loading and preprocessing shared by training, evaluation and the served model.

This module imports only third-party packages, so the logged MLflow model can carry it and
preprocess an X-ray exactly as training did.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from timm.data import create_transform
from timm.data.transforms import MaybeToTensor
from torchvision import transforms

from fracture.dicom import dicom_to_image, is_dicom
from fracture.vocabulary import CLASSES, ENHANCEMENTS, Aspect, Enhancement

__all__ = ["CLASSES", "ENHANCEMENTS", "DataConfig", "ImageLoadError", "Preprocessor", "build_transform", "open_xray"]


@dataclass(frozen=True)
class DataConfig:
    """How an image becomes the model's input: timm's data config plus aspect and enhancement.

    Every key is always present, so no consumer guesses a default. Training writes it into
    ``model.json``; evaluation, the prepared cache, the served model and the page read it back.

    Attributes:
        input_size: (channels, height, width) of the model's input.
        interpolation: the resize filter timm names (``bicubic``, ``bilinear``, ...).
        mean: per-channel mean the pixels are normalised with.
        std: per-channel standard deviation.
        aspect: ``squash`` (resize to the square, the paper) or ``pad`` (pad to a square first).
        enhance: ``none`` (the paper) or one of the ablation's enhancements.
    """

    input_size: tuple[int, int, int]
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    aspect: Aspect = "squash"
    enhance: Enhancement = "none"

    def __post_init__(self) -> None:
        if self.aspect not in get_args(Aspect):
            raise ValueError(f"data config aspect must be one of {get_args(Aspect)}, got {self.aspect!r}")
        if self.enhance not in ENHANCEMENTS:
            raise ValueError(f"data config enhance must be one of {ENHANCEMENTS}, got {self.enhance!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataConfig:
        """Reads the ``data_config`` of a ``model.json``.

        ``aspect`` and ``enhance`` may be absent: models registered before those settings
        existed were all squashed and not enhanced, which is what their defaults say.

        Raises:
            ValueError: a timm key is missing or a value is not allowed.
        """
        missing = [k for k in ("input_size", "interpolation", "mean", "std") if k not in data]
        if missing:
            raise ValueError(f"data config lacks {missing}; it holds {sorted(data)}: retrain, or fix model.json")
        return cls(
            input_size=tuple(int(v) for v in data["input_size"]),  # type: ignore[arg-type]
            interpolation=str(data["interpolation"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            aspect=data.get("aspect", "squash"),
            enhance=data.get("enhance", "none"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as ``model.json`` stores it (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


_TRUNCATED_LOCK = threading.Lock()


class ImageLoadError(ValueError):
    """An input could not be read as an X-ray image."""


def open_xray(source: str | Path | bytes, allow_truncated: bool = False, rgb: bool = True) -> Image.Image:
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

    Returns:
        The decoded image in RGB mode, or L when ``rgb`` is false and the file is greyscale.

    Raises:
        ImageLoadError: the input is not a decodable image.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        return _model_mode(decode(source), rgb)
    except FileNotFoundError as exc:
        raise ImageLoadError(f"{name}: file not found") from exc
    except OSError as exc:
        if not (allow_truncated and "truncated" in str(exc)):
            raise ImageLoadError(f"{name}: not a decodable image ({exc})") from exc
    except (SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"{name}: not a decodable image ({exc})") from exc
    try:
        return _model_mode(decode_truncated(source), rgb)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"{name}: not a decodable image ({exc})") from exc


def _model_mode(img: Image.Image, rgb: bool) -> Image.Image:
    return img if img.mode == "RGB" or (img.mode == "L" and not rgb) else img.convert("RGB")


#: Files in an export that index the others rather than hold an image (a DICOM export's DICOMDIR).
INDEX_FILES = {"DICOMDIR"}


def export_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` (sub-folders too), sorted; hidden files and folders and index files aside.

    How a folder of X-rays is listed wherever one is read: a hospital's export
    (:mod:`fracture.manifest`) and the folders ``fracture predict`` scores.
    """
    return [
        p for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in INDEX_FILES and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]


def decode(source: str | Path | bytes) -> Image.Image:
    """Opens and fully decodes an image as stored (mode and size unchanged).

    A DICOM file becomes the 8-bit image a reader sees (:func:`fracture.dicom.dicom_to_image`:
    modality LUT, VOI transform, MONOCHROME1 inverted), so a dataset of DICOM files trains on
    the pixels the served model scores.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if is_dicom(data):
        return dicom_to_image(data)
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img


def decode_truncated(source: str | Path | bytes) -> Image.Image:
    """Like :func:`decode`, but decodes files that end early; the missing rows become grey.

    Pillow allows truncated files only through a module flag: it is set for this decode alone,
    under a lock so that concurrent loader threads cannot leave it set.
    """
    with _TRUNCATED_LOCK:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            return decode(source)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


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

    Images are decoded and resized once (``resize``, PIL to uint8) and normalised per batch
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

    def load(self, paths: Sequence[Path], allow_truncated: bool, workers: int) -> torch.Tensor:
        """Decodes and resizes images into one uint8 NCHW tensor (channels-last in memory, see :func:`nchw`)."""

        def one(path: Path) -> np.ndarray:
            return np.asarray(self.resize(open_xray(path, allow_truncated=allow_truncated, rgb=False)))

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            arrays = list(pool.map(one, paths))
        return nchw(np.stack(arrays))

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.normalize(batch.float().div_(255))
