"""The heat map's pointing game against fracture boxes: box reading, hand-made maps, the model card."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fracture.localisation import (
    BoxesError,
    ImageBoxes,
    centre_map,
    mass_inside,
    read_coco_boxes,
    score_heat_maps,
)
from fracture.model_card import _localisation_lines
from tests.conftest import COCO_BOXES, require_fracatlas

#: A 100 x 80 image with one box in its upper-left quarter (x 10..30, y 5..25).
CORNER = ImageBoxes((100, 80), np.array([[10.0, 5.0, 30.0, 25.0]]))


def peak_at(x: int, y: int, size: tuple[int, int] = (100, 80), sd: float = 4.0) -> np.ndarray:
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width]
    return np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sd**2))


def test_real_fracatlas_boxes_are_read_and_fit_their_images():
    root = require_fracatlas()
    boxes = read_coco_boxes(root / COCO_BOXES)
    fractured = {p.name for p in (root / "images" / "Fractured").iterdir()}
    assert set(boxes) <= fractured and len(boxes) > 0.9 * len(fractured)
    assert sum(len(b.boxes) for b in boxes.values()) > len(boxes)  # some images have several fractures
    from PIL import Image

    for name in sorted(boxes)[:25]:
        with Image.open(root / "images" / "Fractured" / name) as img:
            assert img.size == boxes[name].size, name  # scaled with the image where the copy was shrunk
        mask = boxes[name].mask()
        assert mask.shape == boxes[name].size[::-1] and 0 < mask.mean() < 0.5


def test_mask_covers_pixel_centres_inside_the_box():
    mask = CORNER.mask()
    assert mask.shape == (80, 100) and mask.sum() == 20 * 20
    assert mask[5, 10] and mask[24, 29] and not mask[25, 10] and not mask[4, 10]


def test_a_map_peaked_in_the_box_hits_and_one_elsewhere_misses():
    maps = {"in": peak_at(20, 15), "out": peak_at(80, 60), "flat": np.zeros((80, 100))}
    result = score_heat_maps(((k, CORNER) for k in maps), lambda image_id, _: maps[image_id], n_resamples=200)
    rows = result.per_image.set_index("image_id")
    assert rows.loc["in", "hit"] and not rows.loc["out", "hit"] and not rows.loc["flat", "hit"]
    assert rows.loc["in", "mass"] > 0.9 and rows.loc["out", "mass"] < 0.01 and rows.loc["flat", "mass"] == 0
    assert rows.loc["flat", "empty_map"] and not rows.loc["in", "empty_map"]
    m = result.metrics
    assert m["pointing_game"] == pytest.approx(1 / 3) and m["localised_images"] == 3 and m["empty_heat_maps"] == 1
    assert m["pointing_game_ci_low"] <= m["pointing_game"] <= m["pointing_game_ci_high"]
    assert m["box_area_share"] == pytest.approx(400 / 8000)
    # The centre (50, 40) lies outside the corner box; the centre Gaussian puts little mass there.
    assert m["pointing_game_centre"] == 0 and 0 < m["heat_mass_in_boxes_centre"] < m["box_area_share"]
    # The mass inside the box, summed by hand over its rows 5..24 and columns 10..29, per image and on average;
    # the centre's from a Gaussian with sd a quarter of each side; the map's lead over it, positive here.
    by_hand = {k: float(v[5:25, 10:30].sum() / v.sum()) if v.sum() else 0.0 for k, v in maps.items()}
    assert rows["mass"].to_dict() == pytest.approx(by_hand)
    ys, xs = (np.arange(80) + 0.5 - 40) / 20, (np.arange(100) + 0.5 - 50) / 25
    centre = np.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))
    centre_mass = float(centre[5:25, 10:30].sum() / centre.sum())
    assert m["heat_mass_in_boxes"] == pytest.approx(np.mean(list(by_hand.values())))
    assert m["heat_mass_in_boxes_centre"] == pytest.approx(centre_mass)
    assert m["heat_mass_in_boxes_vs_centre"] == pytest.approx(np.mean(list(by_hand.values())) - centre_mass)
    assert m["heat_mass_in_boxes_ci_low"] <= m["heat_mass_in_boxes"] <= m["heat_mass_in_boxes_ci_high"]
    assert m["heat_mass_in_boxes_vs_centre_ci_low"] < m["heat_mass_in_boxes_vs_centre_ci_high"]


def test_the_centre_baseline_hits_a_central_box():
    central = ImageBoxes((100, 80), np.array([[40.0, 30.0, 60.0, 50.0]]))
    result = score_heat_maps([("c", central)], lambda *_: peak_at(20, 15))
    assert result.metrics["pointing_game_centre"] == 1 and result.metrics["pointing_game"] == 0
    gaussian = centre_map((100, 80))
    assert np.unravel_index(np.argmax(gaussian), gaussian.shape) in {(39, 49), (39, 50), (40, 49), (40, 50)}
    assert mass_inside(gaussian, central.mask()) > central.mask().mean()


def test_a_heat_map_of_another_size_is_refused_by_name():
    with pytest.raises(BoxesError, match=r"IMG1\.jpg: the heat map is 50 x 40 px but its boxes are for 100 x 80"):
        score_heat_maps([("IMG1.jpg", CORNER)], lambda *_: np.ones((40, 50)))


def test_box_file_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(BoxesError, match="evaluate.boxes to null"):
        read_coco_boxes(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 1, "width": 10, "height": 10, "file_name": "a.jpg"}],
                               "annotations": [{"image_id": 1, "bbox": [5, 5, 20, 3]}]}))
    with pytest.raises(BoxesError, match=r"a box of a\.jpg lies outside its 10 x 10 image"):
        read_coco_boxes(bad)
    bad.write_text("{}")
    with pytest.raises(BoxesError, match="not a COCO JSON annotation file"):
        read_coco_boxes(bad)


def test_the_map_is_compared_with_the_centre_image_by_image():
    """On the same images, a map that hits wherever the centre hits, and on a few more, is
    better by a paired interval that excludes 0, though the two separate intervals overlap."""
    central = ImageBoxes((100, 80), np.array([[40.0, 30.0, 60.0, 50.0]]))
    items = [(f"c{k}", central) for k in range(15)] + [(f"e{k}", CORNER) for k in range(35)]
    heat = {f"c{k}": peak_at(50, 40) for k in range(15)} | {f"e{k}": peak_at(20, 15) if k < 5 else peak_at(80, 60)
                                                              for k in range(35)}
    m = score_heat_maps(items, lambda image_id, _: heat[image_id], n_resamples=500).metrics
    assert m["pointing_game"] == pytest.approx(0.4) and m["pointing_game_centre"] == pytest.approx(0.3)
    assert m["pointing_game_ci_low"] < m["pointing_game_centre"]  # the separate interval holds the baseline
    assert m["pointing_game_vs_centre"] == pytest.approx(0.1) and m["pointing_game_vs_centre_ci_low"] > 0
    assert "so the map points better than the image centre" in "\n".join(_localisation_lines(m))


def test_linked_copies_count_once_in_the_pointing_games_interval():
    """Copies of one X-ray kept together in the test split are one piece of evidence: the pointing
    game's interval was drawn over single images, so 40 films stored twice came out narrower than
    the 40 films alone, unlike every other interval of the evaluate stage. Drawn by group, it is
    the films' own width."""
    hits = [k % 20 < 13 for k in range(40)]  # 26 of 40 films hit
    heat = {f"f{k}": peak_at(20, 15) if hit else peak_at(80, 60) for k, hit in enumerate(hits)}

    def width(items, groups=None):
        m = score_heat_maps(items, lambda image_id, _: heat[image_id.split("/")[0]], n_resamples=2000, groups=groups)
        assert m.metrics["pointing_game"] == pytest.approx(0.65)
        return m.metrics["pointing_game_ci_high"] - m.metrics["pointing_game_ci_low"]

    films = [(f"f{k}", CORNER) for k in range(40)]
    twice = [(f"f{k}/{copy}", CORNER) for k in range(40) for copy in ("a", "b")]
    alone, linked = width(films), width(twice, {image_id: image_id.split("/")[0] for image_id, _ in twice})
    assert 0.85 < linked / alone < 1.15, (linked, alone)
    assert width(twice) / alone < 0.85  # each copy counted as a film: too narrow


def test_model_card_says_whether_the_map_beats_the_centre():
    m = {"localised_images": 80, "pointing_game": 0.5, "pointing_game_ci_low": 0.4, "pointing_game_ci_high": 0.6,
         "pointing_game_centre": 0.2, "pointing_game_vs_centre": 0.3, "pointing_game_vs_centre_ci_low": 0.15,
         "pointing_game_vs_centre_ci_high": 0.45, "heat_mass_in_boxes": 0.1, "heat_mass_in_boxes_ci_low": 0.08,
         "heat_mass_in_boxes_ci_high": 0.12, "heat_mass_in_boxes_centre": 0.05, "heat_mass_in_boxes_vs_centre": 0.05,
         "heat_mass_in_boxes_vs_centre_ci_low": -0.01, "heat_mass_in_boxes_vs_centre_ci_high": 0.1,
         "box_area_share": 0.03}
    text = "\n".join(_localisation_lines(m))
    assert "80 fractured test images" in text
    assert "the map minus the centre on the same images: +0.300 (95% CI +0.150 to +0.450), so the map points " \
           "better than the image centre" in text
    assert "so the map covers the boxes no better than the image centre" in text
    worse = m | {"pointing_game_vs_centre_ci_low": -0.3, "pointing_game_vs_centre_ci_high": -0.1}
    assert "so the image centre points better than the map" in "\n".join(_localisation_lines(worse))
    assert _localisation_lines({"roc_auc": 0.9}) == []
