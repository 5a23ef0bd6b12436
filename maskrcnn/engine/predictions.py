"""Predictions on image files: preprocessing like the val pipeline, COCO-format results,
pictures with boxes, class names, scores and masks drawn (one label per object: see
drawn_results).

Shape legend: H x W an image's size as stored on disk, T results drawn.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.ops import nms

from maskrcnn.config import Config
from maskrcnn.data.batch import collate
from maskrcnn.data.coco import DatasetError, read_annotations, real_polygons
from maskrcnn.data.gt_masks import decode_segmentation
from maskrcnn.data.transforms import (
    choose_canvas,
    load_image,
    pad_to_canvas,
    resize_image,
    resized_size,
)
from maskrcnn.engine.evaluate import detections_to_coco
from maskrcnn.engine.step import autocast_dtype, unwrap
from maskrcnn.visualize import draw_instances, enlarged, grid, titled

# Drawn results whose boxes overlap by more than this IoU show one object; only the
# best-scoring of them is drawn. The model's NMS is per class (as COCO scores it), so one
# shape can carry two classes' detections, e.g. "circle 0.79" and "square 0.71" on one circle.
DRAW_NMS_IOU = 0.5
# Preview of the main job: val images enlarged to this longer side (the synthetic images
# are 128-192 pixels, too small for legible labels), in a grid of this many columns.
PREVIEW_SIDE = 384
PREVIEW_COLUMNS = 2


def _sample(path: Path, config: Config, image_id: int) -> tuple[np.ndarray, dict]:
    """An image as stored, and its model input (a Batch's fields, without ground truth)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except OSError as error:
        raise DatasetError(f"cannot read image {path}: {error}") from None
    image = load_image(path, "--input", height, width)
    canvases = [(c.height, c.width) for c in config.data.canvas]
    canvas = canvases[choose_canvas(height, width, canvases)]
    size = resized_size(height, width, config.data.short_side, config.data.max_long_side,
                        canvas)
    g, s = 1, config.data.gt_mask_size
    return image, {
        "images": pad_to_canvas(resize_image(image, size), canvas),
        "image_sizes": np.array(size, np.int64),
        "orig_sizes": np.array([height, width], np.int64),
        "image_ids": np.array(image_id, np.int64),
        "flipped": np.array(False),
        "gt_boxes": np.zeros((g, 4), np.float32),
        "gt_classes": np.zeros(g, np.int64),
        "gt_valid": np.zeros(g, bool),
        "gt_masks": np.zeros((g, s, s), np.uint8),
        "num_dropped": np.array(0, np.int64),
    }


@torch.no_grad()
def predict(model: torch.nn.Module, paths: Sequence[Path], config: Config,
            device: torch.device, category_ids: Sequence[int]) -> list[tuple[np.ndarray,
                                                                             list[dict]]]:
    """(image uint8[H, W, 3], COCO results of that image, image_id = its position)."""
    was_training = model.training
    model.eval()
    dtype = autocast_dtype(config)
    out = []
    try:
        for image_id, path in enumerate(paths):
            image, sample = _sample(path, config, image_id)
            batch = collate([sample]).to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                detections = model(batch.images, batch.image_sizes)
            detections = {k: v.float() if v.is_floating_point() else v
                          for k, v in detections.items()}
            out.append((image, detections_to_coco(detections, batch, category_ids)))
    finally:
        model.train(was_training)
    return out


def drawn_results(results: list[dict], threshold: float) -> list[dict]:
    """The results a picture shows, best-scoring first: those scoring at least threshold,
    less each whose box overlaps a better-scoring shown one's by IoU > DRAW_NMS_IOU, whatever
    the classes (class-agnostic NMS, for drawing only: the results are not changed)."""
    shown = sorted((r for r in results if r["score"] >= threshold), key=lambda r: -r["score"])
    if not shown:
        return []
    keep = nms(torch.from_numpy(_corners([r["bbox"] for r in shown])),
               torch.tensor([r["score"] for r in shown], dtype=torch.float32), DRAW_NMS_IOU)
    return [shown[i] for i in sorted(keep.tolist())]  # drawing, on the host after inference


def draw_predictions(image: np.ndarray, results: list[dict], category_ids: Sequence[int],
                     class_names: Sequence[str], threshold: float, scale: float = 1.0):
    """A picture of one image's drawn_results(results, threshold), labelled by class name
    and score (the best-scoring labels placed first), at the image's resolution x scale."""
    shown = drawn_results(results, threshold)
    classes = [list(category_ids).index(r["category_id"]) + 1 for r in shown]
    boxes = _corners([r["bbox"] for r in shown])
    labels = [f"{class_names[k - 1]} {r['score']:.2f}" for k, r in zip(classes, shown,
                                                                        strict=True)]
    masks = [mask_utils.decode(r["segmentation"]).astype(bool) for r in shown]
    if scale != 1.0:
        image, boxes, masks = enlarged(image, boxes, masks, scale)
    return draw_instances(image, boxes, classes, labels, masks)


def _corners(bboxes: list) -> np.ndarray:
    """COCO boxes [x, y, w, h] as float32[T, 4] (x1, y1, x2, y2)."""
    return np.array([[x, y, x + w, y + h] for x, y, w, h in bboxes], np.float32).reshape(-1, 4)


def ground_truth_by_file(gt_json: Path) -> tuple[dict[str, tuple[dict, list[dict]]], dict]:
    """A checked COCO annotation file as {image file name: (image entry, its annotations)},
    and {category id: name}."""
    data = read_annotations(Path(gt_json))
    annotations: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        annotations.setdefault(ann["image_id"], []).append(ann)
    by_file = {Path(image["file_name"]).name: (image, annotations.get(image["id"], []))
               for image in data["images"]}
    names = {c["id"]: c.get("name", str(c["id"])) for c in data["categories"]}
    return by_file, names


def draw_ground_truth(image: np.ndarray, annotations: list[dict], category_ids: Sequence[int],
                      names: dict[int, str]):
    """A picture of one image's annotations (crowd regions labelled as such), coloured as
    draw_predictions colours the same classes, the largest instances' labels placed first."""
    height, width = image.shape[:2]
    annotations = sorted(annotations, key=lambda a: -a["bbox"][2] * a["bbox"][3])
    ids = list(category_ids)
    classes = [ids.index(a["category_id"]) + 1 if a["category_id"] in ids else a["category_id"]
               for a in annotations]
    boxes = _corners([a["bbox"] for a in annotations])
    labels = [names[a["category_id"]] + (" (crowd)" if a.get("iscrowd") else "")
              for a in annotations]
    masks = [_annotation_mask(a["segmentation"], height, width) for a in annotations]
    return draw_instances(image, boxes, classes, labels, masks)


def _annotation_mask(segm, height: int, width: int) -> np.ndarray:
    """bool[height, width] of a COCO segmentation, without its polygons of fewer than 3
    points (pycocotools would read a 4-number polygon as a box)."""
    if isinstance(segm, list):
        segm = real_polygons(segm)
        if not segm:
            return np.zeros((height, width), bool)
    return decode_segmentation(segm, height, width).astype(bool)


def draw_dataset_predictions(trainer, count: int, threshold: float = 0.5):
    """Predictions of the trained model on the first `count` val images, each enlarged to
    PREVIEW_SIDE on its longer side and titled with its file name, in a grid."""
    coco = trainer.val_coco
    paths = [record.path for record in coco.records[:count]]
    predictions = predict(unwrap(trainer.model), paths, trainer.config, trainer.device,
                          coco.category_ids)
    pictures = []
    for path, (image, results) in zip(paths, predictions, strict=True):
        scale = PREVIEW_SIDE / max(image.shape[:2])
        drawn = draw_predictions(image, results, coco.category_ids, coco.class_names, threshold,
                                 scale)
        pictures.append(titled(drawn, f"{path.name}: {len(drawn_results(results, threshold))} "
                                      f"objects scoring >= {threshold:g}"))
    return grid(pictures, PREVIEW_COLUMNS)
