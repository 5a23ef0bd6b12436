"""Tests of the synthetic COCO dataset generator (maskrcnn/data/synthetic.py)."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from maskrcnn.data.synthetic import CATEGORIES, ensure_synthetic_coco, generate_synthetic_coco

SPLITS = ("train", "val")
# Small but enough: 64 training images hold 4 crowd images and 2 background-only images.
SMALL = {"num_train": 64, "num_val": 16}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """One generation shared by the read-only tests."""
    return generate_synthetic_coco(tmp_path_factory.mktemp("synthetic"), seed=0, **SMALL)


def load_coco(root: Path, split: str) -> COCO:
    """pycocotools' COCO index of one split, without its progress prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(root / "annotations" / f"instances_{split}2017.json"))


def erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary erosion with a 4-neighbourhood, `steps` times (outside the image counts as off)."""
    for _ in range(steps):
        p = np.pad(mask, 1)
        mask = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask


def dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary dilation with a 4-neighbourhood, `steps` times."""
    for _ in range(steps):
        p = np.pad(mask, 1)
        mask = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return mask


def all_files(root: Path) -> dict[str, bytes]:
    """Every file under root by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_annotations_agree_with_their_masks(dataset):
    """Fails if a json does not load in pycocotools, or an annotation's area or bbox is not that
    of its decoded mask (the loader and COCOeval trust both), or a mask is empty or off-image."""
    for split in SPLITS:
        coco = load_coco(dataset, split)
        assert coco.dataset["annotations"], split
        for ann in coco.dataset["annotations"]:
            image = coco.imgs[ann["image_id"]]
            assert (dataset / f"{split}2017" / image["file_name"]).is_file()
            mask = coco.annToMask(ann).astype(bool)
            assert mask.shape == (image["height"], image["width"])
            pixels = int(mask.sum())
            assert pixels > 0, ann["id"]
            assert abs(pixels - ann["area"]) <= max(0.05 * ann["area"], 20), ann["id"]
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            tight = [cols[0], rows[0], cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0]]
            assert np.allclose(ann["bbox"], tight, atol=1), (ann["id"], ann["bbox"], tight)
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
            assert all(isinstance(v, float) for v in ann["bbox"])


def test_every_coco_feature_occurs(dataset):
    """Fails if the dataset stops exercising a loader path: a segmentation format, crowd
    regions, images without objects, non-contiguous category ids, or both orientations."""
    coco = load_coco(dataset, "train")
    anns = coco.dataset["annotations"]
    polygons = [a for a in anns if isinstance(a["segmentation"], list)]
    compressed = [a for a in anns if isinstance(a["segmentation"], dict)
                  and isinstance(a["segmentation"]["counts"], str)]
    uncompressed = [a for a in anns if isinstance(a["segmentation"], dict)
                    and isinstance(a["segmentation"]["counts"], list)]
    assert polygons and compressed and uncompressed
    assert len(polygons) + len(compressed) + len(uncompressed) == len(anns)
    assert all(isinstance(v, float) for a in polygons for poly in a["segmentation"] for v in poly)
    assert all(a["iscrowd"] == 1 for a in uncompressed)
    assert all(a["iscrowd"] == 0 for a in polygons + compressed)
    assert any(not coco.getAnnIds(imgIds=image_id) for image_id in coco.imgs)

    ids = sorted(c["id"] for c in coco.dataset["categories"])
    assert ids == sorted(c["id"] for c in CATEGORIES) and len(ids) == 5
    assert ids != list(range(1, len(ids) + 1))
    assert {a["category_id"] for a in anns} == set(ids)

    sizes = [(i["height"], i["width"]) for split in SPLITS
             for i in load_coco(dataset, split).dataset["images"]]
    assert any(w > h for h, w in sizes) and any(h > w for h, w in sizes)
    assert all(192 <= s <= 320 for size in sizes for s in size)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    """Fails if generation is not reproducible (a cached dataset would differ from a fresh one
    and runs would not be comparable), or if the seed is ignored."""
    kwargs = {"num_train": 24, "num_val": 8}
    first = all_files(generate_synthetic_coco(tmp_path / "a", seed=0, **kwargs))
    second = all_files(generate_synthetic_coco(tmp_path / "b", seed=0, **kwargs))
    other = all_files(generate_synthetic_coco(tmp_path / "c", seed=1, **kwargs))
    assert len(first) == 2 + 24 + 8
    assert first.keys() == second.keys()
    for name, data in first.items():
        assert data == second[name], name
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first if name.startswith("annotations"))
    assert sum(first[name] != other[name] for name in first) == len(first)


def test_masks_cover_the_drawn_shapes(dataset):
    """Fails if masks are misaligned with the drawn shapes: each shape is one flat colour (plus
    noise), so the inside of an aligned mask is uniform and differs from just outside it."""
    coco = load_coco(dataset, "train")

    def scores(image: np.ndarray, mask: np.ndarray, inner: np.ndarray) -> tuple[float, float]:
        pixels = image[inner]
        uniform = np.mean(np.linalg.norm(pixels - np.median(pixels, axis=0), axis=1) < 40)
        outside = dilate(mask, 5) & ~dilate(mask, 2)
        contrast = np.linalg.norm(image[outside].mean(axis=0) - pixels.mean(axis=0))
        return float(uniform), float(contrast)

    aligned, shifted = [], []
    for ann in coco.dataset["annotations"]:
        mask = coco.annToMask(ann).astype(bool)
        moved = np.roll(mask, 3, axis=1)
        inner, moved_inner = erode(mask, 2), erode(moved, 2)  # away from edges blurred by JPEG
        if ann["iscrowd"] or min(inner.sum(), moved_inner.sum()) < 20:  # too thin to judge
            continue
        file_name = coco.imgs[ann["image_id"]]["file_name"]
        image = np.asarray(Image.open(dataset / "train2017" / file_name), dtype=np.float64)
        aligned.append(scores(image, mask, inner))
        shifted.append(scores(image, moved, moved_inner))
    aligned, shifted = np.array(aligned), np.array(shifted)
    assert len(aligned) >= 50
    assert aligned[:, 0].min() >= 0.95  # every mask's interior is one colour
    assert np.mean(aligned[:, 1] > 60) >= 0.9  # nearly every shape stands out
    # The same check on masks moved by 3 px fails for most, so it can see a misalignment.
    assert np.mean(shifted[:, 0] >= 0.95) < 0.5


def test_ensure_generates_once_and_atomically(tmp_path):
    """Fails if ensure_synthetic_coco regenerates a finished dataset (slow start-up, races
    between workers), keeps a dataset made with other arguments, or leaves temporary folders."""
    root = tmp_path / "synthetic"
    kwargs = {"seed": 0, "num_train": 4, "num_val": 2}
    assert ensure_synthetic_coco(root, **kwargs) == root
    ready = root / "READY"
    stamp, mtime = ready.read_text(), ready.stat().st_mtime_ns
    assert json.loads(stamp)["num_train"] == 4
    assert (root / "annotations" / "instances_val2017.json").is_file()

    assert ensure_synthetic_coco(root, **kwargs) == root
    assert ready.stat().st_mtime_ns == mtime and ready.read_text() == stamp

    ensure_synthetic_coco(root, **{**kwargs, "seed": 1})
    assert ready.read_text() != stamp
    assert json.loads(ready.read_text())["seed"] == 1
    assert len(list((root / "train2017").iterdir())) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic"]


def test_ensure_refuses_to_replace_a_foreign_folder(tmp_path):
    """Fails if ensure_synthetic_coco would delete a non-empty folder it did not write (a
    mistyped path would lose the user's files)."""
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        ensure_synthetic_coco(root, num_train=2, num_val=1)
    assert (root / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
