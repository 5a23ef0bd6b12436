"""The batch every training and evaluation step receives: fixed shapes, padded, with validity.

Shape legend: N images, 3 RGB channels, H x W the canvas, G ground-truth slots per image,
S the side of the box-local masks (data/gt_masks.py).
"""

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch


@dataclass
class Batch:
    """A batch of images padded to one canvas, with ground truth padded to G slots.

    images: uint8[N, 3, H, W] RGB, zero beyond each image's size (bottom and right).
    image_sizes: int64[N, 2] (height, width) of each resized image inside the canvas.
    orig_sizes: int64[N, 2] (height, width) of each image as stored on disk.
    image_ids: int64[N] COCO image ids.
    flipped: bool[N] whether each image was mirrored left-right.
    gt_boxes: float32[N, G, 4] (x1, y1, x2, y2) in canvas pixels; padded slots are 0.
    gt_classes: int64[N, G] in 1..K; padded slots are 0.
    gt_valid: bool[N, G] which slots hold an instance.
    gt_masks: uint8[N, G, S, S] box-local mask coverage (0..255); padded slots are 0.
    num_dropped: int64[N] instances beyond G left out of each image (the smallest ones).
    """

    images: torch.Tensor
    image_sizes: torch.Tensor
    orig_sizes: torch.Tensor
    image_ids: torch.Tensor
    flipped: torch.Tensor
    gt_boxes: torch.Tensor
    gt_classes: torch.Tensor
    gt_valid: torch.Tensor
    gt_masks: torch.Tensor
    num_dropped: torch.Tensor

    def _map(self, fn) -> "Batch":
        return Batch(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True) in its pinning thread."""
        return self._map(lambda t: t.pin_memory())

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Marks every tensor as used on `stream` (CUDA), so that its memory is not reused
        before that stream's work on it is done (it was copied in on another stream)."""
        for f in fields(self):
            getattr(self, f.name).record_stream(stream)

    def __len__(self) -> int:
        return self.images.shape[0]


def collate(samples: Sequence[dict[str, np.ndarray]]) -> Batch:
    """Stacks per-image samples (dicts with Batch's field names) into a Batch.

    All samples must share one canvas; the grouped sampler guarantees it.
    """
    shapes = {s["images"].shape for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"samples of one batch have different canvases {sorted(shapes)}; "
                         "use the grouped batch sampler")
    return Batch(**{
        f.name: torch.from_numpy(np.stack([s[f.name] for s in samples]))
        for f in fields(Batch)
    })
