"""Box-local ground-truth masks: exactness on hand-made cases and fidelity of mask targets
made from them against exact rasterisation, through the whole pipeline (resize and flip)."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.dataset import DetectionDataset
from maskrcnn.data.gt_masks import (
    SUPERSAMPLE,
    box_local_mask,
    decode_segmentation,
    mask_targets,
    rasterize_in_roi,
)
from tests.data.conftest import write_coco
from tests.tiny import REPO


def test_box_local_mask_of_a_rectangle_is_its_coverage():
    """If this fails, the box frame is misaligned: a mask covering the left half of its box
    must fill the left half of the cells exactly, whatever the format."""
    polygon = [[10, 20, 30, 20, 30, 60, 10, 60]]  # x in [10, 30], y in [20, 60]
    box = np.array([10, 20, 50, 60], np.float32)   # twice as wide as the polygon
    cells = box_local_mask(polygon, box, 100, 100, 16)
    assert (cells[:, :8] == 255).all() and (cells[:, 8:] == 0).all()
    bitmap = np.zeros((100, 100), np.uint8)
    bitmap[20:60, 10:30] = 1
    rle = mask_utils.encode(np.asfortranarray(bitmap))
    np.testing.assert_array_equal(box_local_mask(rle, box, 100, 100, 16), cells)


def test_mask_targets_hand_computed():
    """If this fails, RoIs are mapped into the wrong mask, frame or cells: an RoI equal to
    the box reproduces the mask; an RoI twice the box (same centre) shows it in the middle
    half only; a padded slot of another image is never read."""
    masks = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    masks[1, 2] = 255
    boxes = torch.zeros(2, 3, 4)
    boxes[1, 2] = torch.tensor([10.0, 10.0, 26.0, 26.0])
    rois = torch.tensor([[10.0, 10.0, 26.0, 26.0], [2.0, 2.0, 34.0, 34.0]])
    out = mask_targets(masks, boxes, rois, torch.tensor([1, 1]), torch.tensor([2, 2]), 8)
    assert out.shape == (2, 8, 8)
    # Bilinear sampling softens edges by half a mask cell; the 0.5 level is the exact edge.
    assert (out[0] >= 0.5).all() and torch.allclose(out[0, 1:7, 1:7], torch.ones(6, 6))
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 2:6] = True
    assert torch.equal(out[1] >= 0.5, expected)
    assert out[1, 0].max() == 0 and out[1, :, 7].max() == 0


def _blob_image(rng, height, width):
    """Random star polygons and RLE rings for one image, as COCO annotations."""
    annotations = []
    for _ in range(4):
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        radius = rng.uniform(8, 0.3 * min(height, width))
        angles = np.sort(rng.uniform(0, 2 * np.pi, 12))
        radii = radius * rng.uniform(0.5, 1.0, 12)
        xs = np.clip(cx + radii * np.cos(angles), 0, width)
        ys = np.clip(cy + radii * np.sin(angles), 0, height)
        polygon = np.stack([xs, ys], 1).ravel().tolist()
        if rng.random() < 0.5:
            annotations.append({"segmentation": [polygon]})
        else:  # a ring: RLE, with a hole polygons cannot express
            yy, xx = np.mgrid[:height, :width]
            dist = np.hypot(xx + 0.5 - cx, yy + 0.5 - cy)
            bitmap = ((dist < radius) & (dist > radius / 2)).astype(np.uint8)
            rle = mask_utils.encode(np.asfortranarray(bitmap))
            rle["counts"] = rle["counts"].decode()
            annotations.append({"segmentation": rle})
    for ann in annotations:
        segm = ann["segmentation"]
        rle = mask_utils.frPyObjects(segm, height, width) if isinstance(segm, list) else segm
        rle = mask_utils.merge(rle) if isinstance(rle, list) else rle
        ann["bbox"] = mask_utils.toBbox(rle).tolist()
        ann["area"] = float(mask_utils.area(rle))
    return annotations


def _jittered_rois(rng, box, count):
    """RoIs around a box with IoU >= 0.5, like the foreground RoIs the mask head sees."""
    rois = []
    w, h = box[2] - box[0], box[3] - box[1]
    while len(rois) < count:
        roi = box + rng.uniform(-0.15, 0.15, 4) * np.array([w, h, w, h])
        ix = max(0, min(roi[2], box[2]) - max(roi[0], box[0]))
        iy = max(0, min(roi[3], box[3]) - max(roi[1], box[1]))
        union = w * h + (roi[2] - roi[0]) * (roi[3] - roi[1]) - ix * iy
        if roi[2] > roi[0] + 1 and roi[3] > roi[1] + 1 and ix * iy / union >= 0.5:
            rois.append(roi)
    return np.array(rois, np.float32)


def test_mask_target_fidelity_through_the_pipeline(tmp_path):
    """If this fails, the 28x28 targets the mask head would learn from, made on the device
    from the pipeline's box-local masks after resize and flip, drift from targets rasterised
    exactly from the original polygons/RLE (mean IoU must be >= 0.97)."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id in range(1, 9):
        height, width = int(rng.integers(120, 300)), int(rng.integers(120, 300))
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "height": height,
                       "width": width})
        for ann in _blob_image(rng, height, width):
            annotations.append({"image_id": image_id, "category_id": 3, **ann})
    coco = CocoDataset(*write_coco(tmp_path, images, annotations, [{"id": 3, "name": "x"}]),
                       train=True)
    dataset = DetectionDataset(coco, canvases=[(256, 320), (320, 256)], short_side=256,
                               max_long_side=320, max_instances=8, gt_mask_size=64,
                               flip_prob=0.5, seed=1)
    ious, flips = [], 0
    for index, record in enumerate(coco.records):
        sample = dataset[(index, 0)]
        flips += int(sample["flipped"])
        (res_h, res_w), flipped = sample["image_sizes"], bool(sample["flipped"])
        sx, sy = record.width / res_w, record.height / res_h
        for slot in np.flatnonzero(sample["gt_valid"]):
            rois = _jittered_rois(rng, sample["gt_boxes"][slot], 4)
            ours = mask_targets(
                torch.from_numpy(sample["gt_masks"][None]),
                torch.from_numpy(sample["gt_boxes"][None]),
                torch.from_numpy(rois), torch.zeros(len(rois), dtype=torch.int64),
                torch.full((len(rois),), int(slot)), 28,
            ).numpy() >= 0.5
            # The record's instance in this slot: the slots hold instances by area.
            t = np.argsort(-record.areas, kind="stable")[slot]
            for roi, target in zip(rois, ours, strict=True):
                x1, y1, x2, y2 = roi
                if flipped:  # back to the unflipped resized image
                    x1, x2 = res_w - x2, res_w - x1
                original = np.array([x1 * sx, y1 * sy, x2 * sx, y2 * sy])
                exact = rasterize_in_roi(record.segmentations[t], original, record.height,
                                         record.width, 28)
                if flipped:
                    exact = exact[:, ::-1]
                union = np.logical_or(target, exact).sum()
                ious.append(np.logical_and(target, exact).sum() / max(union, 1))
    assert 0 < flips < len(coco.records)  # both orientations were exercised
    assert len(ious) >= 100
    print(f"mask target fidelity: mean IoU {np.mean(ious):.4f} over {len(ious)} RoIs")
    assert np.mean(ious) >= 0.97, f"mean IoU {np.mean(ious):.4f}, min {np.min(ious):.4f}"


@pytest.mark.parametrize("size", [32, 64])
def test_fidelity_grows_with_mask_size(size):
    """If this fails, the coverage representation loses detail that more cells should keep
    (a thin diagonal bar is the hard case)."""
    polygon = [[10, 10, 14, 10, 90, 86, 90, 90, 86, 90, 10, 14]]
    box = np.array([10, 10, 90, 90], np.float32)
    cells = torch.from_numpy(box_local_mask(polygon, box, 100, 100, size))
    out = mask_targets(cells[None, None], torch.from_numpy(box)[None, None],
                       torch.from_numpy(box)[None], torch.tensor([0]), torch.tensor([0]), 28)
    exact = rasterize_in_roi(polygon, box, 100, 100, 28)
    ours = out[0].numpy() >= 0.5
    iou = np.logical_and(ours, exact).sum() / np.logical_or(ours, exact).sum()
    assert iou >= (0.8 if size == 32 else 0.9), iou


COCO = REPO / "tests" / "assets" / "coco2017-tiny"


def _float_coverage(polygons, box, size):
    """The reduction box_local_mask used before counting in uint8: the supersampled raster
    as float32, averaged over each cell's samples."""
    x1, y1, x2, y2 = (float(v) for v in box)
    grid = size * SUPERSAMPLE
    sx, sy = grid / max(x2 - x1, 1e-6), grid / max(y2 - y1, 1e-6)
    local = [np.stack([(np.asarray(p, np.float64).reshape(-1, 2)[:, 0] - x1) * sx,
                       (np.asarray(p, np.float64).reshape(-1, 2)[:, 1] - y1) * sy], 1).ravel()
             .tolist() for p in polygons]
    fine = decode_segmentation(local, grid, grid).astype(np.float32)
    return fine.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


@pytest.mark.parametrize("size", [28, 64])
def test_box_local_masks_of_coco_polygons_equal_the_float_reduction(size):
    """If this fails, counting the supersamples of each cell in uint8 (3x faster) gives other
    masks than the float32 average it replaced, on real COCO polygons (every value must be
    equal: the counts are exact, 16 samples per cell)."""
    coco = CocoDataset(COCO / "annotations" / "instances_val2017.json", COCO / "val2017",
                       train=True)
    count = 0
    for record in coco.records:
        for segm, box in zip(record.segmentations, record.boxes, strict=True):
            expected = np.round(np.clip(_float_coverage(segm, box, size), 0, 1) * 255)
            np.testing.assert_array_equal(
                box_local_mask(segm, box, record.height, record.width, size),
                expected.astype(np.uint8))
            count += 1
    assert count > 300  # polygons only: COCO's non-crowd annotations
