"""Anchors: one tensor per FPN level for each canvas, computed once at construction.

Shape legend: L levels, A_l anchors on level l (H_l x W_l locations x B anchors per location),
B = len(aspect_ratios) base anchors per location.

Anchor layout matches torchvision's AnchorGenerator (and so its RPN head's output order):
location-major (y, then x), then the B base anchors; base anchors are centred on the location's
top-left corner (x = j * stride, no half-stride offset) and rounded to integers.

The stride is torchvision's too: canvas size // feature map size, per axis. On the canvases
we allow (multiples of 32) that is the nominal stride on P2..P5, but not always on P6: a
canvas 800 high has a 13-row P6 and torchvision spaces its anchors 800 // 13 = 61 px apart,
not 64 (P6 cell i actually looks at input pixel 64 i). Its published weights were trained
with these anchors, so we use them as well.
"""

import math
from collections.abc import Sequence

import torch
from torch import nn


def base_anchors(size: float, aspect_ratios: Sequence[float]) -> torch.Tensor:
    """float32[B, 4] anchors of one size centred on (0, 0); ratio = height / width."""
    ratios = torch.tensor(aspect_ratios, dtype=torch.float32)
    h_ratio = ratios.sqrt()
    w_ratio = 1.0 / h_ratio
    ws, hs = w_ratio * size, h_ratio * size
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def level_shapes(canvas: tuple[int, int], strides: Sequence[int]) -> list[tuple[int, int]]:
    """(H_l, W_l) of each level's feature map for a canvas: the ResNet stages halve with
    ceil rounding up to stride 32; the last level (P6) subsamples P5 with stride 2."""
    shapes = []
    for stride in strides:
        if shapes and stride > 32:
            h, w = shapes[-1]
            shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
        else:
            shapes.append((math.ceil(canvas[0] / stride), math.ceil(canvas[1] / stride)))
    return shapes


def anchor_strides(canvas: tuple[int, int],
                   shapes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """(y, x) anchor spacing of each level: canvas // level size per axis, as torchvision's
    AnchorGenerator (see the module docstring)."""
    return [(canvas[0] // h, canvas[1] // w) for h, w in shapes]


def grid_anchors(shape: tuple[int, int], stride: tuple[int, int],
                 base: torch.Tensor) -> torch.Tensor:
    """float32[H*W*B, 4] anchors of one level: base anchors at every location, `stride`
    (y, x) pixels apart."""
    ys = torch.arange(shape[0], dtype=torch.float32) * stride[0]
    xs = torch.arange(shape[1], dtype=torch.float32) * stride[1]
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([x, y, x, y], dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
    return (shifts + base.reshape(1, -1, 4)).reshape(-1, 4)  # (H*W, B, 4) -> (H*W*B, 4)


class AnchorCache(nn.Module):
    """Anchors for every canvas of the config, as buffers (so they follow .to(device)).

    Args:
        canvases: (height, width) of each canvas the model will see.
        sizes: one anchor size per level (input pixels).
        aspect_ratios: height / width of the base anchors, shared by all levels.
        strides: feature stride of each level.
    """

    def __init__(self, canvases: Sequence[tuple[int, int]], sizes: Sequence[float],
                 aspect_ratios: Sequence[float], strides: Sequence[int]):
        super().__init__()
        self.sizes, self.aspect_ratios = list(sizes), list(aspect_ratios)
        self.strides = list(strides)
        self.num_per_location = len(aspect_ratios)
        self.canvases = [tuple(c) for c in canvases]
        for index, canvas in enumerate(self.canvases):
            for level, anchors in enumerate(self._compute(canvas)):
                self.register_buffer(f"canvas{index}_level{level}", anchors, persistent=False)

    def _compute(self, canvas: tuple[int, int]) -> list[torch.Tensor]:
        shapes = level_shapes(canvas, self.strides)
        return [grid_anchors(shape, stride, base_anchors(size, self.aspect_ratios))
                for shape, stride, size in zip(shapes, anchor_strides(canvas, shapes),
                                               self.sizes, strict=True)]

    def forward(self, canvas: tuple[int, int]) -> list[torch.Tensor]:
        """Per level float32[A_l, 4] anchors for a canvas (computed on the fly if the canvas
        was not configured, e.g. evaluating at another size)."""
        if canvas in self.canvases:
            index = self.canvases.index(canvas)
            return [getattr(self, f"canvas{index}_level{level}")
                    for level in range(len(self.strides))]
        device = self.canvas0_level0.device if self.canvases else None
        return [a.to(device) for a in self._compute(canvas)]
