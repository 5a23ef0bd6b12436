"""COCO evaluation: our results conversion and scoring against pycocotools itself."""

import contextlib
import io
import json
import re

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn.config import config_pb2, load_config
from maskrcnn.data.batch import Batch
from maskrcnn.data.coco import DatasetError
from maskrcnn.data.loader import build_dataset, build_eval_loader, read_coco, resolve_data_paths
from maskrcnn.engine.evaluate import (
    STAT_NAMES,
    Evaluator,
    coco_api,
    detections_to_coco,
    load_ground_truth,
    per_category_ap,
    read_results,
    score,
    score_results,
)
from maskrcnn.engine.hooks import workers_ignore_stop_signals
from maskrcnn.model.maskrcnn import build_model
from tests.tiny import REPO, TINY, run_module

COCOAPI = REPO / "tests" / "assets" / "cocoapi-eval"
# The cocoapi's published scores of its fake results on 100 val2014 images
# (cocoapi-eval/val2014_fake_eval_res.txt).
PUBLISHED_AP = {"bbox": 0.5045806987249628, "segm": 0.3195452758576433}

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
            # Boxes alone for bbox, masks alone for segm (as Detectron2 scores them).
            drop = "segmentation" if iou_type == "bbox" else "bbox"
            detections = reference_gt.loadRes(
                [{k: v for k, v in r.items() if k != drop} for r in results])
            reference = COCOeval(reference_gt, detections, iou_type)
            reference.evaluate()
            reference.accumulate()
            reference.summarize()
        np.testing.assert_array_equal(ours, reference.stats)
        assert 0 < ours[0] < 1
        per_category = per_category_ap(evaluator, coco)
        assert set(per_category) == {"a", "b"}


def test_no_detections_score_zero_not_minus_one(gt):
    """If this fails, a model that detects nothing is reported with pycocotools' -1.000
    placeholder (what a new user saw on real photos after a short run) instead of AP 0."""
    _, coco, _ = gt
    lines = []
    for iou_type in ("bbox", "segm"):
        stats, _ = score_results(coco, [], iou_type)
        # Every ground truth is small (< 32^2): medium and large have none and stay -1.
        np.testing.assert_array_equal(stats, [0, 0, 0, 0, -1, -1, 0, 0, 0, 0, -1, -1])
    metrics = score(coco, [], log=lines.append)
    assert "no detections on the 3 images scored: every AP and AR is 0" in lines[0]
    assert metrics["bbox/AP"] == 0 and metrics["segm/AR100"] == 0


def test_mask_results_are_sized_by_their_masks_not_their_boxes(gt):
    """If this fails, a mask result carrying a box gets the box's area (pycocotools' loadRes
    takes it from the box), which puts unmatched masks in the wrong small/medium/large
    range: here a small false-positive mask with a large box would escape the small range."""
    _, coco, annotations = gt
    results = _perfect(annotations)
    results.append({"image_id": 3, "category_id": 2, "bbox": [0, 0, 80, 60], "score": 0.95,
                    "segmentation": _rect_rle(60, 80, 1, 1, 10, 10)})  # small mask, big box
    stats, _ = score_results(coco, results, "segm")
    masks_only = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    reference, _ = score_results(coco, masks_only, "segm")
    np.testing.assert_array_equal(stats, reference)
    assert stats[3] < 0.99  # the false positive counts against the small range


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


def _published_table(iou_type: str) -> list[float]:
    """The 12 numbers of one IoU type in the cocoapi's published output."""
    text = (COCOAPI / "val2014_fake_eval_res.txt").read_text()
    section = text.split(f"type={iou_type}", 1)[1].split("type=", 1)[0]
    return [float(v) for v in re.findall(r"\] = (-?[\d.]+)", section)]


@pytest.mark.parametrize("backend", ["PYCOCOTOOLS", "FASTER_COCO_EVAL"])
def test_scoring_reproduces_the_cocoapi_published_numbers(backend):
    """If this fails, our scoring (the code training uses) is not the official COCO scoring:
    it differs from the cocoapi's published results for its fake detections, or the
    faster-coco-eval option gives other numbers than pycocotools."""
    api = coco_api(getattr(config_pb2, backend))
    gt = load_ground_truth(COCOAPI / "instances_val2014_100.json", api)
    for iou_type in ("bbox", "segm"):
        path = COCOAPI / f"instances_val2014_fake{iou_type}100_results.json"
        results, types = read_results(path, gt)
        assert types == (iou_type,)
        metrics = score(gt, results, types, api=api, log=lambda text: None)
        assert abs(metrics[f"{iou_type}/AP"] - PUBLISHED_AP[iou_type]) < 1e-12
        table = [metrics[f"{iou_type}/{name}"] for name in STAT_NAMES]
        np.testing.assert_allclose(table, _published_table(iou_type), atol=5e-4)


def test_eval_command_scores_a_results_file(tmp_path):
    """If this fails, `maskrcnn-eval --results=FILE --val_json=GT` does not print the
    official numbers and table, or a bad results file ends in a traceback."""
    gt_json = COCOAPI / "instances_val2014_100.json"
    results = COCOAPI / "instances_val2014_fakesegm100_results.json"
    done = run_module("maskrcnn.eval", f"--results={results}", f"--val_json={gt_json}",
                      "--iou_type=bbox,segm", cache_dir=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"segm AP {PUBLISHED_AP['segm']!r}" in done.stdout
    assert re.search(r"^bbox( +-?\d\.\d{3}){12}$", done.stdout, re.M)  # boxes from the masks
    assert re.search(r"^segm +0\.320 +0\.562 +0\.299( +-?\d\.\d{3}){9}$", done.stdout, re.M)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1],
                                "score": 0.5}]))
    failed = run_module("maskrcnn.eval", f"--results={bad}", f"--val_json={gt_json}",
                        cache_dir=tmp_path)
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert failed.returncode == 2 and len(lines) == 1, failed.stderr
    assert f"results file {bad}: result 0: image_id 1 is not in the ground truth" in lines[0]


@pytest.mark.parametrize("content, message", [
    ("{}", "must hold a list of detections, not a dict"),
    ("[1", "is not readable JSON"),
    ('[{"image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1]}]', "result 0: missing 'score'"),
    ('[{"image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1], "score": 1}]',
     "category_id 5 is not in the ground truth"),
    ('[{"image_id": 1, "category_id": 2, "bbox": [0, 0, 1], "score": 1}]', "bbox must be 4"),
    ('[{"image_id": 1, "category_id": 2, "score": 1}]', "neither 'bbox' nor 'segmentation'"),
    ('[{"image_id": 1, "category_id": 2, "score": 1, "segmentation": [[1, 2, 3, 4, 5, 6]]}]',
     "must be a compressed RLE"),
    ('[{"image_id": 1, "category_id": 2, "score": 1, '
     '"segmentation": {"size": [6, 8], "counts": "PP"}}]', "differs from the image's [60, 80]"),
    ('[{"image_id": 1, "category_id": 2, "score": 1, '
     '"segmentation": {"size": [60, 80], "counts": "PP"}}]', "not a valid RLE"),
    ('[{"image_id": 1, "category_id": 2, "score": 1, "bbox": [0, 0, 1, 1]}, '
     '{"image_id": 1, "category_id": 2, "score": 1, "bbox": [0, 0, 1, 1], '
     '"segmentation": {"size": [60, 80], "counts": "Pf4"}}]', "result 1: has other fields"),
])
def test_malformed_results_files_are_one_line(gt, tmp_path, content, message):
    """If this fails, a results file that does not fit its ground truth crashes inside
    pycocotools (an assertion or a traceback) instead of naming the file and the result."""
    _, coco, _ = gt
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(DatasetError) as caught:
        read_results(path, coco)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_the_evaluator_scores_on_its_own_loader_and_ends_its_workers(tmp_path, cache):
    """If this fails, the Evaluator does not evaluate on the loader it was given each time,
    or leaves the loader's workers running after an evaluation (they ignore SIGTERM, so a
    process that still holds the loader would hang at exit)."""
    config = load_config("shapes", [*TINY, "data { num_workers: 1 }"])
    paths = resolve_data_paths(config)
    coco = read_coco(paths.val_json, paths.val_images, train=False,
                     num_classes=config.model.num_classes)
    loader = workers_ignore_stop_signals(build_eval_loader(
        config, build_dataset(config, coco, train=False)))
    torch.manual_seed(0)
    evaluator = Evaluator(build_model(config), loader, coco, tmp_path, torch.device("cpu"),
                          log=lambda text: None)
    for _ in range(2):
        metrics = evaluator()
        assert evaluator.loader is loader and loader._iterator is None
        assert {"bbox/AP", "segm/AP"} <= metrics.keys()
