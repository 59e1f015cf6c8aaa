"""The detector's box file: only the fracture category's boxes are read, and crowd regions are refused."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from fracture.localisation import BoxesError, read_coco_boxes
from tests.conftest import COCO_BOXES, require_fracatlas

IMAGES = [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
          {"id": 2, "file_name": "b.jpg", "width": 100, "height": 80}]


def write(tmp_path, annotations, categories=None):
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"images": IMAGES, "annotations": annotations}
                               | ({} if categories is None else {"categories": categories})))
    return path


def box(id_, image_id, bbox, category_id=1, iscrowd=0):
    return {"id": id_, "image_id": image_id, "bbox": bbox, "category_id": category_id, "iscrowd": iscrowd}


def test_only_the_fracture_category_s_boxes_are_read_and_the_others_are_counted(tmp_path, caplog):
    """Every annotation was read as a fracture box: a hardware (plate, screw) box trained the
    detector as a fracture and made b.jpg, with no fracture, a fractured image with a box."""
    categories = [{"id": 1, "name": "fracture"}, {"id": 2, "name": "hardware"}]
    path = write(tmp_path, [box(1, 1, [10, 10, 20, 20]), box(2, 1, [50, 40, 10, 10], category_id=2),
                            box(3, 2, [5, 5, 30, 30], category_id=2)], categories)
    with caplog.at_level(logging.WARNING, logger="fracture.localisation"):
        boxes = read_coco_boxes(path)
    assert list(boxes) == ["a.jpg"]
    np.testing.assert_array_equal(boxes["a.jpg"].boxes, [[10, 10, 30, 30]])
    assert "2 annotations of other categories than 'fracture' left out (hardware: 2)" in caplog.text


def test_a_box_file_whose_fracture_category_cannot_be_told_is_refused(tmp_path):
    categories = [{"id": 1, "name": "displaced"}, {"id": 2, "name": "hardware"}]
    path = write(tmp_path, [box(1, 1, [10, 10, 20, 20])], categories)
    with pytest.raises(BoxesError, match=r"2 categories \('displaced' \(id 1\), 'hardware' \(id 2\)\) and 0 of them "
                                         r"named a fracture"):
        read_coco_boxes(path)
    path = write(tmp_path, [box(1, 1, [10, 10, 20, 20], category_id=7)], [{"id": 1, "name": "fracture"},
                                                                           {"id": 2, "name": "hardware"}])
    with pytest.raises(BoxesError, match="annotation 1 names category id 7, which the file's categories do not list"):
        read_coco_boxes(path)


def test_a_crowd_region_is_refused_not_read_as_one_fracture_s_box(tmp_path):
    path = write(tmp_path, [box(1, 1, [10, 10, 20, 20]), box(2, 2, [0, 0, 90, 70], iscrowd=1)],
                 [{"id": 1, "name": "fracture"}])
    with pytest.raises(BoxesError, match=r"annotation 2 of b\.jpg is a crowd region \(iscrowd 1\)"):
        read_coco_boxes(path)


def test_a_file_of_one_category_or_none_listed_holds_fracture_boxes_only(tmp_path):
    """FracAtlas's file lists one category, ``fractured``, with id 0; a hand-made one may list none."""
    one = write(tmp_path, [box(1, 1, [10, 10, 20, 20], category_id=0)], [{"id": 0, "name": "fractured"}])
    assert list(read_coco_boxes(one)) == ["a.jpg"]
    none = write(tmp_path, [{"id": 1, "image_id": 2, "bbox": [10, 10, 20, 20]}])
    assert list(read_coco_boxes(none)) == ["b.jpg"]


def test_fracatlas_s_box_file_is_read_whole():
    root = require_fracatlas()
    coco = json.loads((root / COCO_BOXES).read_text())
    assert [c["name"] for c in coco["categories"]] == ["fractured"]
    boxes = read_coco_boxes(root / COCO_BOXES)
    assert sum(len(b.boxes) for b in boxes.values()) == len(coco["annotations"])
