"""Reading COCO files: formats, crowd, id mapping, degenerate boxes, faulty annotations
(dropped, or a stop under data.bad_annotations ERROR) and every bad input."""

import json

import numpy as np
import pytest

from maskrcnn.config.config_pb2 import ERROR
from maskrcnn.data.coco import (
    BAD_AREA,
    BAD_BOX,
    BAD_RLE,
    BAD_SEGMENTATION,
    EMPTY_BOX,
    EMPTY_SEGMENTATION,
    NONFINITE_POLYGON,
    ODD_POLYGON,
    SHORT_POLYGON,
    CocoDataset,
    DatasetError,
    describe,
)
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
    (_ann(category_id="3"), "category_id must be an integer, not '3'"),
    (_ann(image_id=1.5), "image_id must be an integer"),
    (_ann(id="a"), "id must be an integer"),
    (_ann(iscrowd="0"), "iscrowd must be 0 or 1, not '0'"),
    (_ann(category_id=99), "category_id 99 is not in"),
    (_ann(image_id=5), "image_id 5 is not in"),
    (_image(height="40"), "image 1: height must be a positive integer, not '40'"),
    (_image(width=0), "width must be a positive integer"),
    (_image(id="1"), "id must be an integer"),
    (lambda d: d["images"].append(7), "an image entry 7: is not an object"),
    (lambda d: d["annotations"].append([1, 2]), "an annotation [1, 2]: is not an object"),
    # duplicates
    (lambda d: d["images"].append(dict(d["images"][0])), "image 1: appears twice in 'images'"),
    (lambda d: d["categories"].append(dict(d["categories"][0])), "category 3 appears twice"),
    # nothing left to train on
    (_ann(iscrowd=1), "nothing to train on: none of its 1 images has a usable annotation (1 "
     "annotations: 0 faulty, 1 crowd"),
    (_ann(segmentation=[[1, 1, 5, 5]]), "nothing to train on: none of its 1 images has a "
     "usable annotation (1 annotations: 1 faulty"),
])
def test_malformed_entries_are_named(tmp_path, mutate, message):
    """If this fails, a file the reader cannot place (or one left with nothing to train on)
    crashes with a traceback (or later, in a loader worker) or with a message that does not
    name the file, the entry and what is wrong."""
    json_path, image_dir = _bad(tmp_path, mutate)
    with pytest.raises(DatasetError) as caught:
        CocoDataset(json_path, image_dir, train=True)
    assert message in str(caught.value) and str(json_path) in str(caught.value)
    assert "\n" not in str(caught.value)


# Each faulty annotation: how it is made, the reason DROP counts it under, and the one line
# ERROR stops with.
FAULTS = [
    (_ann(bbox=[1, 2, 3]), BAD_BOX, "bbox must be 4 finite numbers"),
    (_ann(bbox=["1", "1", "10", "10"]), BAD_BOX, "bbox must be 4 finite numbers"),
    (_ann(bbox=[1, 1, float("nan"), 10]), BAD_BOX, "bbox must be 4 finite numbers"),
    (_ann(bbox=[1, 1, float("inf"), 10]), BAD_BOX, "bbox must be 4 finite numbers"),
    (_ann(bbox=[1, None, 10, 10]), BAD_BOX, "bbox must be 4 finite numbers"),
    (_ann(bbox=[1, 1, -10, 10]), EMPTY_BOX, "width and height must be positive"),
    (_ann(bbox=[1, 1, 10, 0]), EMPTY_BOX, "width and height must be positive"),
    (_ann(area="100"), BAD_AREA, "area must be a non-negative number"),
    (_ann(area=-5.0), BAD_AREA, "area must be a non-negative number"),
    (_ann(segmentation=[[1, 2, 3, 4, 5, 6, 7]]), ODD_POLYGON, "even number of coordinates, "
     "not 7"),
    (_ann(segmentation=[[1, 2, "3", 4, 5, 6]]), NONFINITE_POLYGON, "polygon coordinates must "
     "be finite numbers"),
    (_ann(segmentation=[[1, 2, float("nan"), 4, 5, 6]]), NONFINITE_POLYGON, "finite numbers"),
    (_ann(segmentation=[[1, 1, 5, 5]]), SHORT_POLYGON, "needs 3 points or more, not 2"),
    (_ann(segmentation=[]), EMPTY_SEGMENTATION, "empty polygon list"),
    (_ann(segmentation=[1, 2, 3, 4, 5, 6]), BAD_SEGMENTATION, "a polygon must be a list of "
     "coordinates"),
    (_ann(segmentation="x"), BAD_SEGMENTATION, "polygon list or an RLE dict, not str"),
    (_ann(segmentation=7), BAD_SEGMENTATION, "polygon list or an RLE dict, not int"),
    (_ann(segmentation={"counts": "ab"}), BAD_RLE, "RLE needs 'counts' and 'size'"),
    (_ann(segmentation={"counts": [1], "size": [40, 40]}), BAD_RLE, "runs sum to 1, not 40 x "
     "40"),
    (_ann(segmentation={"counts": [1, -2, 1601], "size": [40, 40]}), BAD_RLE,
     "non-negative integers"),
    (_ann(segmentation={"counts": 5, "size": [40, 40]}), BAD_RLE, "RLE counts must be a "
     "string or"),
    (_ann(segmentation={"counts": RLE_4X3, "size": [4, 3]}), BAD_RLE, "differs from the "
     "image size"),
    (_ann(segmentation={"counts": RLE_4X3, "size": "40x40"}), BAD_RLE, "RLE size must be "
     "[height, w"),
    (_ann(segmentation={"counts": RLE_4X3, "size": [40, 40]}), BAD_RLE,
     "compressed RLE runs sum to 12, not 40 x 40 = 1600"),
    (_ann(segmentation={"counts": "P\x7fQ", "size": [40, 40]}), BAD_RLE, "counts string is "
     "malformed"),
    (_ann(segmentation={"counts": "5o", "size": [40, 40]}), BAD_RLE, "counts string is "
     "malformed"),
]


def _with_sound_annotation(mutate):
    """The mutation on annotation 1, with a sound annotation 2 beside it (so that a file
    that drops annotation 1 still has something to train on)."""
    def both(data):
        data["annotations"].append({**data["annotations"][0], "id": 2})
        mutate(data)
    return both


@pytest.mark.parametrize("mutate, reason, message", FAULTS)
def test_a_faulty_annotation_is_dropped_and_named(tmp_path, mutate, reason, message):
    """If this fails, a faulty annotation of a hand-made file stops the run (or crashes
    pycocotools later) by default, or is kept, or is dropped without its file, id, image and
    reason in the warning and the statistics."""
    json_path, image_dir = _bad(tmp_path, _with_sound_annotation(mutate))
    coco = CocoDataset(json_path, image_dir, train=True)
    assert [a["id"] for a in coco.file.data["annotations"]] == [2]
    assert [len(r.classes) for r in coco.records] == [1]
    assert coco.stats.faulty == {reason: 1} and coco.stats.faulty_polygons == {}
    (warning,) = coco.file.warnings()
    assert warning == (f"warning: {json_path}: dropped 1 of 2 annotations as faulty: "
                       f"annotation 1 (image 1): {reason} "
                       "(data { bad_annotations: ERROR } stops on them instead)")
    assert f"  faulty annotations dropped: 1 ({reason}: 1)" in describe("train", coco)


@pytest.mark.parametrize("mutate, reason, message", FAULTS)
def test_a_faulty_annotation_stops_the_run_under_error(tmp_path, mutate, reason, message):
    """If this fails, data.bad_annotations ERROR lets a faulty annotation through, or stops
    without one line that names the file, the annotation and the fault."""
    json_path, image_dir = _bad(tmp_path, _with_sound_annotation(mutate))
    with pytest.raises(DatasetError) as caught:
        CocoDataset(json_path, image_dir, train=True, bad_annotations=ERROR)
    text = str(caught.value)
    assert text.startswith(f"annotation file {json_path}: annotation 1 (image 1): ")
    assert message in text and "(data.bad_annotations is ERROR)" in text and "\n" not in text


def test_duplicate_annotation_ids_are_renumbered(tmp_path):
    """If this fails, annotations that share an id are lost (pycocotools keeps one of them)
    or stop the run by default, their new ids collide with others, or the warning does not
    say how many were renumbered; or ERROR does not stop on them."""
    def duplicates(data):
        first = data["annotations"][0]
        data["annotations"] += [{**first, "id": 7}, {**first, "id": 1}, {**first, "id": 7}]
    json_path, image_dir = _bad(tmp_path, duplicates)
    coco = CocoDataset(json_path, image_dir, train=True)
    assert [a["id"] for a in coco.file.data["annotations"]] == [1, 7, 8, 9]
    assert len(coco.coco.anns) == 4 and len(coco.records[0].classes) == 4
    assert coco.stats.renumbered == 2 and coco.stats.faulty == {}
    (warning,) = coco.file.warnings()
    assert warning.startswith(f"warning: {json_path}: 2 annotation(s) reuse an id held by an "
                              "earlier one; renumbered above the largest id (first: 1 -> 8)")
    assert "  duplicate annotation ids renumbered: 2" in describe("train", coco)
    with pytest.raises(DatasetError, match=r"annotation 1 \(image 1\): its id appears twice"):
        CocoDataset(json_path, image_dir, train=True, bad_annotations=ERROR)


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


def test_only_the_faulty_polygons_of_an_annotation_are_dropped(tmp_path):
    """If this fails, one faulty polygon of several loses its whole annotation (or reaches
    pycocotools, which reads a 4-number polygon as a box and fails on an empty list), an
    annotation with no sound polygon left becomes a target with an empty mask, faulty crowd
    regions are kept, or the statistics miss them."""
    images = [{"id": 1, "file_name": "a.jpg", "height": 40, "width": 40}]
    annotations = [
        {"image_id": 1, "category_id": 3, "bbox": [1, 1, 10, 10],  # two of three polygons bad
         "segmentation": [[1, 1, 11, 1], *square(1, 1, 10), [1, 2, 3]]},
        {"image_id": 1, "category_id": 17, "bbox": [20, 20, 5, 5],  # only degenerate ones
         "segmentation": [[20, 20, 25, 25], [20, 20]]},
        {"image_id": 1, "category_id": 17, "bbox": [20, 20, 5, 5], "segmentation": []},
        {"image_id": 1, "category_id": 17, "bbox": [0, 0, 40, 40], "iscrowd": 1,  # crowd
         "segmentation": {"counts": [0, 1599], "size": [40, 40]}},
        {"image_id": 1, "category_id": 17, "bbox": [0, 0, 40, 40], "iscrowd": 1,
         "segmentation": {"counts": [0, 1600], "size": [40, 40]}},
    ]
    coco = CocoDataset(*write_coco(tmp_path, images, annotations), train=True)
    (record,) = coco.records
    assert record.classes.tolist() == [1]
    assert record.segmentations == [square(1, 1, 10)]
    assert [a["id"] for a in coco.file.data["annotations"]] == [1, 5]
    assert coco.stats.crowd == 1
    assert coco.stats.faulty == {EMPTY_SEGMENTATION: 1, SHORT_POLYGON: 1, BAD_RLE: 1}
    assert coco.stats.faulty_polygons == {ODD_POLYGON: 1, SHORT_POLYGON: 1}
    (warning,) = coco.file.warnings()
    assert warning.startswith(
        f"warning: {coco.json_path}: dropped 3 of 5 annotations as faulty and 2 faulty "
        f"polygon(s) of annotations kept: annotation 2 (image 1): {SHORT_POLYGON}; "
        f"annotation 3 (image 1): {EMPTY_SEGMENTATION}; annotation 4 (image 1): {BAD_RLE}; "
        "and 2 more (")
    text = describe("val", coco)
    assert (f"  faulty annotations dropped: 3 ({EMPTY_SEGMENTATION}: 1, {SHORT_POLYGON}: 1, "
            f"{BAD_RLE}: 1)") in text
    assert (f"  faulty polygons dropped from annotations kept: 2 ({ODD_POLYGON}: 1, "
            f"{SHORT_POLYGON}: 1)") in text


def test_a_sound_file_has_no_warning(small_coco):
    """If this fails, a sound file (the pipeline's own test data) gets a warning or a drop
    it does not deserve."""
    coco = CocoDataset(*small_coco, train=True)
    assert coco.file.warnings() == [] and coco.file.data["annotations"] == json.loads(
        small_coco[0].read_text())["annotations"]
    text = describe("train", coco)
    assert "  faulty annotations dropped: 0\n" in text and "warning" not in text
