"""The data pipeline on real COCO photographs and their official annotations
(tests/assets/coco2017-tiny: the first 50 images of val2017, 80 categories with
non-contiguous ids, crowd RLE regions, two images without annotations)."""

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from maskrcnn.config import load_config
from maskrcnn.data.coco import MIN_BOX_SIDE, CocoDataset
from maskrcnn.data.gt_masks import box_local_mask, mask_targets, rasterize_in_roi
from maskrcnn.data.loader import build_dataset, build_train_loader
from tests.data.test_gt_masks import _jittered_rois
from tests.tiny import REPO

REAL = REPO / "tests" / "assets" / "coco2017-tiny"
JSON = REAL / "annotations" / "instances_val2017.json"
IMAGES = REAL / "val2017"


@pytest.fixture(scope="module")
def reference() -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(JSON))


@pytest.fixture(scope="module")
def coco() -> CocoDataset:
    return CocoDataset(JSON, IMAGES, train=True)


def test_reader_statistics_agree_with_pycocotools(coco, reference):
    """If this fails, the reader loses, invents or misclassifies real annotations: its
    counts of images, annotations, crowd regions, categories and per-image targets differ
    from what pycocotools reads in the same official file."""
    assert coco.stats.images == len(reference.imgs) == 50
    assert coco.stats.annotations == len(reference.anns) == 382
    crowd = [a for a in reference.anns.values() if a["iscrowd"]]
    assert coco.stats.crowd == len(crowd) == 5
    assert coco.num_classes == len(reference.cats) == 80
    assert coco.category_ids == sorted(reference.getCatIds()) and coco.category_ids[-1] == 90
    assert coco.class_names[0] == "person" and coco.class_names[-1] == "toothbrush"
    no_annotations = [i for i in reference.imgs if not reference.getAnnIds(imgIds=i)]
    assert coco.stats.images_without_targets == len(no_annotations) == 2
    assert [r.image_id for r in coco.records] == sorted(set(reference.imgs) - set(no_annotations))
    dropped = 0
    for record in coco.records:
        anns = reference.loadAnns(reference.getAnnIds(imgIds=record.image_id, iscrowd=False))
        thin = [a for a in anns if min(a["bbox"][2:]) < MIN_BOX_SIDE]
        dropped += len(thin)
        assert len(record.classes) == len(anns) - len(thin), record.image_id
        expected = sorted(coco.category_ids.index(a["category_id"]) + 1
                          for a in anns if a not in thin)
        assert sorted(record.classes.tolist()) == expected
    assert coco.stats.dropped_boxes == dropped
    assert sum(coco.stats.instances_per_class.values()) == 382 - 5 - dropped
    # The official file has no faulty annotation in this slice, nor a duplicate id.
    assert coco.file.warnings() == [] and coco.stats.faulty == coco.stats.faulty_polygons == {}
    assert coco.file.data["annotations"] == reference.dataset["annotations"]


def _fidelity(segm, box, height, width, rng, rois_per_instance=3) -> list[float]:
    """IoUs of 28x28 targets made from a box-local mask against exact rasterisation, for
    jittered RoIs around the box (the image's own pixels: no resize)."""
    cells = torch.from_numpy(box_local_mask(segm, box, height, width, 64))
    rois = _jittered_rois(rng, box, rois_per_instance)
    ours = mask_targets(cells[None, None], torch.from_numpy(box)[None, None],
                        torch.from_numpy(rois), torch.zeros(len(rois), dtype=torch.int64),
                        torch.zeros(len(rois), dtype=torch.int64), 28).numpy() >= 0.5
    ious = []
    for roi, target in zip(rois, ours, strict=True):
        exact = rasterize_in_roi(segm, roi, height, width, 28)
        union = np.logical_or(target, exact).sum()
        ious.append(np.logical_and(target, exact).sum() / max(union, 1))
    return ious


def _as_rle(segm, height, width):
    """A polygon segmentation as the compressed RLE of its pixels (pycocotools' own)."""
    rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def test_box_local_masks_keep_real_polygons_and_rle(reference):
    """If this fails, the box-local masks lose the shape of real objects (thin, concave,
    multi-part polygons; the same objects as RLE): 28x28 targets made from them drift from
    exact rasterisation (mean IoU must be >= 0.97, as for the synthetic data)."""
    rng = np.random.default_rng(0)
    polygons, rles = [], []
    for ann in reference.anns.values():
        image = reference.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        if ann["iscrowd"] or min(w, h) < 8:  # tiny: a 28x28 target of a few pixels
            continue
        box = np.array([x, y, x + w, y + h], np.float32)
        polygons += _fidelity(ann["segmentation"], box, image["height"], image["width"], rng)
        rle = _as_rle(ann["segmentation"], image["height"], image["width"])
        rles += _fidelity(rle, box, image["height"], image["width"], rng)
    assert len(polygons) >= 900
    print(f"real masks: mean IoU {np.mean(polygons):.4f} over {len(polygons)} polygon RoIs, "
          f"{np.mean(rles):.4f} as RLE")
    assert np.mean(polygons) >= 0.97 and np.mean(rles) >= 0.97


def test_box_local_masks_of_real_crowd_regions(reference):
    """If this fails, the official crowd regions (uncompressed RLE) are misread or misplaced
    in their boxes. They are never mask targets (crowd is not trained on, here as in
    Detectron2 and torchvision), and at 28x28 they score lower than solid objects: they are
    sparse (10% to 75% of a box up to 638 x 101 pixels) and fragmented, so most of their
    target cells sit near the 0.5 level where any rounding flips a cell; hence the lower
    bound (measured 0.865)."""
    rng = np.random.default_rng(0)
    ious = []
    for ann in reference.anns.values():
        if ann["iscrowd"]:
            image = reference.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            box = np.array([x, y, x + w, y + h], np.float32)
            ious += _fidelity(ann["segmentation"], box, image["height"], image["width"], rng)
    assert len(ious) == 15
    print(f"real crowd regions: mean IoU {np.mean(ious):.4f} over {len(ious)} RoIs")
    assert np.mean(ious) >= 0.85


def test_batches_at_the_coco_recipe_sizes(coco):
    """If this fails, real photographs do not become the recipe's static batches (800x1344
    or 1344x800 canvases, short side 800 or long side 1333, 100 target slots, 64x64
    box-local masks), or their boxes are not scaled with the image."""
    config = load_config("8x4", ["data { num_workers: 0 }", "run { images_per_gpu: 2 }"])
    dataset = build_dataset(config, coco, train=True)
    loader, sampler = build_train_loader(config, dataset)
    sampler.set_epoch(0)
    by_id = {r.image_id: r for r in coco.records}
    canvases = set()
    for _, batch in zip(range(3), loader, strict=False):
        n, _, height, width = batch.images.shape
        canvases.add((height, width))
        assert n == 2 and batch.images.dtype == torch.uint8
        assert (height, width) in {(800, 1344), (1344, 800)}
        assert batch.gt_masks.shape == (2, 100, 64, 64) and batch.gt_boxes.shape == (2, 100, 4)
        for i in range(n):
            record = by_id[int(batch.image_ids[i])]
            h, w = batch.image_sizes[i].tolist()
            assert min(h, w) == 800 or max(h, w) == 1333
            assert abs(h / record.height - w / record.width) < 0.01  # aspect kept
            assert int(batch.gt_valid[i].sum()) == min(len(record.classes), 100)
            areas = (batch.gt_boxes[i, :, 2:] - batch.gt_boxes[i, :, :2]).prod(1)
            expected = (record.boxes[:, 2:] - record.boxes[:, :2]).prod(1)
            scale = h / record.height * w / record.width
            # Every instance fits the 100 slots here; its box is scaled with the image.
            assert areas[batch.gt_valid[i]].sum().item() == pytest.approx(
                expected.sum() * scale, rel=1e-4)
            assert batch.images[i, :, h:].sum() == 0 and batch.images[i, :, :, w:].sum() == 0
    assert len(canvases) >= 1

