"""Box arithmetic: IoU, delta encoding and decoding, clipping to the image.

Shape legend: N images, K boxes per image, ... any leading dims (broadcast where stated).
Boxes are (x1, y1, x2, y2) in pixels; width = x2 - x1 (no +1), as torchvision and Detectron2.

Inputs in half or bfloat16 (autocast) are computed in float32; float64 stays float64, which the
tests use. These functions are plain PyTorch rather than `torch.library` ops on purpose: they
are a few elementwise ops, so dynamo traces them without a graph break, inductor fuses them
with their neighbours (e.g. the IoU with the max over ground truth in matching, without
materialising the N x G x A matrix) and autograd works through them. An opaque op would lose
all three and gain nothing.
"""

import math

import torch

# exp(dw) is clamped so a huge predicted dw cannot overflow: a box at most 1000 / 16 times its
# anchor (torchvision's and Detectron2's bbox_xform_clip).
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _box_area(boxes: torch.Tensor) -> torch.Tensor:
    """float[..., 4] -> float[...]; negative for inverted boxes, as torchvision."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU.

    Args:
        boxes1: float[..., N, 4]; boxes2: float[..., M, 4]; leading dims broadcast.

    Returns:
        float[..., N, M]. A pair whose union has no area (both boxes degenerate) gets IoU 0,
        where torchvision.ops.box_iou gives NaN.
    """
    boxes1, boxes2 = _at_least_float32(boxes1), _at_least_float32(boxes2)
    area1 = _box_area(boxes1)  # (..., N)
    area2 = _box_area(boxes2)  # (..., M)
    # (..., N, 1, 2) against (..., 1, M, 2) -> (..., N, M, 2)
    top_left = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(inter))


def encode_boxes(gt: torch.Tensor, anchors: torch.Tensor,
                 weights: tuple[float, float, float, float]) -> torch.Tensor:
    """Regression targets that turn `anchors` into `gt` (torchvision BoxCoder.encode).

    Args:
        gt: float[..., 4] target boxes; anchors: float[..., 4] (broadcast with gt), positive
            width and height.
        weights: (wx, wy, ww, wh).

    Returns:
        float[..., 4] deltas (dx, dy, dw, dh): dx = wx * (gx - ax) / aw, dw = ww * log(gw / aw)
        on box centres and sizes.
    """
    gt, anchors = _at_least_float32(gt), _at_least_float32(anchors)
    wx, wy, ww, wh = weights
    anchor_w = anchors[..., 2] - anchors[..., 0]
    anchor_h = anchors[..., 3] - anchors[..., 1]
    anchor_x = anchors[..., 0] + 0.5 * anchor_w
    anchor_y = anchors[..., 1] + 0.5 * anchor_h
    gt_w = gt[..., 2] - gt[..., 0]
    gt_h = gt[..., 3] - gt[..., 1]
    gt_x = gt[..., 0] + 0.5 * gt_w
    gt_y = gt[..., 1] + 0.5 * gt_h
    return torch.stack([
        wx * (gt_x - anchor_x) / anchor_w,
        wy * (gt_y - anchor_y) / anchor_h,
        ww * torch.log(gt_w / anchor_w),
        wh * torch.log(gt_h / anchor_h),
    ], dim=-1)


def decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor,
                 weights: tuple[float, float, float, float],
                 clamp: float = DEFAULT_SCALE_CLAMP) -> torch.Tensor:
    """Boxes from regression deltas (torchvision BoxCoder.decode), the inverse of
    `encode_boxes`.

    Args:
        deltas: float[..., 4] (dx, dy, dw, dh); anchors: float[..., 4] (broadcast with deltas).
        weights: (wx, wy, ww, wh) the deltas were encoded with.
        clamp: dw / ww and dh / wh are clamped to at most this before exp.

    Returns:
        float[..., 4] boxes (x1, y1, x2, y2).
    """
    deltas, anchors = _at_least_float32(deltas), _at_least_float32(anchors)
    anchors = anchors.to(deltas.dtype)
    wx, wy, ww, wh = weights
    anchor_w = anchors[..., 2] - anchors[..., 0]
    anchor_h = anchors[..., 3] - anchors[..., 1]
    anchor_x = anchors[..., 0] + 0.5 * anchor_w
    anchor_y = anchors[..., 1] + 0.5 * anchor_h
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=clamp)
    dh = (deltas[..., 3] / wh).clamp(max=clamp)
    x = dx * anchor_w + anchor_x
    y = dy * anchor_h + anchor_y
    half_w = 0.5 * (torch.exp(dw) * anchor_w)
    half_h = 0.5 * (torch.exp(dh) * anchor_h)
    return torch.stack([x - half_w, y - half_h, x + half_w, y + half_h], dim=-1)


def clip_boxes(boxes: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """Clip each image's boxes to its own size (torchvision clip_boxes_to_image).

    Args:
        boxes: float[N, K, 4]; image_sizes: int64[N, 2] (height, width).

    Returns:
        float[N, K, 4] with 0 <= x <= width and 0 <= y <= height of image n.
    """
    # (N, 2) (h, w) -> (N, 1, 4) upper bounds (w, h, w, h)
    upper = image_sizes.flip(-1).repeat(1, 2).to(boxes.dtype).unsqueeze(1)
    return torch.minimum(boxes.clamp(min=0), upper)
