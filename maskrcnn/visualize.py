"""Pictures for people: a training batch, or predictions (and ground truth), drawn over their
images at the images' own resolution or enlarged (small images, so that labels stay legible).

Each instance gets a translucent mask with its outline, a box, and a label (class name, and
score for predictions) on a filled tag in the instance's colour. Tags are placed one by one,
in the order given (predictions by score), at the first of a few spots around the box that
overlaps no tag already placed, so labels stay readable where objects crowd together.
"""

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from maskrcnn.data.batch import Batch

# Distinct, saturated colours, cycled by class.
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
MASK_ALPHA = 0.4  # strong enough to see the mask, weak enough to see the object under it
# Label text height as a fraction of the image's shorter side, and its smallest size in
# pixels: about 15 pixels on a 480-pixel COCO photo.
FONT_FRACTION = 1 / 32
MIN_FONT = 10

Rect = tuple[float, float, float, float]


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


def font_for(height: int, width: int) -> ImageFont.ImageFont:
    """The label font for an image of this size (Pillow's built-in scalable font)."""
    return ImageFont.load_default(size=max(MIN_FONT, round(min(height, width) * FONT_FRACTION)))


def outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    """bool[H, W]: the pixels of mask within `thickness` pixels of its border."""
    inner = mask.copy()
    for _ in range(thickness):  # erode by one pixel (4-neighbourhood) per round
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def _overlap(a: Rect, b: Rect) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def place_label(box: Sequence[float], size: tuple[float, float], width: int, height: int,
                taken: list[Rect]) -> Rect:
    """Where a tag of size (w, h) goes for box (x1, y1, x2, y2): above the box's top-left
    corner, else inside it at the top, below it, or inside at the bottom, then the same at
    its right edge; the first spot that overlaps no rectangle in `taken`, else the one that
    overlaps least. Kept inside the image; appended to `taken`."""
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = size
    spots = []
    for left in (x1, x2 - w):
        for top in (y1 - h, y1, y2, y2 - h):
            left = min(max(left, 0.0), max(width - w, 0.0))
            top = min(max(top, 0.0), max(height - h, 0.0))
            spots.append((left, top, left + w, top + h))
    best = min(spots, key=lambda spot: sum(_overlap(spot, t) for t in taken))  # first of ties
    taken.append(best)
    return best


def draw_instances(image: np.ndarray, boxes: np.ndarray, classes: Sequence[int],
                   labels: Sequence[str], masks: Sequence[np.ndarray]) -> Image.Image:
    """image uint8[H, W, 3] with boxes float[T, 4] (x1, y1, x2, y2), a label per box and a
    bool[H, W] mask per box (or none) drawn over it; classes pick the colours. Labels are
    placed in the given order (put the most important first)."""
    height, width = image.shape[:2]
    line = max(2, round(min(height, width) / 300))  # box and outline width in pixels
    canvas = image.astype(np.float32)
    for cls, mask in zip(classes, masks, strict=False):
        colour = np.array(PALETTE[cls % len(PALETTE)], np.float32)
        canvas[mask] = (1 - MASK_ALPHA) * canvas[mask] + MASK_ALPHA * colour
        canvas[outline(mask, line)] = colour
    picture = Image.fromarray(canvas.round().astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    font = font_for(height, width)
    taken: list[Rect] = []
    for box, cls in zip(boxes, classes, strict=True):
        draw.rectangle([float(v) for v in box], outline=PALETTE[cls % len(PALETTE)], width=line)
    for box, cls, label in zip(boxes, classes, labels, strict=True):
        colour = PALETTE[cls % len(PALETTE)]
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        pad = max(1, line // 2)
        tag = place_label(box, (right - left + 2 * pad, bottom - top + 2 * pad), width, height,
                          taken)
        draw.rectangle(tag, fill=colour)
        dark = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 150
        draw.text((tag[0] + pad - left, tag[1] + pad - top), label, font=font,
                  fill=(0, 0, 0) if dark else (255, 255, 255))
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


def titled(picture: Image.Image, title: str) -> Image.Image:
    """The picture under a white band with a title in it."""
    font = font_for(picture.height, picture.width)
    left, top, right, bottom = ImageDraw.Draw(picture).textbbox((0, 0), title, font=font)
    band = bottom - top + 8
    sheet = Image.new("RGB", (picture.width, picture.height + band), (255, 255, 255))
    sheet.paste(picture, (0, band))
    ImageDraw.Draw(sheet).text((4 - left, 4 - top), title, font=font, fill=(0, 0, 0))
    return sheet


def enlarged(image: np.ndarray, boxes: np.ndarray, masks: Sequence[np.ndarray],
             scale: float) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """image uint8[H, W, 3], boxes float[T, 4] (x1, y1, x2, y2) and bool[H, W] masks of that
    image, all resized by `scale` to H' x W' = round(H x scale) x round(W x scale) (image and
    masks bilinearly, masks thresholded at half)."""
    height, width = image.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL's (W', H')
    image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    factors = np.array([size[0] / width, size[1] / height] * 2, np.float32)
    masks = [np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size, Image.BILINEAR))
             >= 128 for m in masks]
    return image, np.asarray(boxes, np.float32).reshape(-1, 4) * factors, masks


def grid(pictures: Sequence[Image.Image], columns: int) -> Image.Image:
    """Pictures in rows of `columns` on a white sheet, each at the top left of its cell (cells
    as wide as their column's widest picture, as high as their row's highest)."""
    gap = 8  # pixels between images
    rows = [pictures[i:i + columns] for i in range(0, len(pictures), columns)]
    widths = [max(row[c].width for row in rows if c < len(row)) for c in range(len(rows[0]))]
    heights = [max(p.height for p in row) for row in rows]
    sheet = Image.new("RGB", (sum(widths) + gap * (len(widths) - 1),
                              sum(heights) + gap * (len(heights) - 1)), (255, 255, 255))
    y = 0
    for row, height in zip(rows, heights, strict=True):
        x = 0
        for picture, width in zip(row, widths, strict=False):
            sheet.paste(picture, (x, y))
            x += width + gap
        y += height + gap
    return sheet


def side_by_side(pictures: Sequence[Image.Image]) -> Image.Image:
    """Pictures in one row on a white sheet."""
    return grid(pictures, len(pictures))
