"""Grad-CAM heat maps that show which regions of an X-ray drove the classifier's score.

Captum's :class:`~captum.attr.LayerGradCam` computes the attribution on the network's last
convolutional feature map; this module only picks that layer, maps the coarse map back onto the
uploaded image (undoing the ``squash`` or ``pad`` resize of :func:`fracture.imaging.build_transform`)
and blends it over the X-ray. Where the score averages several forward passes (an ensemble's
members, an image and its mirror under ``tta: hflip``), the map averages theirs, each on the
uploaded image's own grid.
"""

from __future__ import annotations

import threading
import weakref
from copy import deepcopy

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from matplotlib import colormaps
from PIL import Image
from torch import nn

from fracture.ensemble import SeedEnsemble
from fracture.inference import check_tta, mirror
from fracture.vocabulary import Aspect, Tta, choices

# Captum registers hooks on the layer for the duration of one attribution. Attributions run on a
# copy of the network that nothing else scores with (another page session's predict on the shared
# network would fire the hooks and overwrite the saved activations), one attribution at a time.
_LOCK = threading.Lock()
_COPIES: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def _attribution_copy(model: nn.Module, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The model's private copy for attributions, holding its current weights, and ``layer`` in it."""
    copy = _COPIES.get(model)
    if copy is None:
        copy = _COPIES[model] = deepcopy(model).eval()
    else:
        copy.load_state_dict(model.state_dict())  # weights trained or loaded since the copy was made
    name = next(n for n, m in model.named_modules() if m is layer)
    return copy, copy.get_submodule(name)


def target_layer(model: nn.Module) -> nn.Module:
    """The module that produces the model's last convolutional feature map.

    For timm's EfficientNets that is ``bn2`` (the head convolution's batch norm and activation,
    whose output is what the classifier pools); other timm models fall back to the last stage
    named in their ``feature_info``.

    Args:
        model: a timm classification model.

    Returns:
        The layer whose output Grad-CAM explains.

    Raises:
        ValueError: the model exposes neither.
    """
    if isinstance(getattr(model, "conv_head", None), nn.Module) and isinstance(getattr(model, "bn2", None), nn.Module):
        return model.bn2
    feature_info = getattr(model, "feature_info", None)
    if feature_info:
        return model.get_submodule(feature_info[-1]["module"])
    raise ValueError(
        f"{type(model).__name__} has no conv_head/bn2 and no timm feature_info to take a Grad-CAM layer from"
    )


def grad_cam(
    model: nn.Module, batch: torch.Tensor, target: int, layer: nn.Module | None = None, tta: Tta = "none"
) -> np.ndarray:
    """Grad-CAM of one class for one preprocessed image, upsampled to the model's input size.

    Args:
        model: the classifier, in eval mode; for a :class:`~fracture.ensemble.SeedEnsemble` (and no
            ``layer``), the mean of its members' maps.
        batch: one preprocessed image, shape ``(1, C, H, W)``.
        target: the class index to explain (index into :data:`fracture.imaging.CLASSES`).
        layer: the layer to attribute to (default: :func:`target_layer`).
        tta: the test-time augmentation the model is scored with. ``hflip`` (the score is the mean
            of the image's and its mirror's): the mean of the image's map and its mirror's map,
            mirrored back onto the image, so the map explains both passes the score averages.

    Returns:
        An ``(H, W)`` float array in ``[0, 1]``; 1 marks the regions that raised the class
        score most. All zeros when no region raised it.

    Raises:
        ValueError: ``batch`` is not one image, or ``tta`` is not one of :data:`fracture.vocabulary.Tta`.
    """
    if batch.ndim != 4 or batch.shape[0] != 1:
        raise ValueError(f"grad_cam takes one image of shape (1, C, H, W), got {tuple(batch.shape)}")
    check_tta(tta)
    if tta == "hflip":
        # Each map peaks at 1 before the mean, as the ensemble's members' maps do: both passes weigh alike.
        seen, mirrored = grad_cam(model, batch, target, layer), grad_cam(model, mirror(batch), target, layer)
        return _peak_to_one((seen + mirrored[:, ::-1]) / 2)
    if isinstance(model, SeedEnsemble) and layer is None:
        # The members' own maps, averaged as their probabilities are: each explains its share of the score.
        return _peak_to_one(np.mean([grad_cam(member, batch, target) for member in model.members], axis=0))
    with _LOCK, torch.enable_grad():
        own, own_layer = _attribution_copy(model, layer or target_layer(model))
        cam = LayerGradCam(own, own_layer).attribute(
            batch, target=target, relu_attributions=True
        )
        cam = LayerAttribution.interpolate(cam.detach(), tuple(batch.shape[-2:]), interpolate_mode="bilinear")
    return _peak_to_one(cam[0, 0].clamp_min(0).numpy().astype(np.float64))


def _peak_to_one(cam: np.ndarray) -> np.ndarray:
    """``cam`` scaled so its peak is 1; all zeros when nothing is above 0."""
    peak = cam.max()
    return cam / peak if peak > 0 else np.zeros_like(cam)


def to_image_grid(cam: np.ndarray, size: tuple[int, int], aspect: Aspect = "squash") -> np.ndarray:
    """Maps a heat map at the model's input size back onto the original image's pixels.

    Args:
        cam: ``(H, W)`` heat map at the model's (square) input size.
        size: the original image's ``(width, height)``.
        aspect: how the image was fitted to the input: ``squash`` (resized to the square) or
            ``pad`` (padded with black to a square around its centre, then resized).

    Returns:
        A ``(height, width)`` float array in ``[0, 1]``.
    """
    width, height = size
    heat = Image.fromarray(cam.astype(np.float32))
    if aspect == "squash":
        return np.asarray(heat.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float64).clip(0, 1)
    if aspect != "pad":
        raise ValueError(f"aspect must be one of {choices(Aspect)}, got {aspect!r}")
    side = max(width, height)
    # Same placement as PIL.ImageOps.pad with centering (0.5, 0.5), which the transform used.
    left, top = round((side - width) * 0.5), round((side - height) * 0.5)
    square = heat.resize((side, side), Image.Resampling.BILINEAR)
    return np.asarray(square.crop((left, top, left + width, top + height)), dtype=np.float64).clip(0, 1)


#: The heat map's opacity where it is 1, and its colour map (:func:`overlay`, :func:`with_legend`).
HEAT_STRENGTH = 0.6
HEAT_CMAP = "inferno"
#: Text drawn on an image the page shows is this share of the image's width high, and strokes
#: :data:`STROKE_PER_WIDTH` wide: the page fits an image's width to its column (about 430 px of a
#: 1400 px wide page's three), so a score or a legend reads at about 15 px there, and a box's stroke
#: about 3 px, whatever the X-ray's size or shape. Sized by the shorter side, a landscape X-ray's
#: labels came out about 5 px high on screen.
TEXT_PER_WIDTH = 1 / 28
STROKE_PER_WIDTH = 1 / 150


def text_size(width: int) -> int:
    """The height of text drawn on an image ``width`` pixels wide (:data:`TEXT_PER_WIDTH`), at least 10 px."""
    return max(10, round(width * TEXT_PER_WIDTH))


#: The words of the heat map's legend: what the colours are, and what they are not.
LEGEND_TITLE = "Where the model looked (Grad-CAM), not a diagnosis"
LEGEND_ENDS = ("low attention", "high attention")


def overlay(
    image: Image.Image, heat: np.ndarray, strength: float = HEAT_STRENGTH, cmap: str = HEAT_CMAP
) -> Image.Image:
    """Blends a heat map over an X-ray; cold regions leave the X-ray as it is.

    The colormap's lightness rises with the value (``inferno``: dark purple to pale yellow), so
    the hottest region is the brightest on a greyscale reading display and to a reader who does
    not tell red from green; ``jet``, the earlier one, was darkest at its peak.

    Args:
        image: the X-ray (any mode; shown in greyscale-as-RGB or RGB).
        heat: ``(height, width)`` values in ``[0, 1]`` at the image's size.
        strength: opacity of the colour where the heat map is 1.
        cmap: a matplotlib colormap name.

    Returns:
        An RGB image of the same size as ``image``.
    """
    base = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    if heat.shape != base.shape[:2]:
        raise ValueError(f"heat map {heat.shape} does not match image {base.shape[:2]} (height, width)")
    colour = colormaps[cmap](heat)[..., :3]
    alpha = (strength * heat)[..., None]
    return Image.fromarray(np.round((1 - alpha) * base * 255 + alpha * colour * 255).astype(np.uint8))


#: The smallest text of the legend (:func:`with_legend`), in the image's pixels, on an X-ray too narrow
#: for its title at the page's size.
MIN_LEGEND_TEXT = 6


def with_legend(overlaid: Image.Image, strength: float = HEAT_STRENGTH, cmap: str = HEAT_CMAP) -> Image.Image:
    """The heat map (:func:`overlay`) with its colour bar drawn under it, as one image.

    Without one a reader could not tell which end of the colours meant more: the bar runs from
    "low attention" to "high attention", each value in the colour the overlay gives it over a
    mid-grey X-ray, under the words :data:`LEGEND_TITLE` (what the map shows is where the network's
    score came from, not a finding). White on black, as an X-ray is read. Sizes are in proportion to
    the image's width, the side the page fits to its column, so the legend reads at one size on
    screen whatever the X-ray's size.

    Args:
        overlaid: the heat map over the X-ray, as :func:`overlay` drew it.
        strength: the opacity :func:`overlay` drew the colour with where the heat map is 1.
        cmap: the colour map it drew with.

    Returns:
        An RGB image as wide as ``overlaid``, with the legend in a black band below it.
    """
    from PIL import ImageDraw, ImageFont

    width = overlaid.width
    size = text_size(width)  # text and bar height, in the image's pixels
    low, high = LEGEND_ENDS
    while True:  # smaller on a narrow X-ray, down to 6 px, so the title and the two ends fit its width
        pad = max(2, size // 2)
        font = ImageFont.load_default(size=size)
        needs = max(font.getlength(LEGEND_TITLE), font.getlength(low) + font.getlength(high) + 2 * pad)
        if needs <= width - 2 * pad or size <= MIN_LEGEND_TEXT:
            break
        size -= 1
    band = Image.new("RGB", (width, 4 * pad + 3 * size), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    draw.text((pad, pad), LEGEND_TITLE, fill=(255, 255, 255), font=font)
    left, right, top = pad, max(pad + 1, width - pad), 2 * pad + size
    values = np.linspace(0, 1, right - left)
    alpha = (strength * values)[:, None]
    ramp = (1 - alpha) * 0.5 + alpha * colormaps[cmap](values)[:, :3]
    bar = np.round(np.broadcast_to(ramp * 255, (size, right - left, 3))).astype(np.uint8)
    band.paste(Image.fromarray(bar), (left, top))
    draw.text((left, top + size + pad), low, fill=(255, 255, 255), font=font)
    draw.text((right - draw.textlength(high, font=font), top + size + pad), high, fill=(255, 255, 255), font=font)
    shown = Image.new("RGB", (width, overlaid.height + band.height))
    shown.paste(overlaid.convert("RGB"), (0, 0))
    shown.paste(band, (0, overlaid.height))
    return shown


#: The detector's boxes are drawn in this colour (X-rays are grey; it stands out beside the heat map's
#: colours), edged in :data:`BOX_EDGE` so that it stands out from bright bone too.
BOX_COLOUR = (0, 255, 64)
BOX_EDGE = (0, 0, 0)


def draw_boxes(image: Image.Image, boxes: np.ndarray, scale: float | tuple[float, float] = 1.0) -> Image.Image:
    """Draws the detector's boxes with their scores on an X-ray.

    Args:
        image: the X-ray as shown (any mode).
        boxes: ``(n, 5)`` rows of ``x0, y0, x1, y1, score`` in the original image's pixels.
        scale: the shown image's size over the original's (boxes are scaled by it): one for both
            axes, or ``(x, y)``, as a thumbnail's sides are rounded apart.

    Returns:
        An RGB copy of ``image`` with each box outlined and its score written above it.
    """
    from PIL import ImageDraw, ImageFont

    shown = image.convert("RGB")
    draw = ImageDraw.Draw(shown)
    # In proportion to the width, the side the page fits to its column (TEXT_PER_WIDTH).
    width = max(2, round(shown.width * STROKE_PER_WIDTH))
    edge = max(1, width // 3)
    font = ImageFont.load_default(size=text_size(shown.width))
    sx, sy = scale if isinstance(scale, tuple) else (scale, scale)
    for x0, y0, x1, y1, score in np.asarray(boxes, dtype=np.float64).reshape(-1, 5):
        box = [x0 * sx, y0 * sy, x1 * sx, y1 * sy]
        # A dark edge each side of the stroke, a third of its width: green on bone alone is 1.1-1.9:1.
        draw.rectangle([box[0] - edge, box[1] - edge, box[2] + edge, box[3] + edge], outline=BOX_EDGE,
                       width=width + 2 * edge)
        draw.rectangle(box, outline=BOX_COLOUR, width=width)
        text = f"{score:.2f}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), text, font=font)
        y = box[1] - (bottom - top) - 2 * width if box[1] - (bottom - top) - 2 * width >= 0 else box[3] + width
        draw.rectangle([box[0], y, box[0] + (right - left) + 2 * width, y + (bottom - top) + 2 * width], fill=BOX_COLOUR)
        draw.text((box[0] + width, y + width - (top - box[1])), text, fill=(0, 0, 0), font=font)
    return shown
