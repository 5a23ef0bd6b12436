"""The per-image pipeline and the DataLoader: static shapes, G slots, flips, determinism."""

import numpy as np
import pytest
import torch

from maskrcnn.config import load_config
from maskrcnn.data.batch import Batch, collate
from maskrcnn.data.coco import CocoDataset, DatasetError
from maskrcnn.data.dataset import DetectionDataset
from maskrcnn.data.loader import build_dataset, build_eval_loader, build_train_loader
from maskrcnn.data.transforms import load_image, resize_image_pil
from tests.data.conftest import square, write_coco
from tests.tiny import REPO

COCO = REPO / "tests" / "assets" / "coco2017-tiny"


def _dataset(coco, max_instances=8, flip_prob=0.0):
    return DetectionDataset(coco, canvases=[(64, 96), (96, 64)], short_side=64,
                            max_long_side=96, max_instances=max_instances, gt_mask_size=16,
                            flip_prob=flip_prob, seed=0)


def test_sample_has_static_shapes_and_scaled_targets(small_coco):
    """If this fails, samples vary in shape or their boxes do not follow the resize."""
    dataset = _dataset(CocoDataset(*small_coco, train=True))
    sample = dataset[(0, 0)]  # image 10: 60x80 -> 64x85 (short side 64) on the 64x96 canvas
    assert sample["images"].shape == (3, 64, 96) and sample["images"].dtype == np.uint8
    assert sample["image_sizes"].tolist() == [64, 85]
    assert sample["gt_boxes"].shape == (8, 4) and sample["gt_masks"].shape == (8, 16, 16)
    assert sample["gt_valid"].tolist() == [True, True] + [False] * 6
    np.testing.assert_allclose(sample["gt_boxes"][0], [10 * 85 / 80, 10 * 64 / 60,
                                                       30 * 85 / 80, 30 * 64 / 60], rtol=1e-5)
    assert (sample["images"][:, :, 85:] == 0).all()
    assert sample["gt_classes"][:2].tolist() == [1, 2] and (sample["gt_classes"][2:] == 0).all()
    portrait = dataset[(1, 0)]
    assert portrait["images"].shape == (3, 96, 64)


def test_more_than_g_instances_keeps_the_largest(tmp_path):
    """If this fails, truncation to G slots drops large objects or miscounts the drop."""
    images = [{"id": 1, "file_name": "a.jpg", "height": 64, "width": 64}]
    sides = [4, 12, 8, 20, 6]
    annotations = [{"image_id": 1, "category_id": 3, "bbox": [2, 2, s, s],
                    "segmentation": square(2, 2, s)} for s in sides]
    coco = CocoDataset(*write_coco(tmp_path, images, annotations), train=True)
    sample = _dataset(coco, max_instances=3)[(0, 0)]
    widths = sample["gt_boxes"][:, 2] - sample["gt_boxes"][:, 0]
    np.testing.assert_allclose(widths, [20, 12, 8])
    assert sample["num_dropped"] == 2 and sample["gt_valid"].all()


def test_flip_mirrors_image_boxes_and_masks_consistently(small_coco):
    """If this fails, a flipped image's boxes or masks no longer cover the flipped object."""
    coco = CocoDataset(*small_coco, train=True)
    plain, flipped = _dataset(coco)[(0, 0)], _dataset(coco, flip_prob=1.0)[(0, 0)]
    assert flipped["flipped"] and not plain["flipped"]
    width = int(plain["image_sizes"][1])
    np.testing.assert_array_equal(flipped["images"][:, :, :width],
                                  plain["images"][:, :, :width][:, :, ::-1])
    np.testing.assert_allclose(flipped["gt_boxes"][0], [width - plain["gt_boxes"][0][2],
                                                        plain["gt_boxes"][0][1],
                                                        width - plain["gt_boxes"][0][0],
                                                        plain["gt_boxes"][0][3]])
    np.testing.assert_array_equal(flipped["gt_masks"], plain["gt_masks"][:, :, ::-1])


def test_corrupt_image_raises_naming_files(small_coco):
    """If this fails, a corrupt image file crashes the loader without naming it."""
    json_path, image_dir = small_coco
    (image_dir / "a.jpg").write_bytes(b"\x00" * 10)
    dataset = _dataset(CocoDataset(json_path, image_dir, train=True))
    with pytest.raises(DatasetError, match=r"a\.jpg \(listed in .*ann\.json\)"):
        dataset[(0, 0)]


def test_collate_refuses_mixed_canvases(small_coco):
    """If this fails, images of different canvases would be stacked into garbage."""
    dataset = _dataset(CocoDataset(*small_coco, train=True))
    batch = collate([dataset[(0, 0)], dataset[(0, 1)]])
    assert isinstance(batch, Batch) and batch.images.shape == (2, 3, 64, 96)
    with pytest.raises(ValueError, match="different canvases"):
        collate([dataset[(0, 0)], dataset[(1, 0)]])


def _loader_batches(config, dataset, workers, rank=0, world=1, steps=3):
    config.data.num_workers = workers
    loader, sampler = build_train_loader(config, dataset, rank=rank, world_size=world)
    sampler.set_epoch(1)
    return [batch for _, batch in zip(range(steps), loader, strict=False)]


@pytest.fixture
def many_images(tmp_path):
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(1, 17):
        h, w = (48, 80) if i % 3 else (80, 48)
        images.append({"id": i, "file_name": f"{i}.jpg", "height": h, "width": w})
        side = float(rng.integers(6, 30))
        annotations.append({"image_id": i, "category_id": 3, "bbox": [4, 4, side, side],
                            "segmentation": square(4, 4, side)})
    return CocoDataset(*write_coco(tmp_path, images, annotations, [{"id": 3, "name": "x"}]),
                       train=True)


def test_loader_is_deterministic_and_shardable(many_images):
    """If this fails, batches change with the number of workers, or two ranks of M images
    do not see exactly what one process of 2M images sees."""
    config = load_config("shapes", ["data { canvas { height: 64 width: 96 } "
                                    "canvas { height: 96 width: 64 } short_side: 64 "
                                    "max_long_side: 96 max_instances: 4 }",
                                    "run { images_per_gpu: 4 }"])
    dataset = build_dataset(config, many_images, train=True)
    serial = _loader_batches(config, dataset, workers=0)
    parallel = _loader_batches(config, dataset, workers=2)
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.gt_masks, b.gt_masks)
        assert torch.equal(a.flipped, b.flipped)
    config.run.images_per_gpu = 2
    halves = [_loader_batches(config, dataset, workers=0, rank=r, world=2) for r in range(2)]
    for step, whole in enumerate(serial):
        joined = torch.cat([halves[0][step].images, halves[1][step].images])
        assert torch.equal(joined, whole.images)


def test_flips_are_seeded_by_epoch_and_index(many_images):
    """If this fails, augmentation depends on call order, worker or process (runs would not
    repeat), or does not change between epochs."""
    dataset = _dataset(many_images, flip_prob=0.5)
    first = [bool(dataset[(i, e)]["flipped"]) for e in range(2) for i in range(len(dataset))]
    again = [bool(dataset[(i, e)]["flipped"]) for e in range(2) for i in range(len(dataset))]
    assert first == again
    assert 0 < sum(first) < len(first)
    assert first[:len(dataset)] != first[len(dataset):]


def test_eval_loader_sees_every_image_once_without_flips(many_images):
    """If this fails, evaluation skips, repeats or augments images."""
    config = load_config("shapes", ["data { canvas { height: 64 width: 96 } "
                                    "canvas { height: 96 width: 64 } short_side: 64 "
                                    "max_long_side: 96 num_workers: 0 }"])
    dataset = build_dataset(config, many_images, train=False)
    ids = []
    for batch in build_eval_loader(config, dataset):
        assert not batch.flipped.any()
        ids += batch.image_ids.tolist()
    assert sorted(ids) == list(range(1, 17))


def _reference_sample(dataset, index, epoch):
    """A sample's image and boxes by the pipeline's earlier path: PIL's resize, numpy's
    reversed view for the flip, a zeroed canvas with the image transposed into it."""
    record = dataset.coco.records[index]
    canvas, size, flip = dataset.geometry(index, epoch)
    image = resize_image_pil(load_image(record.path, "", record.height, record.width), size)
    if flip:
        image = image[:, ::-1]
    padded = np.zeros((3, *canvas), np.uint8)
    padded[:, :size[0], :size[1]] = image.transpose(2, 0, 1)
    return padded


def test_samples_match_the_pil_reference_pipeline():
    """If this fails, the fast pipeline (torch's uint8 resize, the flip in the padding copy)
    makes other samples than the PIL pipeline it replaced, on real COCO photos at the COCO
    recipe's sizes, flipped and not, both canvases: an image value off by more than 1 (the
    resize's rounding), the image misplaced or unflipped, or the masks, classes or slots
    other than the record's targets (mirrored with the image)."""
    coco = CocoDataset(COCO / "annotations" / "instances_val2017.json", COCO / "val2017",
                       train=True)
    config = load_config("8x4")
    dataset = build_dataset(config, coco, train=True)
    portrait = int(np.flatnonzero(dataset.canvas_of == 1)[0])
    flips = set()
    for index in (0, portrait):
        for epoch in range(3):
            sample = dataset[(index, epoch)]
            flips.add(bool(sample["flipped"]))
            difference = np.abs(sample["images"].astype(np.int16)
                                - _reference_sample(dataset, index, epoch))
            assert difference.max() <= 1 and (difference > 0).mean() < 0.005, (index, epoch)
            boxes, classes, valid, masks, _ = dataset.targets(coco.records[index])
            np.testing.assert_array_equal(sample["gt_classes"], classes)
            np.testing.assert_array_equal(sample["gt_valid"], valid)
            np.testing.assert_array_equal(sample["gt_masks"],
                                          masks[:, :, ::-1] if sample["flipped"] else masks)
    assert flips == {False, True}
