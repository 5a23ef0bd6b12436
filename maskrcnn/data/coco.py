"""Reading a COCO instances json into per-image records of training targets.

Every entry is checked when the file is read, so a malformed one stops the run before
training starts, with one line naming the file, the annotation or image id and what is wrong
(`_image_problem`, `_annotation_problem`). What the file holds and what training uses differ in
a few counted ways (`CocoStats`):
- crowd annotations (iscrowd=1) are not training targets; evaluation still sees them, since it
  scores against the original file;
- boxes are clipped to the image; a box with a side under MIN_BOX_SIDE after clipping is dropped;
- polygons of fewer than 3 points (real COCO files hold a few) are dropped, and so is an
  annotation left without any polygon, as Detectron2 does; pycocotools would read a 4-number
  polygon as a box;
- images left with no targets are skipped in training and kept in evaluation;
- category ids, which COCO leaves non-contiguous (1..90 for 80 classes), map to 1..K in sorted
  order; 0 is the background. `category_ids[k]` maps class k back.
"""

import contextlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

# Boxes thinner than one pixel after clipping have no visible object to learn from.
MIN_BOX_SIDE = 1.0
# A polygon needs 3 points, 6 coordinates, to enclose anything.
MIN_POLYGON_COORDS = 6


class DatasetError(RuntimeError):
    """Bad input data; str(error) is one line naming the file (and annotation or image)."""


@dataclass
class ImageRecord:
    """One image and its training targets, in original image pixels.

    boxes: float32[T, 4] (x1, y1, x2, y2), clipped to the image.
    classes: int64[T] in 1..K.
    segmentations: T COCO segmentations (polygon list or RLE dict), as in the file, less
        the polygons of fewer than 3 points.
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
    """What reading the file left out or changed, for the log."""

    images: int = 0
    annotations: int = 0
    crowd: int = 0
    clipped_boxes: int = 0
    dropped_boxes: int = 0
    dropped_polygons: int = 0  # polygons of fewer than 3 points, removed from their annotation
    dropped_segmentations: int = 0  # annotations left without any polygon, not targets
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


def _segmentation_problem(segm, height: int, width: int) -> str | None:
    """The reason a segmentation is malformed, or None. Polygons of fewer than 3 points and
    empty polygon lists are not malformed: the reader drops them (and counts them)."""
    if isinstance(segm, list):
        for polygon in segm:
            if not isinstance(polygon, list):
                return f"a polygon must be a list of coordinates, not {_show(polygon)}"
            if not all(is_number(v) for v in polygon):
                return f"polygon coordinates must be finite numbers: {_show(polygon)}"
            if len(polygon) % 2:
                return f"a polygon needs an even number of coordinates, not {len(polygon)}"
        return None
    if isinstance(segm, dict):
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
    return f"segmentation must be a polygon list or an RLE dict, not {type(segm).__name__}"


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


def _annotation_problem(ann, images: dict, category_ids: set) -> str | None:
    """The reason an annotation is malformed, or None."""
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
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
        return f"bbox must be 4 finite numbers [x, y, w, h], not {_show(bbox)}"
    if bbox[2] < 0 or bbox[3] < 0:
        return f"bbox width and height must not be negative: {_show(bbox)}"
    if ann.get("iscrowd", 0) not in (0, 1):  # True and False compare equal to 1 and 0
        return f"iscrowd must be 0 or 1, not {_show(ann['iscrowd'])}"
    if "area" in ann and not (is_number(ann["area"]) and ann["area"] >= 0):
        return f"area must be a non-negative number, not {_show(ann['area'])}"
    image = images[ann["image_id"]]
    return _segmentation_problem(ann["segmentation"], image["height"], image["width"])


def read_annotations(json_path: Path) -> dict:
    """A COCO instances json, every entry checked; a malformed one stops with one line
    naming the file, the entry and what is wrong."""
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
    annotation_ids = set()
    for ann in data["annotations"]:
        reason = _annotation_problem(ann, images, category_ids)
        if reason is None and ann["id"] in annotation_ids:
            reason = "its id appears twice in 'annotations'"
        if reason:
            raise DatasetError(f"{where}: {_annotation_name(ann)}: {reason}")
        annotation_ids.add(ann["id"])
    return data


class CocoDataset:
    """A COCO instances json and its image folder.

    Args:
        json_path: the instances json.
        image_dir: folder the images' file_name entries are relative to.
        train: if True, `records` holds only images with training targets, and a file left
            with none stops with a DatasetError.
    """

    def __init__(self, json_path: str | Path, image_dir: str | Path, *, train: bool):
        self.json_path = Path(json_path)
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise DatasetError(f"image folder {self.image_dir} (for {self.json_path}) "
                               "does not exist")
        self.coco = COCO()
        self.coco.dataset = read_annotations(self.json_path)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()
        self.category_ids = sorted(self.coco.cats)  # class k (1..K) is category_ids[k - 1]
        self.class_names = [self.coco.cats[c].get("name", str(c)) for c in self.category_ids]
        self.stats = CocoStats(images=len(self.coco.imgs), annotations=len(self.coco.anns))
        all_records = [self._record(image_id) for image_id in sorted(self.coco.imgs)]
        self.stats.images_without_targets = sum(len(r.classes) == 0 for r in all_records)
        self.records = [r for r in all_records if len(r.classes)] if train else all_records
        if train and not self.records:
            s = self.stats
            raise DatasetError(
                f"annotation file {self.json_path}: nothing to train on: none of its "
                f"{s.images} images has a usable annotation ({s.annotations} annotations: "
                f"{s.crowd} crowd, {s.dropped_boxes} with boxes under {MIN_BOX_SIDE:g} pixel, "
                f"{s.dropped_segmentations} without a polygon of 3 or more points)")
        for record in self.records:
            for k in record.classes.tolist():
                name = self.class_names[k - 1]
                self.stats.instances_per_class[name] = (
                    self.stats.instances_per_class.get(name, 0) + 1)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def _record(self, image_id: int) -> ImageRecord:
        image = self.coco.imgs[image_id]
        height, width = int(image["height"]), int(image["width"])
        class_of = {c: k for k, c in enumerate(self.category_ids, start=1)}
        boxes, classes, segmentations, areas = [], [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                self.stats.crowd += 1
                continue
            segm = ann["segmentation"]
            if isinstance(segm, list):
                kept = real_polygons(segm)
                self.stats.dropped_polygons += len(segm) - len(kept)
                if not kept:
                    self.stats.dropped_segmentations += 1
                    continue
                segm = kept
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
            segmentations.append(segm)
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
