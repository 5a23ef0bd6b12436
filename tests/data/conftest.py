"""Tiny hand-made COCO datasets on disk for the data tests."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}]  # deliberately non-contiguous


def square(x: float, y: float, side: float) -> list[list[float]]:
    return [[x, y, x + side, y, x + side, y + side, x, y + side]]


def write_coco(root: Path, images: list[dict], annotations: list[dict],
               categories: list[dict] = CATEGORIES) -> tuple[Path, Path]:
    """Writes root/ann.json and a random JPEG per image entry; returns (json, image folder)."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for image in images:
        pixels = rng.integers(0, 255, (image["height"], image["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(image_dir / image["file_name"])
    for index, ann in enumerate(annotations, start=1):
        ann.setdefault("id", index)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
    json_path = root / "ann.json"
    json_path.write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    return json_path, image_dir


@pytest.fixture
def small_coco(tmp_path):
    """3 images (one landscape, one portrait, one without annotations) with polygon,
    compressed-RLE, crowd, out-of-image and degenerate annotations."""
    from pycocotools import mask as mask_utils

    images = [
        {"id": 10, "file_name": "a.jpg", "height": 60, "width": 80},
        {"id": 20, "file_name": "b.jpg", "height": 90, "width": 50},
        {"id": 30, "file_name": "c.jpg", "height": 40, "width": 40},
    ]
    bitmap = np.zeros((90, 50), np.uint8)
    bitmap[20:50, 10:30] = 1
    rle = mask_utils.encode(np.asfortranarray(bitmap))
    rle["counts"] = rle["counts"].decode()
    annotations = [
        {"image_id": 10, "category_id": 3, "bbox": [10, 10, 20, 20],
         "segmentation": square(10, 10, 20)},
        {"image_id": 10, "category_id": 17, "bbox": [70, 50, 20, 20],  # leaves the image
         "segmentation": square(70, 50, 20)},
        {"image_id": 10, "category_id": 17, "bbox": [5, 5, 0.5, 10],  # degenerate
         "segmentation": [[5, 5, 5.5, 5, 5.5, 15, 5, 15]]},
        {"image_id": 20, "category_id": 17, "bbox": [10, 20, 20, 30], "segmentation": rle},
        {"image_id": 20, "category_id": 3, "bbox": [0, 0, 50, 90], "iscrowd": 1,
         "segmentation": {"counts": [0, 4500], "size": [90, 50]}},
    ]
    return write_coco(tmp_path, images, annotations)
