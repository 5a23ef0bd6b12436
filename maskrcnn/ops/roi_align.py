"""ROIAlign, single- and multi-level (FPN), with static shapes, by one of two `torch.library`
ops; and its reference.

Shape legend: N images, C channels, L levels, H_l x W_l the size of level l, R RoIs,
P output side (P x P bins per RoI), S sampling ratio (S x S sample points per bin).
RoIs are float[R, 5] (batch index, x1, y1, x2, y2) in input-image pixels.

Semantics are torchvision.ops.roi_align's with sampling_ratio > 0 (the CPU kernel,
torchvision/csrc/ops/cpu/roi_align_kernel.cpp): the RoI is scaled by the level's spatial scale
and, when aligned, shifted by -0.5 px; when not aligned its width and height are at least 1 px.
Each bin averages S x S bilinear samples at the centres of an S x S grid. A sample above -1 and
below H (resp. W) is clamped into [0, H-1] (resp. [0, W-1]), one outside contributes 0 but still
counts in the average. Multi-level pooling takes each RoI from one level, chosen by
`assign_levels` as torchvision's MultiScaleRoIAlign does.

Two ways to compute it (`method` of `roi_align` and `multilevel_roi_align`,
runtime.ROI_ALIGN_METHODS: the Runtime chooses one per device and checks its name):
- "gather": the embedding_bag op of ops/roi_align_gather.py, on every device, deterministic.
- "triton": the Triton kernels of ops/roi_align_triton.py (CUDA; on a CPU only interpreted),
  which read the features through their strides and add the gradient with float atomics (not
  bitwise reproducible from run to run on a GPU). Its output has channels-last strides.
"""

import math

import torch

from maskrcnn.ops.roi_align_gather import roi_align_levels


def assign_levels(boxes: torch.Tensor, min_level: int, max_level: int, canonical_level: int = 4,
                  canonical_scale: float = 224.0) -> torch.Tensor:
    """FPN level of each box (FPN paper eq. 1, as torchvision's MultiScaleRoIAlign computes it).

    Args:
        boxes: float[R, 4] (x1, y1, x2, y2) in input-image pixels.
        min_level, max_level: the levels the result is clamped to (2 and 5 for P2..P5).
        canonical_level, canonical_scale: a box of side canonical_scale goes to canonical_level.

    Returns:
        int64[R] floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6), clamped.
        Inverted boxes (negative area, NaN in torchvision) get min_level.
    """
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # The 1e-6 keeps a box of exactly 2^k * canonical_scale on level canonical_level + k.
    level = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_scale) + 1e-6)
    level = level.clamp(min_level, max_level).nan_to_num(nan=min_level)
    return level.to(torch.int64)


def _levels_op(method: str):
    """The op that pools each RoI on its level by `method`, "gather" or "triton"."""
    if method == "triton":
        from maskrcnn.ops.roi_align_triton import (  # noqa: PLC0415 (needs Triton)
            roi_align_levels_triton,
        )
        return roi_align_levels_triton
    return roi_align_levels


def roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float,
              sampling_ratio: int, aligned: bool, method: str) -> torch.Tensor:
    """Single-level ROIAlign, as torchvision.ops.roi_align with sampling_ratio > 0.

    Args:
        features: float[N, C, H, W]; rois: float[R, 5] (batch index, x1, y1, x2, y2) in
            input-image pixels; spatial_scale: feature pixels per input pixel.
        method: "gather" or "triton" (see the module docstring).

    Returns:
        float[R, C, output_size, output_size].
    """
    pool = _levels_op(method)
    levels = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
    return pool([features], rois, levels, output_size, [spatial_scale], sampling_ratio, aligned)


def multilevel_roi_align(features: list[torch.Tensor], rois: torch.Tensor, output_size: int,
                         strides: list[int], sampling_ratio: int, aligned: bool,
                         method: str) -> torch.Tensor:
    """ROIAlign of each RoI on its FPN level, as torchvision's MultiScaleRoIAlign.

    Args:
        features: per level float[N, C, H_l, W_l], e.g. P2..P5.
        rois: float[R, 5] (batch index, x1, y1, x2, y2) in input-image pixels.
        output_size: P; strides: per level, consecutive powers of two (level = log2(stride)).
        method: "gather" or "triton" (see the module docstring).

    Returns:
        float[R, C, P, P].
    """
    pool = _levels_op(method)
    levels = [round(math.log2(stride)) for stride in strides]
    if [2 ** level for level in levels] != list(strides) or levels != list(
            range(levels[0], levels[0] + len(levels))):
        raise ValueError(f"strides must be consecutive powers of two, got {strides}")
    index = assign_levels(rois[:, 1:], levels[0], levels[-1]) - levels[0]
    return pool(features, rois, index, output_size, [1.0 / stride for stride in strides],
                sampling_ratio, aligned)


def roi_align_reference(features: torch.Tensor, rois: torch.Tensor, output_size: int,
                        spatial_scale: float, sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """ROIAlign written out one RoI, bin and sample at a time (for tests).

    Same arguments and result as `roi_align`. Coordinates are Python floats (float64); the
    features are read and summed in their own dtype, so autograd differentiates it.
    """
    n, c, height, width = features.shape
    offset = 0.5 if aligned else 0.0
    out = []
    for batch, x1, y1, x2, y2 in rois.tolist():
        x1, y1 = x1 * spatial_scale - offset, y1 * spatial_scale - offset
        x2, y2 = x2 * spatial_scale - offset, y2 * spatial_scale - offset
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_w, bin_h = roi_w / output_size, roi_h / output_size
        image = features[int(batch)]
        bins = []
        for py in range(output_size):
            for px in range(output_size):
                total = features.new_zeros(c)
                for sy in range(sampling_ratio):
                    for sx in range(sampling_ratio):
                        y = y1 + py * bin_h + (sy + 0.5) * bin_h / sampling_ratio
                        x = x1 + px * bin_w + (sx + 0.5) * bin_w / sampling_ratio
                        total = total + _bilinear_reference(image, y, x)
                bins.append(total / sampling_ratio**2)
        out.append(torch.stack(bins, 1).view(c, output_size, output_size))
    if not out:
        return features.new_zeros(0, c, output_size, output_size)
    return torch.stack(out)


def _bilinear_reference(image: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """float[C, H, W] at (y, x) -> float[C], with ROIAlign's border rules."""
    _, height, width = image.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return image.new_zeros(image.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = min(int(y), height - 1), min(int(x), width - 1)
    y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
    ly = y - y0 if y0 < height - 1 else 0.0
    lx = x - x0 if x0 < width - 1 else 0.0
    return ((1 - ly) * (1 - lx) * image[:, y0, x0] + (1 - ly) * lx * image[:, y0, x1]
            + ly * (1 - lx) * image[:, y1, x0] + ly * lx * image[:, y1, x1])
