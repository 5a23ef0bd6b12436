"""COCO evaluation: our results conversion and scoring against pycocotools itself."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn.data.batch import Batch
from maskrcnn.engine.evaluate import detections_to_coco, per_category_ap, score_results

CATEGORIES = [{"id": 2, "name": "a"}, {"id": 7, "name": "b"}]


def _rect_rle(height, width, x, y, w, h):
    mask = np.zeros((height, width), np.uint8)
    mask[y:y + h, x:x + w] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


@pytest.fixture
def gt(tmp_path):
    """Two 60x80 images with rectangles, one crowd region, one image without objects."""
    images = [{"id": i, "file_name": f"{i}.png", "height": 60, "width": 80} for i in (1, 2, 3)]
    boxes = [(1, 2, 5, 5, 20, 10), (1, 7, 40, 20, 30, 30), (2, 2, 10, 30, 15, 25),
             (2, 7, 50, 5, 20, 20)]
    annotations = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": [x, y, w, h],
                    "area": w * h, "iscrowd": 0, "segmentation": _rect_rle(60, 80, x, y, w, h)}
                   for k, (i, c, x, y, w, h) in enumerate(boxes)]
    annotations.append({"id": 9, "image_id": 2, "category_id": 2, "bbox": [0, 0, 8, 8],
                        "area": 64, "iscrowd": 1, "segmentation": _rect_rle(60, 80, 0, 0, 8, 8)})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": CATEGORIES}))
    with contextlib.redirect_stdout(io.StringIO()):
        return path, COCO(str(path)), annotations


def _perfect(annotations):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": 0.9, "segmentation": a["segmentation"]}
            for a in annotations if not a["iscrowd"]]


def test_perfect_results_score_ap_one(gt):
    """If this fails, our scoring loses or mangles results (ids, boxes, RLE)."""
    _, coco, annotations = gt
    for iou_type in ("bbox", "segm"):
        stats, _ = score_results(coco, _perfect(annotations), iou_type)
        assert stats[0] == pytest.approx(1.0) and stats[1] == pytest.approx(1.0)


def test_imperfect_results_score_what_pycocotools_reports(gt):
    """If this fails, our numbers differ from pycocotools run by hand on the same results."""
    path, coco, annotations = gt
    results = _perfect(annotations)
    results[0]["bbox"] = [7, 3, 20, 10]  # shifted: IoU ~0.69
    results[0]["segmentation"] = _rect_rle(60, 80, 7, 3, 20, 10)
    results[1]["category_id"] = 2  # wrong class
    results[2]["score"] = 0.3
    results.append({"image_id": 3, "category_id": 7, "bbox": [1, 1, 10, 10], "score": 0.95,
                    "segmentation": _rect_rle(60, 80, 1, 1, 10, 10)})  # false positive
    for iou_type in ("bbox", "segm"):
        ours, evaluator = score_results(coco, results, iou_type)
        with contextlib.redirect_stdout(io.StringIO()):
            reference_gt = COCO(str(path))
            detections = reference_gt.loadRes(
                [{k: v for k, v in r.items() if iou_type == "segm" or k != "segmentation"}
                 for r in results])
            reference = COCOeval(reference_gt, detections, iou_type)
            reference.evaluate()
            reference.accumulate()
            reference.summarize()
        np.testing.assert_array_equal(ours, reference.stats)
        assert 0 < ours[0] < 1
        per_category = per_category_ap(evaluator, coco)
        assert set(per_category) == {"a", "b"}


def test_no_results_scores_minus_one(gt):
    _, coco, _ = gt
    stats, evaluator = score_results(coco, [], "bbox")
    assert evaluator is None and (stats == -1).all()


def test_detections_are_mapped_to_original_pixels_and_category_ids():
    """If this fails, boxes or masks are not scaled back from the resized canvas to the image
    as stored, or class indices are not mapped back to the json's category ids."""
    d, m = 3, 8
    batch = Batch(images=torch.zeros(1, 3, 64, 64, dtype=torch.uint8),
                  image_sizes=torch.tensor([[30, 40]]), orig_sizes=torch.tensor([[60, 80]]),
                  image_ids=torch.tensor([42]), flipped=torch.tensor([False]),
                  gt_boxes=torch.zeros(1, 1, 4), gt_classes=torch.zeros(1, 1, dtype=torch.int64),
                  gt_valid=torch.zeros(1, 1, dtype=torch.bool),
                  gt_masks=torch.zeros(1, 1, 4, 4, dtype=torch.uint8),
                  num_dropped=torch.zeros(1, dtype=torch.int64))
    detections = {
        "boxes": torch.tensor([[[5.0, 5.0, 15.0, 10.0], [0, 0, 20, 20], [0, 0, 0, 0]]]),
        "scores": torch.tensor([[0.9, 0.6, 0.0]]),
        "classes": torch.tensor([[2, 1, 0]]),
        "valid": torch.tensor([[True, True, False]]),
        "masks": torch.ones(1, d, m, m),
    }
    results = detections_to_coco(detections, batch, category_ids=[2, 7])
    assert len(results) == 2
    first = results[0]
    assert first["image_id"] == 42 and first["category_id"] == 7
    assert first["bbox"] == pytest.approx([10.0, 10.0, 20.0, 10.0])
    mask = mask_utils.decode(first["segmentation"])
    assert mask.shape == (60, 80)
    ys, xs = np.nonzero(mask)
    # The box is x 10..30, y 10..20 in original pixels; pasting (as torchvision's) interpolates
    # the mask's edge over about one pixel.
    extent = np.array([xs.min(), xs.max() + 1, ys.min(), ys.max() + 1])
    assert np.abs(extent - [10, 30, 10, 20]).max() <= 1
    assert results[1]["category_id"] == 2 and results[1]["score"] == pytest.approx(0.6)
