"""Pictures of predictions: one label per object, enlarged previews."""

import copy

import numpy as np
from pycocotools import mask as mask_utils

from maskrcnn.engine.predictions import draw_predictions, drawn_results
from maskrcnn.visualize import PALETTE

CATEGORY_IDS = [1, 3]  # circle, square (as the synthetic set's ids, with a gap)
NAMES = ["circle", "square"]


def _result(category_id, score, box, height=40, width=60):
    x1, y1, x2, y2 = box
    mask = np.zeros((height, width), np.uint8)
    mask[y1:y2, x1:x2] = 1
    return {"image_id": 0, "category_id": category_id, "score": score,
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "segmentation": mask_utils.encode(np.asfortranarray(mask))}


def test_one_label_per_object_whatever_its_classes():
    """If this fails, one object is drawn with two labels of different classes again (the
    model's NMS is per class), or drawing drops distinct objects, shows results under the
    threshold, or changes the scored results."""
    results = [
        _result(3, 0.71, (10, 10, 30, 30)),  # square on the circle below: not drawn
        _result(1, 0.79, (10, 10, 30, 31)),  # circle
        _result(3, 0.60, (40, 5, 55, 20)),  # another object
        _result(1, 0.30, (40, 25, 55, 38)),  # under the threshold
    ]
    before = copy.deepcopy(results)
    shown = drawn_results(results, 0.5)
    assert [(r["category_id"], r["score"]) for r in shown] == [(1, 0.79), (3, 0.60)]
    assert results == before
    assert drawn_results(results, 0.9) == []


def test_enlarged_prediction_picture():
    """If this fails, the preview is not drawn at the requested scale, or its boxes and masks
    land elsewhere than on their objects once enlarged."""
    image = np.full((40, 60, 3), 128, np.uint8)
    results = [_result(1, 0.9, (10, 10, 30, 30)), _result(3, 0.8, (11, 10, 30, 30))]
    picture = draw_predictions(image, results, CATEGORY_IDS, NAMES, 0.5, scale=3.0)
    assert picture.size == (180, 120)
    drawn = np.asarray(picture).astype(int)
    inside, outside = drawn[60, 60], drawn[100, 150]  # the mask's centre; a far corner
    assert (outside == 128).all()
    assert (drawn[10:12, 15:25] == 128).all()  # where the box's top edge would be at 1x
    circle = np.array(PALETTE[1])  # class 1's colour: the square (class 2) was not drawn
    assert (abs(inside - (0.6 * 128 + 0.4 * circle)) <= 1).all()
    square = np.array(PALETTE[2])
    assert not (abs(drawn - square).sum(axis=-1) == 0).any()
