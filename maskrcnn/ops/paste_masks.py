"""Pasting per-detection mask probabilities into full-image masks, batched on the device.

Shape legend: N images, D detections per image, M mask side, H x W the output image.

Semantics are torchvision's `paste_masks_in_image` (so our masks match torchvision's model
pixel for pixel): the M x M mask is padded by one zero cell on each side, its box is scaled by
(M + 2) / M about its centre and truncated to integers, the padded mask is bilinearly resized
(align_corners=False) to the integer box's (w + 1) x (h + 1) pixels and placed there, clipped
to the image. torchvision does this with a Python loop over detections; we write the bilinear
resize as two interpolation matrices per detection, so all detections of a batch paste at once
with two batched matrix products: out = Wy @ mask @ Wx^T.

One difference, on purpose: a box without area (x2 <= x1 or y2 <= y1) paints nothing. For an
inverted box torchvision paints nothing too (its slice is empty); for a box of zero width or
height it paints the one pixel its truncated box covers, a mask for an object of no size.
"""

import torch
from torch.nn import functional as F

# One zero cell around the mask lets the probability fall off at the box edge (torchvision).
PADDING = 1


def _expanded_int_boxes(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """float[..., 4] boxes scaled about their centres by (size + 2) / size, truncated."""
    scale = (size + 2 * PADDING) / size
    half_w = (boxes[..., 2] - boxes[..., 0]) * 0.5 * scale
    half_h = (boxes[..., 3] - boxes[..., 1]) * 0.5 * scale
    cx = (boxes[..., 2] + boxes[..., 0]) * 0.5
    cy = (boxes[..., 3] + boxes[..., 1]) * 0.5
    expanded = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)
    return expanded.to(torch.int64)  # truncation toward zero, as torchvision's .to(int64)


def _interpolation(start: torch.Tensor, end: torch.Tensor, length: int,
                   src_size: int) -> torch.Tensor:
    """float[X, length, src_size]: row p holds the bilinear weights (align_corners=False)
    that resize src_size cells onto the box pixels start..end (inclusive) at image pixel p;
    rows of pixels outside the box or the image are zero, and all rows of an inverted box
    (end < start: torchvision's slice start:end + 1 is empty)."""
    pixels = torch.arange(length, device=start.device)
    # (X, 1) box size in pixels; at least 1 for the resize, as torchvision's max(w, 1).
    extent = (end - start + 1).clamp(min=1).unsqueeze(-1)
    offset = pixels.unsqueeze(0) - start.unsqueeze(-1)  # (X, length) pixel index in the box
    inside = (offset >= 0) & (pixels.unsqueeze(0) <= end.unsqueeze(-1))
    src = ((offset + 0.5) * (src_size / extent) - 0.5).clamp(min=0)
    lo = src.floor().clamp(max=src_size - 1)
    frac = src - lo
    lo = lo.long()
    hi = (lo + 1).clamp(max=src_size - 1)
    weights = (F.one_hot(lo, src_size) * (1 - frac).unsqueeze(-1)
               + F.one_hot(hi, src_size) * frac.unsqueeze(-1))
    return weights * inside.unsqueeze(-1)


def _has_area(boxes: torch.Tensor) -> torch.Tensor:
    """bool[...]: whether each (x1, y1, x2, y2) box has a positive width and height."""
    return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


@torch.library.custom_op("maskrcnn::paste_masks", mutates_args=())
def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Full-image mask probabilities for every detection.

    Args:
        masks: float[N, D, M, M] probabilities in the frame of each box.
        boxes: float[N, D, 4] (x1, y1, x2, y2) in output-image pixels.
        height, width: output size.

    Returns:
        float32[N, D, height, width]. Static shapes, no host synchronisation.
    """
    n, d, m, _ = masks.shape
    padded = F.pad(masks.float(), (PADDING,) * 4).reshape(n * d, m + 2, m + 2)
    box = _expanded_int_boxes(boxes.float(), m).reshape(n * d, 4)
    rows = _interpolation(box[:, 1], box[:, 3], height, m + 2)  # (N*D, H, M+2)
    cols = _interpolation(box[:, 0], box[:, 2], width, m + 2)  # (N*D, W, M+2)
    out = rows @ padded @ cols.transpose(1, 2)  # (N*D, H, W)
    return out.reshape(n, d, height, width) * _has_area(boxes)[..., None, None]


@paste_masks.register_fake
def _(masks, boxes, height, width):
    return masks.new_empty((masks.shape[0], masks.shape[1], height, width), dtype=torch.float32)


def paste_masks_reference(masks: torch.Tensor, boxes: torch.Tensor, height: int,
                          width: int) -> torch.Tensor:
    """Reference: one detection at a time with F.interpolate, as torchvision does."""
    n, d, m, _ = masks.shape
    out = torch.zeros(n, d, height, width, dtype=torch.float64)
    padded = F.pad(masks.double(), (PADDING,) * 4)
    box = _expanded_int_boxes(boxes.double(), m)
    for i in range(n):
        for j in range(d):
            if not _has_area(boxes[i, j]):
                continue
            x1, y1, x2, y2 = box[i, j].tolist()
            w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
            resized = F.interpolate(padded[i, j][None, None], size=(h, w), mode="bilinear",
                                    align_corners=False)[0, 0]
            x0, x1c = max(x1, 0), min(x2 + 1, width)
            y0, y1c = max(y1, 0), min(y2 + 1, height)
            if x1c > x0 and y1c > y0:
                out[i, j, y0:y1c, x0:x1c] = resized[y0 - y1:y1c - y1, x0 - x1:x1c - x1]
    return out
