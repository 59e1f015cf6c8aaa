"""Does the heat map point at the fracture? Grad-CAM scored against FracAtlas's fracture boxes.

FracAtlas ships a box (and a mask) around every fracture of its fractured images, as COCO JSON.
On the test split's fractured images with boxes, the evaluate stage measures the heat map the
page shows (:func:`fracture.explain.grad_cam` for the fractured class, mapped back onto the
image by :func:`fracture.explain.to_image_grid`) in two ways:

- the **pointing game** (Zhang et al., 2016): the share of images whose heat-map maximum falls
  inside a fracture box;
- the **mass inside the boxes**: the share of the heat map's total that lies inside them.

Both are compared with a **centre baseline** that knows nothing of the image: the image centre
as the point, and a Gaussian centred on the image (standard deviation a quarter of each side) as
the map. The uniform map's mass inside the boxes is their share of the image area, the chance
level of the second measure. Everything is measured in the original image's pixels.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["COLUMNS", "BoxesError", "ImageBoxes", "Localisation", "centre_map", "mass_inside", "read_coco_boxes", "score_heat_maps"]

log = logging.getLogger(__name__)


#: The per-image table's columns (``outputs/evaluate/localisation.csv``).
COLUMNS = ("image_id", "boxes", "hit", "mass", "centre_hit", "centre_mass", "box_share", "empty_map")


class BoxesError(ValueError):
    """The fracture boxes cannot be read or do not fit their images."""


@dataclass(frozen=True)
class ImageBoxes:
    """The fracture boxes of one image, in its pixels.

    Attributes:
        size: the image's ``(width, height)`` as the annotation file states it.
        boxes: ``(n, 4)`` array of ``x0, y0, x1, y1`` (continuous pixel coordinates; pixel ``(i, j)``
            covers ``j..j+1`` across and ``i..i+1`` down).
    """

    size: tuple[int, int]
    boxes: np.ndarray

    def mask(self) -> np.ndarray:
        """``(height, width)`` bool: pixels whose centre lies in at least one box."""
        width, height = self.size
        xs, ys = np.arange(width) + 0.5, np.arange(height) + 0.5
        inside = np.zeros((height, width), dtype=bool)
        for x0, y0, x1, y1 in self.boxes:
            inside |= ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
        return inside


#: Category names a box file's fracture category may have, lower case (FracAtlas: ``fractured``).
FRACTURE_CATEGORIES = ("fracture", "fractured", "fractures")


def _fracture_category(path: Path, categories: list[dict]) -> int | None:
    """The id of the box file's fracture category; None for a file that lists no categories (all
    of its annotations are fractures)."""
    if not categories:
        return None
    if len(categories) == 1:  # FracAtlas: one category, {"id": 0, "name": "fractured"}
        return int(categories[0]["id"])
    named = [c for c in categories if str(c.get("name", "")).strip().lower() in FRACTURE_CATEGORIES]
    if len(named) != 1:
        listed = ", ".join(f"{c.get('name')!r} (id {c['id']})" for c in categories)
        raise BoxesError(
            f"{path}: {len(categories)} categories ({listed}) and {len(named)} of them named a fracture "
            f"({' or '.join(FRACTURE_CATEGORIES)}): name exactly one category so, or keep only the fracture "
            "boxes in the file"
        )
    return int(named[0]["id"])


def read_coco_boxes(path: Path) -> dict[str, ImageBoxes]:
    """The fracture boxes of a COCO JSON annotation file, by image file name.

    A file with one category (FracAtlas's ``fractured``), or none listed, holds fracture boxes
    only; of a file with several, the boxes of the category named ``fracture`` (or ``fractured``,
    ``fractures``) are read and the others' are left out, counted in a warning. A crowd annotation
    (``iscrowd`` 1: one region around several objects, no box of its own) is refused.

    Args:
        path: the file (FracAtlas: ``Annotations/COCO JSON/COCO_fracture_masks.json``).

    Returns:
        ``file name -> ImageBoxes`` for every image with at least one fracture box.

    Raises:
        BoxesError: the file is missing or not COCO JSON, its fracture category cannot be told, an
            annotation is a crowd's, or a box lies outside its image.
    """
    if not path.is_file():
        raise BoxesError(
            f"{path}: fracture boxes not found. FracAtlas ships them there (Annotations/COCO JSON); set "
            "evaluate.boxes to null for a dataset without boxes"
        )
    try:
        coco = json.loads(path.read_text())
        images = {int(im["id"]): (str(im["file_name"]), (int(im["width"]), int(im["height"]))) for im in coco["images"]}
        categories = list(coco.get("categories") or [])
        names = {int(c["id"]): str(c.get("name", "")) for c in categories}
        fracture = _fracture_category(path, categories)
        by_image: dict[int, list[list[float]]] = {}
        others: dict[str, int] = {}
        for ann in coco["annotations"]:
            if fracture is not None:
                category = int(ann["category_id"])
                if category not in names:
                    raise BoxesError(f"{path}: annotation {ann.get('id')} names category id {category}, which the "
                                     f"file's categories do not list ({sorted(names)})")
                if category != fracture:
                    others[names[category]] = others.get(names[category], 0) + 1
                    continue
            if int(ann.get("iscrowd", 0)):
                name = images.get(int(ann["image_id"]), (f"image id {ann['image_id']}",))[0]
                raise BoxesError(
                    f"{path}: annotation {ann.get('id')} of {name} is a crowd region (iscrowd 1), not one fracture's "
                    "box: draw a box around each fracture instead, or remove it"
                )
            by_image.setdefault(int(ann["image_id"]), []).append([float(v) for v in ann["bbox"]])
    except BoxesError:
        raise
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise BoxesError(f"{path}: not a COCO JSON annotation file ({type(exc).__name__}: {exc})") from exc
    if others:
        assert fracture is not None  # only a file with categories has others
        log.warning("%s: %d annotations of other categories than %r left out (%s); only fracture boxes are read",
                    path, sum(others.values()), names[fracture], ", ".join(f"{name}: {n}" for name, n in sorted(others.items())))
    out: dict[str, ImageBoxes] = {}
    for image_id, raw in by_image.items():
        if image_id not in images:
            raise BoxesError(f"{path}: an annotation names image id {image_id}, which the file does not list")
        name, (width, height) = images[image_id]
        xywh = np.asarray(raw, dtype=np.float64)
        boxes = np.column_stack([xywh[:, 0], xywh[:, 1], xywh[:, 0] + xywh[:, 2], xywh[:, 1] + xywh[:, 3]])
        slack = 1.0  # annotation tools round to the pixel
        if (boxes[:, :2] < -slack).any() or (boxes[:, 2] > width + slack).any() or (boxes[:, 3] > height + slack).any():
            raise BoxesError(f"{path}: a box of {name} lies outside its {width} x {height} image: {raw}")
        out[name] = ImageBoxes((width, height), boxes)
    return out


def centre_map(size: tuple[int, int]) -> np.ndarray:
    """The centre baseline's heat map: a Gaussian on the image centre, sd a quarter of each side."""
    width, height = size
    ys = (np.arange(height) + 0.5 - height / 2) / (height / 4)
    xs = (np.arange(width) + 0.5 - width / 2) / (width / 4)
    return np.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))


def mass_inside(heat: np.ndarray, inside: np.ndarray) -> float:
    """Share of the heat map's total inside the mask (0 for a map that is zero everywhere)."""
    total = float(heat.sum())
    return float(heat[inside].sum()) / total if total > 0 else 0.0


def _points_at(heat: np.ndarray, inside: np.ndarray) -> bool:
    """The map's maximum lies in the mask (a map that is zero everywhere points nowhere)."""
    if not heat.max() > 0:
        return False
    return bool(inside.flat[int(np.argmax(heat))])


@dataclass(frozen=True)
class Localisation:
    """The pointing game and the mass inside the boxes over a set of images.

    Attributes:
        per_image: one row per image: ``image_id``, ``boxes``, ``hit``, ``mass``, ``centre_hit``,
            ``centre_mass``, ``box_share`` (the boxes' share of the image area), ``empty_map``.
        metrics: the means with 95% bootstrap intervals over images, linked ones drawn together
            (``*_ci_low``, ``*_ci_high``), the map's paired difference from the centre baseline on the same
            images (``*_vs_centre``, with their intervals), and the number of images.
    """

    per_image: pd.DataFrame
    metrics: dict[str, float]


def score_heat_maps(
    items: Iterable[tuple[str, ImageBoxes]],
    heat_map: Callable[[str, ImageBoxes], np.ndarray],
    n_resamples: int = 1000,
    seed: int = 0,
    groups: Mapping[str, str] | None = None,
) -> Localisation:
    """Plays the pointing game and measures the mass inside the boxes, with the centre baseline.

    Args:
        items: ``(image_id, boxes)`` of the images to score.
        heat_map: ``(image_id, boxes) -> (height, width)`` non-negative heat map at the size
            ``boxes.size`` states.
        n_resamples: bootstrap resamples for the intervals.
        seed: seeds the bootstrap.
        groups: each image's group of linked images (the split's ``group``: copies, near-duplicates,
            one patient's), whole groups drawn together (:func:`fracture.evaluation.group_resamples`),
            so that two copies of one X-ray count as one piece of evidence, as in the evaluate
            stage's other intervals; ``None`` (or an image it does not name): each image its own.

    Raises:
        BoxesError: a heat map does not have its image's size.
    """
    rows = []
    for image_id, boxes in items:
        heat = heat_map(image_id, boxes)
        width, height = boxes.size
        if heat.shape != (height, width):
            raise BoxesError(
                f"{image_id}: the heat map is {heat.shape[1]} x {heat.shape[0]} px but its boxes are for "
                f"{width} x {height}: the annotation file and the image disagree on the size"
            )
        inside = boxes.mask()
        centre = centre_map(boxes.size)
        rows.append({
            "image_id": image_id,
            "boxes": len(boxes.boxes),
            "hit": _points_at(heat, inside),
            "mass": mass_inside(heat, inside),
            "centre_hit": bool(inside[height // 2, width // 2]),
            "centre_mass": mass_inside(centre, inside),
            "box_share": float(inside.mean()),
            "empty_map": not heat.max() > 0,
        })
    per_image = pd.DataFrame(rows, columns=list(COLUMNS))
    names = {"pointing_game": "hit", "pointing_game_centre": "centre_hit", "heat_mass_in_boxes": "mass",
             "heat_mass_in_boxes_centre": "centre_mass"}
    metrics: dict[str, float] = {"localised_images": float(len(per_image))}
    if per_image.empty:
        return Localisation(per_image, metrics)
    values = {name: per_image[column].to_numpy(dtype=np.float64) for name, column in names.items()}
    from fracture.evaluation import group_resamples  # noqa: PLC0415 - scikit-learn loads slowly

    keys = [(groups or {}).get(image_id, image_id) for image_id in per_image["image_id"]]
    # Every image here is fractured: one stratum, all groups drawn from it.
    draws = list(group_resamples(np.ones(len(per_image), dtype=int), np.asarray(keys, dtype=object), n_resamples, seed))
    # The map against the centre baseline on the same images and the same draws: a paired
    # difference, whose interval is narrower than the two separate ones when they go together.
    values["pointing_game_vs_centre"] = values["pointing_game"] - values["pointing_game_centre"]
    values["heat_mass_in_boxes_vs_centre"] = values["heat_mass_in_boxes"] - values["heat_mass_in_boxes_centre"]
    for name, v in values.items():
        means = np.array([v[rows].mean() for rows in draws])
        metrics[name] = float(v.mean())
        metrics[f"{name}_ci_low"] = float(np.percentile(means, 2.5))
        metrics[f"{name}_ci_high"] = float(np.percentile(means, 97.5))
    metrics["box_area_share"] = float(per_image["box_share"].mean())
    metrics["empty_heat_maps"] = float(per_image["empty_map"].sum())
    return Localisation(per_image, metrics)
