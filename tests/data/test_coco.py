"""Reading COCO files: formats, crowd, id mapping, degenerate boxes, and every bad input."""

import json

import numpy as np
import pytest

from maskrcnn.data.coco import CocoDataset, DatasetError
from tests.data.conftest import square, write_coco


def test_reads_targets_and_counts_what_it_changed(small_coco):
    """If this fails, targets are lost or invented, or the log misreports the changes."""
    json_path, image_dir = small_coco
    coco = CocoDataset(json_path, image_dir, train=True)
    assert [r.image_id for r in coco.records] == [10, 20]  # image 30 has no targets
    a, b = coco.records
    np.testing.assert_allclose(a.boxes, [[10, 10, 30, 30], [70, 50, 80, 60]])  # clipped
    assert a.classes.tolist() == [1, 2] and b.classes.tolist() == [2]  # ids 3, 17 -> 1, 2
    assert isinstance(b.segmentations[0], dict)
    assert coco.stats.crowd == 1 and coco.stats.clipped_boxes == 1
    assert coco.stats.dropped_boxes == 1 and coco.stats.images_without_targets == 1
    assert coco.category_ids == [3, 17] and coco.class_names == ["cat", "dog"]
    assert coco.stats.instances_per_class == {"cat": 1, "dog": 2}


def test_evaluation_keeps_images_without_targets(small_coco):
    """If this fails, evaluation would silently skip images (wrong AP)."""
    coco = CocoDataset(*small_coco, train=False)
    assert [r.image_id for r in coco.records] == [10, 20, 30]
    assert len(coco.records[2].classes) == 0


def test_uncompressed_rle_is_accepted(tmp_path):
    """If this fails, non-crowd uncompressed RLE (valid COCO) is rejected."""
    images = [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 3}]
    annotations = [{"image_id": 1, "category_id": 3, "bbox": [0, 1, 1, 2],
                    "segmentation": {"counts": [1, 2, 9], "size": [4, 3]}}]
    coco = CocoDataset(*write_coco(tmp_path, images, annotations), train=True)
    assert len(coco.records) == 1


def _bad(tmp_path, mutate):
    images = [{"id": 1, "file_name": "a.jpg", "height": 40, "width": 40}]
    annotations = [{"image_id": 1, "category_id": 3, "bbox": [1, 1, 10, 10],
                    "segmentation": square(1, 1, 10)}]
    json_path, image_dir = write_coco(tmp_path, images, annotations)
    data = json.loads(json_path.read_text())
    mutate(data)
    json_path.write_text(json.dumps(data))
    return json_path, image_dir


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["annotations"][0].pop("bbox"), "annotation 1: missing 'bbox'"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "annotation 1: bbox must be 4"),
    (lambda d: d["annotations"][0].update(category_id=99), "category_id 99 is not in"),
    (lambda d: d["annotations"][0].update(image_id=5), "image_id 5 is not in"),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3]]), "even number"),
    (lambda d: d["annotations"][0].update(segmentation="x"), "polygon list or an RLE dict"),
    (lambda d: d["annotations"][0].update(segmentation={"counts": [1], "size": [40, 40]}),
     "runs sum to 1"),
    (lambda d: d["annotations"][0].update(segmentation={"counts": "ab", "size": [9, 9]}),
     "differs from the image size"),
    (lambda d: d.pop("categories"), "has no 'categories' list"),
    (lambda d: d["images"][0].pop("file_name"), "lacks id, file_name"),
])
def test_malformed_annotations_are_named(tmp_path, mutate, message):
    """If this fails, a malformed file crashes with a traceback or a vague message."""
    json_path, image_dir = _bad(tmp_path, mutate)
    with pytest.raises(DatasetError) as caught:
        CocoDataset(json_path, image_dir, train=True)
    assert message in str(caught.value) and str(json_path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_or_broken_files(tmp_path):
    """If this fails, a missing or corrupt json or image folder is not named in the error."""
    json_path, image_dir = _bad(tmp_path, lambda d: None)
    with pytest.raises(DatasetError, match="does not exist"):
        CocoDataset(tmp_path / "nope.json", image_dir, train=True)
    with pytest.raises(DatasetError, match="image folder .*nope"):
        CocoDataset(json_path, tmp_path / "nope", train=True)
    json_path.write_text('{"images": [')
    with pytest.raises(DatasetError, match="not readable JSON"):
        CocoDataset(json_path, image_dir, train=True)


def test_missing_image_is_named_with_its_annotation_file(tmp_path):
    """If this fails, a missing image file surfaces late or without naming the files."""
    json_path, image_dir = _bad(tmp_path, lambda d: None)
    (image_dir / "a.jpg").unlink()
    coco = CocoDataset(json_path, image_dir, train=True)
    with pytest.raises(DatasetError, match=r"image .*a\.jpg \(listed in .*ann\.json\) does not"):
        coco.check_images_exist()
