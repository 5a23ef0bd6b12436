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


def _ann(**fields):
    """A mutation that sets fields of the one annotation."""
    return lambda d: d["annotations"][0].update(fields)


def _image(**fields):
    return lambda d: d["images"][0].update(fields)


# A compressed RLE of a 4 x 3 mask (runs 5, 2, 5): valid, but for the wrong image size here.
RLE_4X3 = "525"


@pytest.mark.parametrize("mutate, message", [
    # missing keys
    (lambda d: d["annotations"][0].pop("bbox"), "annotation 1 (image 1): missing 'bbox'"),
    (lambda d: d["annotations"][0].pop("segmentation"), "missing 'segmentation'"),
    (lambda d: d["images"][0].pop("file_name"), "image 1: lacks 'file_name'"),
    (lambda d: d["images"][0].pop("height"), "image 1: lacks 'height'"),
    (lambda d: d.pop("categories"), "has no 'categories' list"),
    (lambda d: d.update(categories=[{"name": "cat"}]), "every category needs an integer 'id'"),
    # wrong types and values
    (_ann(bbox=[1, 2, 3]), "annotation 1 (image 1): bbox must be 4 finite numbers"),
    (_ann(bbox=["1", "1", "10", "10"]), "bbox must be 4 finite numbers"),
    (_ann(bbox=[1, 1, float("nan"), 10]), "bbox must be 4 finite numbers"),
    (_ann(bbox=[1, 1, -10, 10]), "must not be negative"),
    (_ann(category_id="3"), "category_id must be an integer, not '3'"),
    (_ann(image_id=1.5), "image_id must be an integer"),
    (_ann(id="a"), "id must be an integer"),
    (_ann(iscrowd="0"), "iscrowd must be 0 or 1, not '0'"),
    (_ann(area="100"), "area must be a non-negative number"),
    (_ann(category_id=99), "category_id 99 is not in"),
    (_ann(image_id=5), "image_id 5 is not in"),
    (_image(height="40"), "image 1: height must be a positive integer, not '40'"),
    (_image(width=0), "width must be a positive integer"),
    (_image(id="1"), "id must be an integer"),
    (lambda d: d["images"].append(7), "an image entry 7: is not an object"),
    (lambda d: d["annotations"].append([1, 2]), "an annotation [1, 2]: is not an object"),
    # segmentations
    (_ann(segmentation=[[1, 2, 3, 4, 5, 6, 7]]), "even number of coordinates, not 7"),
    (_ann(segmentation=[[1, 2, "3", 4, 5, 6]]), "polygon coordinates must be finite numbers"),
    (_ann(segmentation=[1, 2, 3, 4, 5, 6]), "a polygon must be a list of coordinates"),
    (_ann(segmentation="x"), "polygon list or an RLE dict, not str"),
    (_ann(segmentation=7), "polygon list or an RLE dict, not int"),
    (_ann(segmentation={"counts": "ab"}), "RLE needs 'counts' and 'size'"),
    (_ann(segmentation={"counts": [1], "size": [40, 40]}), "runs sum to 1, not 40 x 40"),
    (_ann(segmentation={"counts": [1, -2, 1601], "size": [40, 40]}), "non-negative integers"),
    (_ann(segmentation={"counts": 5, "size": [40, 40]}), "RLE counts must be a string or"),
    (_ann(segmentation={"counts": RLE_4X3, "size": [4, 3]}), "differs from the image size"),
    (_ann(segmentation={"counts": RLE_4X3, "size": "40x40"}), "RLE size must be [height, w"),
    (_ann(segmentation={"counts": RLE_4X3, "size": [40, 40]}),
     "compressed RLE runs sum to 12, not 40 x 40 = 1600"),
    (_ann(segmentation={"counts": "P\x7fQ", "size": [40, 40]}), "counts string is malformed"),
    (_ann(segmentation={"counts": "5o", "size": [40, 40]}), "counts string is malformed"),
    # duplicates
    (lambda d: d["images"].append(dict(d["images"][0])), "image 1: appears twice in 'images'"),
    (lambda d: d["annotations"].append(dict(d["annotations"][0])),
     "annotation 1 (image 1): its id appears twice"),
    (lambda d: d["categories"].append(dict(d["categories"][0])), "category 3 appears twice"),
    # nothing left to train on
    (_ann(iscrowd=1), "nothing to train on: none of its 1 images has a usable annotation (1 "
     "annotations: 1 crowd"),
    (_ann(segmentation=[[1, 1, 5, 5]]), "nothing to train on"),
])
def test_malformed_annotations_are_named(tmp_path, mutate, message):
    """If this fails, a malformed file crashes with a traceback (or later, in a loader worker)
    or with a message that does not name the file, the entry and what is wrong."""
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


def test_rle_string_parser_reads_what_pycocotools_writes():
    """If this fails, the reader rejects valid compressed RLE or misreads its run lengths
    (so it would accept wrong-sized masks or reject real crowd regions)."""
    from pycocotools import mask as mask_utils

    from maskrcnn.data.coco import rle_string_counts

    rng = np.random.default_rng(0)
    for height, width, density in [(1, 1, 0.5), (7, 5, 0.1), (64, 48, 0.5), (300, 200, 0.97)]:
        bitmap = (rng.random((height, width)) < density).astype(np.uint8)
        bitmap[: height // 2, : width // 3] = 1  # long runs need several 5-bit chunks
        counts = mask_utils.encode(np.asfortranarray(bitmap))["counts"].decode()
        runs = rle_string_counts(counts)
        flat = bitmap.ravel(order="F")  # COCO runs go down the columns, zeros first
        changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
        expected = np.diff(np.concatenate([[0], changes])).tolist()
        assert runs == expected and sum(runs) == height * width


def test_degenerate_polygons_are_dropped_and_counted(tmp_path):
    """If this fails, a polygon of fewer than 3 points (real COCO files hold a few) stops the
    run, or reaches pycocotools (which reads a 4-number polygon as a box), or an annotation
    with no real polygon left becomes a target with an empty mask; or the log misses it."""
    images = [{"id": 1, "file_name": "a.jpg", "height": 40, "width": 40}]
    annotations = [
        {"image_id": 1, "category_id": 3, "bbox": [1, 1, 10, 10],  # one of two polygons bad
         "segmentation": [[1, 1, 11, 1], *square(1, 1, 10)]},
        {"image_id": 1, "category_id": 17, "bbox": [20, 20, 5, 5],  # only degenerate ones
         "segmentation": [[20, 20, 25, 25], [20, 20]]},
        {"image_id": 1, "category_id": 17, "bbox": [20, 20, 5, 5], "segmentation": []},
    ]
    coco = CocoDataset(*write_coco(tmp_path, images, annotations), train=True)
    (record,) = coco.records
    assert record.classes.tolist() == [1]
    assert record.segmentations == [square(1, 1, 10)]
    assert coco.stats.dropped_polygons == 3 and coco.stats.dropped_segmentations == 2
