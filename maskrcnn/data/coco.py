"""Reading a COCO instances json (train or val alike) into a cleaned dict and per-image
records of training targets.

`read_annotation_file` checks every entry. One the reader cannot place (missing keys, ids that
are not integers or point nowhere, a malformed image or category) stops the run before it
starts, with one line naming the file, the entry and what is wrong. A faulty annotation, the
kind hand-made files and labelling tools' exports carry (REASONS: a box of zero, negative or
non-finite size, a polygon of fewer than 3 points, an odd or non-finite coordinate list, an
empty segmentation, a malformed RLE), is dropped; of an annotation with several polygons only
the faulty ones are, as torchvision and Detectron2 skip them. A duplicate annotation id
(pycocotools keeps one annotation per id) is renumbered above the largest. Each change is
counted and named in a warning (`AnnotationFile.warnings`) and in the statistics (`describe`);
`data { bad_annotations: ERROR }` stops on the first instead. Evaluation scores against the
same cleaned dict (`CocoDataset.ground_truth`), never the raw file.

What training uses differs from the cleaned file in a few counted ways (`CocoStats`):
- crowd annotations (iscrowd=1) are not training targets; evaluation still sees them;
- boxes are clipped to the image; a box with a side under MIN_BOX_SIDE after clipping is dropped
  (evaluation keeps it);
- images left with no targets are skipped in training and kept in evaluation;
- category ids, which COCO leaves non-contiguous (1..90 for 80 classes), map to 1..K in sorted
  order; 0 is the background. `category_ids[k]` maps class k back.
"""

import contextlib
import io
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from maskrcnn.config.config_pb2 import DROP, ERROR

# Boxes thinner than one pixel after clipping have no visible object to learn from.
MIN_BOX_SIDE = 1.0
# A polygon needs 3 points, 6 coordinates, to enclose anything (pycocotools would read a
# 4-number polygon as a box, and fails on an empty polygon list).
MIN_POLYGON_COORDS = 6
# The faults of an annotation (or of one of its polygons), as the statistics name them.
BAD_BOX = "box not 4 finite numbers"
EMPTY_BOX = "box of zero or negative size"
BAD_AREA = "area not a non-negative number"
BAD_SEGMENTATION = "segmentation neither polygons nor RLE"
EMPTY_SEGMENTATION = "empty segmentation"
NONFINITE_POLYGON = "polygon with non-finite coordinates"
ODD_POLYGON = "polygon with an odd number of coordinates"
SHORT_POLYGON = "polygon of fewer than 3 points"
BAD_RLE = "malformed RLE"
REASONS = (BAD_BOX, EMPTY_BOX, BAD_AREA, BAD_SEGMENTATION, EMPTY_SEGMENTATION,
           NONFINITE_POLYGON, ODD_POLYGON, SHORT_POLYGON, BAD_RLE)
WARNING_EXAMPLES = 3  # faulty annotations named in the warning line


class DatasetError(RuntimeError):
    """Bad input data; str(error) is one line naming the file (and annotation or image)."""


@dataclass
class ImageRecord:
    """One image and its training targets, in original image pixels.

    boxes: float32[T, 4] (x1, y1, x2, y2), clipped to the image.
    classes: int64[T] in 1..K.
    segmentations: T COCO segmentations (polygon list or RLE dict), as in the file, less
        its faulty polygons.
    areas: float32[T] annotated areas (used to keep the G largest).
    """

    image_id: int
    path: Path
    height: int
    width: int
    boxes: np.ndarray
    classes: np.ndarray
    segmentations: list
    areas: np.ndarray


@dataclass
class CocoStats:
    """What reading the file left out or changed, for the log (`describe`).

    faulty: annotations dropped as faulty, by reason (REASONS); faulty_polygons: polygons
    dropped from annotations kept, by reason; renumbered: duplicate annotation ids renumbered.
    """

    images: int = 0
    annotations: int = 0
    crowd: int = 0
    clipped_boxes: int = 0
    dropped_boxes: int = 0
    faulty: dict = field(default_factory=dict)
    faulty_polygons: dict = field(default_factory=dict)
    renumbered: int = 0
    images_without_targets: int = 0
    instances_per_class: dict = field(default_factory=dict)


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"annotation file {path} does not exist")
    try:
        with path.open() as file:
            data = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"annotation file {path} is not readable JSON: {error}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DatasetError(f"annotation file {path} has no '{key}' list")
    return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite JSON number (json.load also accepts NaN and Infinity)."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def real_polygons(polygons: list) -> list:
    """The polygons of a COCO polygon segmentation that have 3 points or more."""
    return [polygon for polygon in polygons if len(polygon) >= MIN_POLYGON_COORDS]


def _show(value) -> str:
    """A value for an error message, cut to stay on one short line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def rle_string_counts(counts: str) -> list[int] | None:
    """The run lengths of a compressed COCO RLE string, or None if it is malformed.

    The format of pycocotools' rleToString: each run is a little-endian sequence of 5-bit
    chunks in characters 48..111 (bit 5 set: more chunks follow; bit 4 of the last chunk: the
    sign), and from the third run on each is stored as its difference to the run two before.
    pycocotools itself does not check it (a truncated string decodes to whatever follows it in
    memory), so the reader does.
    """
    runs: list[int] = []
    value, shift = 0, 0
    for char in counts:
        chunk = ord(char) - 48
        if not 0 <= chunk < 64:
            return None
        value |= (chunk & 0x1F) << shift
        shift += 5
        if chunk & 0x20:
            continue
        if chunk & 0x10:
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
        value, shift = 0, 0
    return runs if shift == 0 else None  # a last chunk that promised more is a truncation


def _rle_problem(segm: dict, height: int, width: int) -> str | None:
    """The reason an RLE segmentation is malformed, or None."""
    if "counts" not in segm or "size" not in segm:
        return "RLE needs 'counts' and 'size'"
    size, counts = segm["size"], segm["counts"]
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
        return f"RLE size must be [height, width], not {_show(size)}"
    if size != [height, width]:
        return f"RLE size {size} differs from the image size [{height}, {width}]"
    if isinstance(counts, str):
        runs = rle_string_counts(counts)
        if runs is None:
            return f"RLE counts string is malformed: {_show(counts)}"
    elif isinstance(counts, list):
        if not all(_is_int(v) and v >= 0 for v in counts):
            return "uncompressed RLE counts must be non-negative integers"
        runs = counts
    else:
        return "RLE counts must be a string or a list of run lengths"
    if sum(runs) != height * width:
        kind = "compressed" if isinstance(counts, str) else "uncompressed"
        return f"{kind} RLE runs sum to {sum(runs)}, not {height} x {width} = {height * width}"
    return None


def _polygon_fault(polygon: list) -> tuple[str, str] | None:
    """(reason, detail) of a faulty polygon, or None."""
    if not all(is_number(v) for v in polygon):
        return NONFINITE_POLYGON, f"polygon coordinates must be finite numbers: {_show(polygon)}"
    if len(polygon) % 2:
        return ODD_POLYGON, f"a polygon needs an even number of coordinates, not {len(polygon)}"
    if len(polygon) < MIN_POLYGON_COORDS:
        return SHORT_POLYGON, (f"a polygon needs 3 points or more, not {len(polygon) // 2}: "
                               f"{_show(polygon)}")
    return None


def _segmentation_faults(segm, height: int, width: int
                         ) -> tuple[tuple[str, str] | None, list, list[tuple[int, str, str]]]:
    """Checks a segmentation: (the annotation's fault as (reason, detail), or None; the
    segmentation without its faulty polygons; (index, reason, detail) of each faulty polygon).
    An annotation whose polygons are all faulty is faulty itself, for its first one's reason."""
    if isinstance(segm, dict):
        problem = _rle_problem(segm, height, width)
        return ((BAD_RLE, problem) if problem else None), segm, []
    if not isinstance(segm, list):
        return (BAD_SEGMENTATION, "segmentation must be a polygon list or an RLE dict, not "
                f"{type(segm).__name__}"), segm, []
    if not segm:
        return (EMPTY_SEGMENTATION, "segmentation is an empty polygon list"), segm, []
    for polygon in segm:
        if not isinstance(polygon, list):
            return (BAD_SEGMENTATION, "a polygon must be a list of coordinates, not "
                    f"{_show(polygon)}"), segm, []
    faults = [(i, *fault) for i, polygon in enumerate(segm)
              if (fault := _polygon_fault(polygon)) is not None]
    if len(faults) == len(segm):
        return faults[0][1:], segm, []
    bad = {i for i, _, _ in faults}
    return None, [p for i, p in enumerate(segm) if i not in bad], faults


def _geometry_fault(ann: dict, image: dict) -> tuple[tuple[str, str] | None, list,
                                                      list[tuple[int, str, str]]]:
    """An annotation's box, area and segmentation checked: as _segmentation_faults."""
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
        return (BAD_BOX, f"bbox must be 4 finite numbers [x, y, w, h], not {_show(bbox)}"), [], []
    if bbox[2] <= 0 or bbox[3] <= 0:
        return (EMPTY_BOX, f"bbox width and height must be positive: {_show(bbox)}"), [], []
    if "area" in ann and not (is_number(ann["area"]) and ann["area"] >= 0):
        return (BAD_AREA, f"area must be a non-negative number, not {_show(ann['area'])}"), [], []
    return _segmentation_faults(ann["segmentation"], image["height"], image["width"])


def _image_problem(image) -> str | None:
    """The reason an image entry is malformed, or None."""
    if not isinstance(image, dict):
        return "is not an object"
    for key in ("id", "file_name", "height", "width"):
        if key not in image:
            return f"lacks '{key}'"
    if not _is_int(image["id"]):
        return f"id must be an integer, not {_show(image['id'])}"
    if not (isinstance(image["file_name"], str) and image["file_name"]):
        return f"file_name must be a non-empty string, not {_show(image['file_name'])}"
    for key in ("height", "width"):
        if not (_is_int(image[key]) and image[key] > 0):
            return f"{key} must be a positive integer, not {_show(image[key])}"
    return None


def _annotation_name(ann) -> str:
    """How an error message names an annotation: its id and image, as far as it has them."""
    if not (isinstance(ann, dict) and "id" in ann):
        return f"an annotation {_show(ann)}"
    return f"annotation {_show(ann['id'])}" + (f" (image {_show(ann['image_id'])})"
                                              if "image_id" in ann else "")


def _structure_problem(ann, images: dict, category_ids: set) -> str | None:
    """The reason an annotation entry is not one the reader can place (whatever
    data.bad_annotations says), or None."""
    if not isinstance(ann, dict):
        return "is not an object"
    for key in ("id", "image_id", "category_id", "bbox", "segmentation"):
        if key not in ann:
            return f"missing '{key}'"
    for key in ("id", "image_id", "category_id"):
        if not _is_int(ann[key]):
            return f"{key} must be an integer, not {_show(ann[key])}"
    if ann["image_id"] not in images:
        return f"image_id {ann['image_id']} is not in 'images'"
    if ann["category_id"] not in category_ids:
        return f"category_id {ann['category_id']} is not in 'categories'"
    if ann.get("iscrowd", 0) not in (0, 1):  # True and False compare equal to 1 and 0
        return f"iscrowd must be 0 or 1, not {_show(ann['iscrowd'])}"
    return None


@dataclass(frozen=True)
class Fault:
    """A faulty annotation, or one faulty polygon of an annotation that is kept.

    reason: one of REASONS (what the statistics count); detail: the one-line message of
    data.bad_annotations ERROR; polygon: the polygon's index, or None for the annotation."""

    annotation_id: int
    image_id: int
    reason: str
    detail: str
    polygon: int | None = None

    def name(self) -> str:
        polygon = "" if self.polygon is None else f" polygon {self.polygon}"
        return f"annotation {self.annotation_id} (image {self.image_id}){polygon}"


@dataclass
class AnnotationFile:
    """A COCO instances json as read: `data` is the file with its faulty annotations and
    polygons left out and duplicate annotation ids renumbered; the rest says what changed.

    annotations: how many the file holds. dropped: the annotations left out. dropped_polygons:
    polygons left out of annotations that are kept. renumbered: (old id, new id) of each
    duplicate, in file order (the first annotation with an id keeps it)."""

    path: Path
    data: dict
    annotations: int
    dropped: list[Fault] = field(default_factory=list)
    dropped_polygons: list[Fault] = field(default_factory=list)
    renumbered: list[tuple[int, int]] = field(default_factory=list)

    def warnings(self) -> list[str]:
        """One line about the faulty annotations and polygons left out (the first few by
        name, and the count) and one about renumbered ids; none for a sound file."""
        lines = []
        faults = self.dropped + self.dropped_polygons
        if faults:
            shown = "; ".join(f"{f.name()}: {f.reason}" for f in faults[:WARNING_EXAMPLES])
            more = (f"; and {len(faults) - WARNING_EXAMPLES} more"
                    if len(faults) > WARNING_EXAMPLES else "")
            polygons = (f" and {len(self.dropped_polygons)} faulty polygon(s) of annotations "
                        "kept" if self.dropped_polygons else "")
            lines.append(f"warning: {self.path}: dropped {len(self.dropped)} of "
                         f"{self.annotations} annotations as faulty{polygons}: {shown}{more} "
                         "(data { bad_annotations: ERROR } stops on them instead)")
        if self.renumbered:
            (old, new), count = self.renumbered[0], len(self.renumbered)
            lines.append(f"warning: {self.path}: {count} annotation(s) reuse an id held by an "
                         f"earlier one; renumbered above the largest id (first: {old} -> {new}), "
                         "as pycocotools would keep only one of them")
        return lines


def _count(faults: list[Fault]) -> dict[str, int]:
    """{reason: count}, in REASONS' order."""
    counts = Counter(f.reason for f in faults)
    return {reason: counts[reason] for reason in REASONS if counts[reason]}


def read_annotation_file(json_path: Path, bad_annotations: int = DROP) -> AnnotationFile:
    """A COCO instances json, every entry checked, the same for a train and a val file.

    An entry the reader cannot place (missing keys, ids that are not integers or point
    nowhere, bad images or categories) stops with one line naming the file, the entry and
    what is wrong. A faulty annotation (REASONS) and a duplicate annotation id are dropped and
    renumbered (DROP: counted in the result) or stop the same way (ERROR)."""
    data = _load_json(json_path)
    where = f"annotation file {json_path}"
    images = {}
    for image in data["images"]:
        reason = _image_problem(image)
        if reason is None and image["id"] in images:
            reason = "appears twice in 'images'"
        if reason:
            name = (f"image {_show(image['id'])}" if isinstance(image, dict) and "id" in image
                    else f"an image entry {_show(image)}")
            raise DatasetError(f"{where}: {name}: {reason}")
        images[image["id"]] = image
    category_ids = set()
    for category in data["categories"]:
        if not (isinstance(category, dict) and _is_int(category.get("id"))):
            raise DatasetError(f"{where}: every category needs an integer 'id', not "
                               f"{_show(category)}")
        if category["id"] in category_ids:
            raise DatasetError(f"{where}: category {category['id']} appears twice")
        category_ids.add(category["id"])
    if not category_ids:
        raise DatasetError(f"{where}: 'categories' is empty")
    result = AnnotationFile(Path(json_path), data, len(data["annotations"]))
    kept, ids = [], set()
    for ann in data["annotations"]:
        problem = _structure_problem(ann, images, category_ids)
        if problem:
            raise DatasetError(f"{where}: {_annotation_name(ann)}: {problem}")
        fault, segm, polygon_faults = _geometry_fault(ann, images[ann["image_id"]])
        if bad_annotations == ERROR:
            if fault is None and polygon_faults:
                fault = polygon_faults[0][1:]
            if fault is None and ann["id"] in ids:
                fault = (None, "its id appears twice in 'annotations'")
            if fault is not None:
                raise DatasetError(f"{where}: {_annotation_name(ann)}: {fault[1]} "
                                   "(data.bad_annotations is ERROR)")
        if fault is not None:
            result.dropped.append(Fault(ann["id"], ann["image_id"], *fault))
            continue
        result.dropped_polygons += [Fault(ann["id"], ann["image_id"], reason, detail, index)
                                    for index, reason, detail in polygon_faults]
        if segm is not ann["segmentation"]:
            ann = {**ann, "segmentation": segm}
        kept.append(ann)
        ids.add(ann["id"])
    next_id = max((a["id"] for a in data["annotations"]), default=0) + 1
    seen = set()
    for index, ann in enumerate(kept):
        if ann["id"] in seen:
            result.renumbered.append((ann["id"], next_id))
            kept[index] = {**ann, "id": next_id}
            next_id += 1
        seen.add(kept[index]["id"])
    result.data = {**data, "annotations": kept}
    return result


def read_annotations(json_path: Path, bad_annotations: int = DROP) -> dict:
    """The checked and cleaned COCO dict of read_annotation_file."""
    return read_annotation_file(json_path, bad_annotations).data


class CocoDataset:
    """A COCO instances json and its image folder.

    Args:
        json_path: the instances json.
        image_dir: folder the images' file_name entries are relative to.
        train: if True, `records` holds only images with training targets, and a file left
            with none stops with a DatasetError.
        bad_annotations: data.bad_annotations: DROP (drop faulty annotations and count them)
            or ERROR (stop on the first).
    """

    def __init__(self, json_path: str | Path, image_dir: str | Path, *, train: bool,
                 bad_annotations: int = DROP):
        self.json_path = Path(json_path)
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise DatasetError(f"image folder {self.image_dir} (for {self.json_path}) "
                               "does not exist")
        self.file = read_annotation_file(self.json_path, bad_annotations)
        self.coco = COCO()
        self.coco.dataset = self.file.data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()
        self.category_ids = sorted(self.coco.cats)  # class k (1..K) is category_ids[k - 1]
        self.class_names = [self.coco.cats[c].get("name", str(c)) for c in self.category_ids]
        self.stats = CocoStats(
            images=len(self.coco.imgs), annotations=self.file.annotations,
            faulty=_count(self.file.dropped), faulty_polygons=_count(self.file.dropped_polygons),
            renumbered=len(self.file.renumbered))
        all_records = [self._record(image_id) for image_id in sorted(self.coco.imgs)]
        self.stats.images_without_targets = sum(len(r.classes) == 0 for r in all_records)
        self.records = [r for r in all_records if len(r.classes)] if train else all_records
        if train and not self.records:
            s = self.stats
            raise DatasetError(
                f"annotation file {self.json_path}: nothing to train on: none of its "
                f"{s.images} images has a usable annotation ({s.annotations} annotations: "
                f"{sum(s.faulty.values())} faulty, {s.crowd} crowd, {s.dropped_boxes} with "
                f"boxes under {MIN_BOX_SIDE:g} pixel)")
        for record in self.records:
            for k in record.classes.tolist():
                name = self.class_names[k - 1]
                self.stats.instances_per_class[name] = (
                    self.stats.instances_per_class.get(name, 0) + 1)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def ground_truth(self) -> dict:
        """The cleaned file as a dict for a COCO object of its own: evaluation scores against
        exactly what was read. Each annotation and image is a copy (COCOeval writes into
        them: it turns polygons into RLE and adds an 'ignore' field)."""
        data = self.file.data
        return {**data, "images": [dict(i) for i in data["images"]],
                "annotations": [dict(a) for a in data["annotations"]]}

    def _record(self, image_id: int) -> ImageRecord:
        image = self.coco.imgs[image_id]
        height, width = int(image["height"]), int(image["width"])
        class_of = {c: k for k, c in enumerate(self.category_ids, start=1)}
        boxes, classes, segmentations, areas = [], [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                self.stats.crowd += 1
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            box = np.array([x, y, x + w, y + h], dtype=np.float32)
            clipped = np.clip(box, 0, [width, height, width, height]).astype(np.float32)
            if clipped[2] - clipped[0] < MIN_BOX_SIDE or clipped[3] - clipped[1] < MIN_BOX_SIDE:
                self.stats.dropped_boxes += 1
                continue
            if not np.array_equal(clipped, box):
                self.stats.clipped_boxes += 1
            boxes.append(clipped)
            classes.append(class_of[ann["category_id"]])
            segmentations.append(ann["segmentation"])
            areas.append(float(ann.get("area", w * h)))
        return ImageRecord(
            image_id=image_id,
            path=self.image_dir / image["file_name"],
            height=height,
            width=width,
            boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
            classes=np.array(classes, dtype=np.int64),
            segmentations=segmentations,
            areas=np.array(areas, dtype=np.float32),
        )

    def check_images_exist(self) -> None:
        """Stops on the first listed image that is not on disk (cheap: no decoding)."""
        for record in self.records:
            if not record.path.is_file():
                raise DatasetError(f"image {record.path} (listed in {self.json_path}) "
                                   "does not exist")


def describe(name: str, coco: CocoDataset) -> str:
    """The statistics the commands print for a split: the warning lines of its file (faulty
    annotations dropped, ids renumbered), then what it holds and what training uses of it."""
    s = coco.stats
    classes = ", ".join(f"{k}: {v}" for k, v in sorted(s.instances_per_class.items()))

    def by_reason(counts: dict) -> str:
        total = sum(counts.values())
        return f"{total}" + (f" ({', '.join(f'{k}: {v}' for k, v in counts.items())})"
                             if total else "")

    return "\n".join([
        *coco.file.warnings(),
        f"{name}: {coco.json_path}",
        f"  {s.images} images, {s.annotations} annotations, {len(coco.records)} images used",
        f"  faulty annotations dropped: {by_reason(s.faulty)}",
        f"  faulty polygons dropped from annotations kept: {by_reason(s.faulty_polygons)}",
        f"  duplicate annotation ids renumbered: {s.renumbered}",
        f"  crowd annotations (not training targets): {s.crowd}",
        f"  boxes clipped to the image: {s.clipped_boxes}, dropped as under {MIN_BOX_SIDE:g} "
        f"pixel (training only): {s.dropped_boxes}",
        f"  images without targets: {s.images_without_targets}",
        f"  instances per class: {classes}"])
