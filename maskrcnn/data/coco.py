"""Reading a COCO instances json into per-image records of training targets.

Every annotation is checked when the file is read, so a malformed one stops the run before
training starts, with one line naming the annotation and the file. What the file holds and what
training uses differ in a few counted ways (`CocoStats`):
- crowd annotations (iscrowd=1) are not training targets; evaluation still sees them, since it
  scores against the original file;
- boxes are clipped to the image; a box with a side under MIN_BOX_SIDE after clipping is dropped;
- images left with no targets are skipped in training and kept in evaluation;
- category ids, which COCO leaves non-contiguous (1..90 for 80 classes), map to 1..K in sorted
  order; 0 is the background. `category_ids[k]` maps class k back.
"""

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

# Boxes thinner than one pixel after clipping have no visible object to learn from.
MIN_BOX_SIDE = 1.0


class DatasetError(RuntimeError):
    """Bad input data; str(error) is one line naming the file (and annotation or image)."""


@dataclass
class ImageRecord:
    """One image and its training targets, in original image pixels.

    boxes: float32[T, 4] (x1, y1, x2, y2), clipped to the image.
    classes: int64[T] in 1..K.
    segmentations: T COCO segmentations (polygon list or RLE dict), as in the file.
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


def _check_segmentation(segm, height: int, width: int) -> str | None:
    """The reason a segmentation is malformed, or None."""
    if isinstance(segm, list):
        if not segm:
            return "empty polygon list"
        for polygon in segm:
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                return "a polygon needs an even number (>= 6) of coordinates"
            if not all(isinstance(v, int | float) for v in polygon):
                return "polygon coordinates must be numbers"
        return None
    if isinstance(segm, dict):
        if "counts" not in segm or "size" not in segm:
            return "RLE needs 'counts' and 'size'"
        if list(segm["size"]) != [height, width]:
            return f"RLE size {segm['size']} differs from the image size [{height}, {width}]"
        if not isinstance(segm["counts"], str | list):
            return "RLE counts must be a string or a list of run lengths"
        if isinstance(segm["counts"], list) and sum(segm["counts"]) != height * width:
            return f"uncompressed RLE runs sum to {sum(segm['counts'])}, not {height * width}"
        return None
    return f"segmentation must be a polygon list or an RLE dict, not {type(segm).__name__}"


def _check_annotation(ann, images: dict, category_ids: set) -> str | None:
    """The reason an annotation is malformed, or None."""
    if not isinstance(ann, dict):
        return "not an object"
    for key in ("id", "image_id", "category_id", "bbox", "segmentation"):
        if key not in ann:
            return f"missing '{key}'"
    if ann["image_id"] not in images:
        return f"image_id {ann['image_id']} is not in 'images'"
    if ann["category_id"] not in category_ids:
        return f"category_id {ann['category_id']} is not in 'categories'"
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4
            and all(isinstance(v, int | float) for v in bbox)):
        return f"bbox must be 4 numbers [x, y, w, h], not {bbox!r}"
    image = images[ann["image_id"]]
    return _check_segmentation(ann["segmentation"], image["height"], image["width"])


class CocoDataset:
    """A COCO instances json and its image folder.

    Args:
        json_path: the instances json.
        image_dir: folder the images' file_name entries are relative to.
        train: if True, `records` holds only images with training targets.
    """

    def __init__(self, json_path: str | Path, image_dir: str | Path, *, train: bool):
        self.json_path = Path(json_path)
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise DatasetError(f"image folder {self.image_dir} (for {self.json_path}) "
                               "does not exist")
        data = _load_json(self.json_path)
        self.coco = self._index(data)
        self.category_ids = sorted(self.coco.cats)  # class k (1..K) is category_ids[k - 1]
        self.class_names = [self.coco.cats[c].get("name", str(c)) for c in self.category_ids]
        self.stats = CocoStats(images=len(self.coco.imgs), annotations=len(self.coco.anns))
        all_records = [self._record(image_id) for image_id in sorted(self.coco.imgs)]
        self.stats.images_without_targets = sum(len(r.classes) == 0 for r in all_records)
        self.records = [r for r in all_records if len(r.classes)] if train else all_records
        for record in self.records:
            for k in record.classes.tolist():
                name = self.class_names[k - 1]
                self.stats.instances_per_class[name] = (
                    self.stats.instances_per_class.get(name, 0) + 1)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def _index(self, data: dict) -> COCO:
        where = f"annotation file {self.json_path}"
        images = {}
        required = {"id", "file_name", "height", "width"}
        for image in data["images"]:
            if not (isinstance(image, dict) and required <= set(image)):
                raise DatasetError(f"{where}: an image entry lacks id, file_name, height or width: "
                                   f"{str(image)[:80]}")
            images[image["id"]] = image
        category_ids = {c.get("id") for c in data["categories"] if isinstance(c, dict)}
        if None in category_ids or not category_ids:
            raise DatasetError(f"{where}: every category needs an 'id'")
        for ann in data["annotations"]:
            reason = _check_annotation(ann, images, category_ids)
            if reason:
                ann_id = ann.get("id", "?") if isinstance(ann, dict) else "?"
                raise DatasetError(f"{where}: annotation {ann_id}: {reason}")
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
        return coco

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
