"""Pictures for people: a training batch, or predictions, drawn over their images."""

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from maskrcnn.data.batch import Batch

# Distinct, saturated colours, cycled by class.
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
MASK_ALPHA = 0.45  # strong enough to see the mask, weak enough to see the object under it


def paste_box_local(mask: np.ndarray, box: np.ndarray, height: int, width: int) -> np.ndarray:
    """A box-local mask (uint8[S, S], 0..255) resampled into an image as bool[height, width]."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    x1, y1 = max(x1, 0), max(y1, 0)
    x2, y2 = min(max(x2, x1 + 1), width), min(max(y2, y1 + 1), height)
    out = np.zeros((height, width), bool)
    if x2 > x1 and y2 > y1:
        resized = Image.fromarray(mask).resize((x2 - x1, y2 - y1), Image.BILINEAR)
        out[y1:y2, x1:x2] = np.asarray(resized) >= 128
    return out


def draw_instances(image: np.ndarray, boxes: np.ndarray, classes: Sequence[int],
                   labels: Sequence[str], masks: Sequence[np.ndarray]) -> Image.Image:
    """image uint8[H, W, 3] with boxes float[T, 4] (x1, y1, x2, y2), a label per box and a
    bool[H, W] mask per box (or none) drawn over it; classes pick the colours."""
    canvas = image.astype(np.float32)
    for cls, mask in zip(classes, masks, strict=False):
        colour = np.array(PALETTE[cls % len(PALETTE)], np.float32)
        canvas[mask] = (1 - MASK_ALPHA) * canvas[mask] + MASK_ALPHA * colour
    picture = Image.fromarray(canvas.round().astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for box, cls, label in zip(boxes, classes, labels, strict=True):
        colour = PALETTE[cls % len(PALETTE)]
        draw.rectangle([float(v) for v in box], outline=colour, width=2)
        draw.text((float(box[0]) + 2, float(box[1]) + 1), label, fill=colour)
    return picture


def draw_batch(batch: Batch, class_names: Sequence[str]) -> Image.Image:
    """All images of a training batch side by side (whole canvas, padding shown dark), with
    their ground-truth boxes, class names and masks. class_names[k - 1] names class k."""
    pictures = []
    for n in range(len(batch)):
        image = batch.images[n].permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)
        height, width = image.shape[:2]
        valid = batch.gt_valid[n].numpy()
        boxes = batch.gt_boxes[n].numpy()[valid]
        classes = batch.gt_classes[n].numpy()[valid].tolist()
        masks = [paste_box_local(m, b, height, width)
                 for m, b in zip(batch.gt_masks[n].numpy()[valid], boxes, strict=True)]
        labels = [class_names[k - 1] for k in classes]
        pictures.append(draw_instances(image, boxes, classes, labels, masks))
    return side_by_side(pictures)


def side_by_side(pictures: Sequence[Image.Image]) -> Image.Image:
    """Pictures in one row on a white sheet."""
    gap = 8  # pixels between images
    sheet = Image.new("RGB", (sum(p.width for p in pictures) + gap * (len(pictures) - 1),
                              max(p.height for p in pictures)), (255, 255, 255))
    x = 0
    for picture in pictures:
        sheet.paste(picture, (x, 0))
        x += picture.width + gap
    return sheet
