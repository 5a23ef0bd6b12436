"""Synthetic batches for the benchmark: our Batch, and the same content in torchvision's format.

Shape legend: N images, H x W the canvas, G ground-truth slots, S box-local mask side,
I_i instances of image i (1 <= I_i <= G), K foreground classes.

Nothing is read from disk. Every image fills the canvas (image_sizes = (H, W)), so torchvision's
transform has nothing to resize or pad. Images are uniform noise; boxes have log-uniform sides
(objects are mostly small, as in COCO); each instance's mask is the ellipse inscribed in its box.
Ours is stored box-local (data/gt_masks.py: S x S cells, here 0 or 255 by the cell centre),
torchvision's as a full-image uint8 mask (by the pixel centre): both describe the same shape.
"""

import math

import torch

from maskrcnn.config import Config
from maskrcnn.data.batch import Batch

# Instances per image are uniform in 1..this (at most G): mean 7.5, close to COCO train2017's 7.3.
MAX_INSTANCES_PER_IMAGE = 14
# Box sides (pixels) are log-uniform in [MIN_BOX_SIDE, MAX_BOX_FRACTION x the canvas's short side].
MIN_BOX_SIDE = 16.0
MAX_BOX_FRACTION = 0.5


def _in_ellipse(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Whether box-relative points (u, v), (0, 0) the top-left and (1, 1) the bottom-right
    corner, lie in the ellipse inscribed in the box. Broadcasts."""
    return (2 * u - 1) ** 2 + (2 * v - 1) ** 2 <= 1


def synthetic_batch(config: Config, seed: int = 0) -> Batch:
    """A Batch of run.images_per_gpu images at the config's first canvas (on the CPU).

    Returns the fields documented in data/batch.py: images uint8[N, 3, H, W] filling the canvas,
    gt_boxes float32[N, G, 4], gt_classes int64[N, G] in 1..K, gt_valid bool[N, G] (the first
    I_i slots), gt_masks uint8[N, G, S, S]; padded slots are 0.
    """
    n = config.run.images_per_gpu
    h, w = config.data.canvas[0].height, config.data.canvas[0].width
    g, s = config.data.max_instances, config.data.gt_mask_size
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=generator)
    counts = torch.randint(1, min(g, MAX_INSTANCES_PER_IMAGE) + 1, (n,), generator=generator)
    valid = torch.arange(g)[None, :] < counts[:, None]  # (N, G)
    low = math.log(MIN_BOX_SIDE)
    high = math.log(max(MIN_BOX_SIDE, MAX_BOX_FRACTION * min(h, w)))
    sides = torch.exp(low + torch.rand(n, g, 2, generator=generator) * (high - low))  # (w, h)
    corners = torch.rand(n, g, 2, generator=generator) * (torch.tensor([w, h]) - sides)
    boxes = torch.cat([corners, corners + sides], dim=-1) * valid[..., None]
    classes = torch.randint(1, config.model.num_classes + 1, (n, g), generator=generator) * valid
    centres = (torch.arange(s) + 0.5) / s
    cells = _in_ellipse(centres[None, :], centres[:, None]).to(torch.uint8) * 255  # (S, S): v, u
    masks = cells.expand(n, g, s, s) * valid[..., None, None]
    sizes = torch.tensor([[h, w]] * n)
    return Batch(images=images, image_sizes=sizes, orig_sizes=sizes.clone(),
                 image_ids=torch.arange(n), flipped=torch.zeros(n, dtype=torch.bool),
                 gt_boxes=boxes, gt_classes=classes, gt_valid=valid, gt_masks=masks,
                 num_dropped=torch.zeros(n, dtype=torch.int64))


def torchvision_inputs(batch: Batch) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The same images and targets in torchvision's detection format, on the batch's device.

    Returns:
        images: N float32[3, H, W] on the 0-255 scale (the model's image_mean and image_std are
            ours, also on that scale).
        targets: N dicts with boxes float32[I_i, 4] (x1, y1, x2, y2) in image pixels, labels
            int64[I_i] in 1..K, masks uint8[I_i, H, W] (0 or 1).
    """
    h, w = batch.images.shape[-2:]
    device = batch.images.device
    ys = torch.arange(h, device=device, dtype=torch.float32) + 0.5  # pixel centres
    xs = torch.arange(w, device=device, dtype=torch.float32) + 0.5
    images, targets = [], []
    for i in range(len(batch)):
        keep = batch.gt_valid[i]
        boxes = batch.gt_boxes[i][keep]
        x1, y1, x2, y2 = (boxes[:, k, None, None] for k in range(4))  # each (I_i, 1, 1)
        u = (xs[None, None, :] - x1) / (x2 - x1)  # (I_i, 1, W)
        v = (ys[None, :, None] - y1) / (y2 - y1)  # (I_i, H, 1)
        images.append(batch.images[i].float())
        targets.append({"boxes": boxes, "labels": batch.gt_classes[i][keep],
                        "masks": _in_ellipse(u, v).to(torch.uint8)})  # (I_i, H, W)
    return images, targets
