"""ROIAlign, single- and multi-level (FPN), with static shapes, as a `torch.library` op.

Shape legend: N images, C channels, L levels, H_l x W_l the size of level l, R RoIs,
P output side (P x P bins per RoI), S sampling ratio (S x S sample points per bin),
K = S*S*4 bilinear taps per bin (4 corners per sample point), T = sum_l N*H_l*W_l feature rows.
RoIs are float[R, 5] (batch index, x1, y1, x2, y2) in input-image pixels.

Semantics are torchvision.ops.roi_align's with sampling_ratio > 0 (the CPU kernel,
torchvision/csrc/ops/cpu/roi_align_kernel.cpp): the RoI is scaled by the level's spatial scale
and, when aligned, shifted by -0.5 px; when not aligned its width and height are at least 1 px.
Each bin averages S x S bilinear samples at the centres of an S x S grid. A sample above -1 and
below H (resp. W) is clamped into [0, H-1] (resp. [0, W-1]), one outside contributes 0 but still
counts in the average. Multi-level pooling takes each RoI from one level, chosen by
`assign_levels` as torchvision's MultiScaleRoIAlign does.

Two ways to compute it (`method` of `roi_align` and `multilevel_roi_align`, ROI_ALIGN_METHODS):
- "gather" (the default): the embedding_bag op below, on every device, deterministic.
- "triton": the Triton kernels of ops/roi_align_triton.py (CUDA; on a CPU only interpreted),
  which read the features through their strides and add the gradient with float atomics (not
  bitwise reproducible from run to run on a GPU). Its output has channels-last strides.

How "gather" computes it (one path for every device, plain PyTorch ops, no data-dependent shape,
no host sync):
- All levels are viewed as one table of T+1 channels-last rows [T+1, C]: level by level, image by
  image, y, x, then one zero row. A tap of RoI r at (y, x) reads row
  offset[level_r] + (batch_r * H + y) * W + x; taps of sample points outside the map read the
  zero row with weight 0 (so they add nothing, not even 0 * inf).
- The K taps of every bin are computed at once (the y and x halves are separable, computed on
  [R, P, S] and broadcast), with weight = bilinear weight / (S*S).
- Forward: `embedding_bag(taps, table, per_sample_weights=weights, mode="sum")` gathers and
  sums the K weighted rows of each bin in one fused kernel: memory O(R*P*P*K) indices, never
  O(R*P*P*K*C).
- Backward (the transposed sparse product): the taps are sorted by feature row; one
  `embedding_bag` with one bag per feature row sums weight * grad[bin] over the taps that hit it
  (`searchsorted` gives the bag boundaries; rows no tap hits are empty bags, i.e. zero), writing
  the dense feature gradient [T, C] in one pass, with no atomics and no [taps, C] temporary.
  Each level's gradient is a channels-last view of that buffer. (torchvision's CPU kernel,
  single-threaded, recomputes every sample's bilinear weights for each channel and adds them one
  float at a time into a zeroed NCHW gradient.)
The costs: one channels-last copy of all levels in the forward (torchvision reads NCHW in place),
and gradients in channels-last strides, which autograd copies to NCHW when it accumulates them
into the .grad of an NCHW leaf.
"""

import math

import torch
from torch.nn import functional as F

# The ways to compute ROIAlign; see the module docstring.
ROI_ALIGN_METHODS = ("gather", "triton")


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


def _bilinear_taps_1d(start: torch.Tensor, bin_size: torch.Tensor, size: torch.Tensor,
                      output_size: int, sampling_ratio: int):
    """Sample coordinates along one axis and their two bilinear taps.

    Args:
        start, bin_size: float[R], the RoI's first coordinate and bin size on its level.
        size: int64[R], H or W of the RoI's level.

    Returns:
        index int64[R, P, S, 2] (low, high pixel), weight float[R, P, S, 2], valid bool[R, P, S].
    """
    dtype = start.dtype
    p = torch.arange(output_size, device=start.device, dtype=dtype)
    s = torch.arange(sampling_ratio, device=start.device, dtype=dtype) + 0.5
    start, bin_size, size = start[:, None, None], bin_size[:, None, None], size[:, None, None]
    # The same float operations in the same order as torchvision's kernel,
    # start + p * bin + (s + 0.5) * bin / S, so float32 sample coordinates match its own.
    coord = start + p[None, :, None] * bin_size + s[None, None, :] * bin_size / sampling_ratio
    valid = (coord >= -1.0) & (coord <= size)  # False for NaN too
    coord = torch.where(valid, coord, 0.0).clamp_min(0.0)
    low = coord.to(torch.int64)  # floor, as coord >= 0
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, 0.0, coord - low)
    return torch.stack([low, high], -1), torch.stack([1.0 - frac, frac], -1), valid


def _per_level(levels: torch.Tensor, values: list, dtype: torch.dtype) -> torch.Tensor:
    """values[levels] for a short Python list, without copying the list to the device (a host
    sync on CUDA). int64[R] -> dtype[R]."""
    out = torch.full(levels.shape, values[0], dtype=dtype, device=levels.device)
    for level, value in enumerate(values[1:], start=1):
        out = torch.where(levels == level, value, out)
    return out


def _bilinear_taps(rois: torch.Tensor, levels: torch.Tensor, batch_size: int,
                   heights: list[int], widths: list[int], spatial_scales: list[float],
                   output_size: int, sampling_ratio: int, aligned: bool):
    """The K taps of every bin: which row of the [T+1, C] table each reads, and its weight.

    Returns:
        index int64[R*P*P, K] into the table (T, the zero row, for samples outside the map) and
        weight float[R*P*P, K] (bilinear weight / (S*S), 0 outside), computed in the RoIs'
        dtype, at least float32. Bins are ordered (r, py, px), taps (sy, sx, corner y, corner x).
    """
    dtype = torch.promote_types(rois.dtype, torch.float32)
    rows = [batch_size * h * w for h, w in zip(heights, widths, strict=True)]  # per level
    first_row = _per_level(levels, [sum(rows[:i]) for i in range(len(rows))], torch.int64)  # (R,)
    h = _per_level(levels, heights, torch.int64)
    w = _per_level(levels, widths, torch.int64)
    scale = _per_level(levels, spatial_scales, torch.float64)
    # torchvision scales in float64, then rounds to the RoIs' dtype.
    offset = 0.5 if aligned else 0.0
    box = (rois[:, 1:].to(torch.float64) * scale[:, None] - offset).to(dtype)  # (R, 4)
    box_w, box_h = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    if not aligned:
        box_w, box_h = box_w.clamp_min(1.0), box_h.clamp_min(1.0)
    y, wy, vy = _bilinear_taps_1d(box[:, 1], box_h / output_size, h, output_size, sampling_ratio)
    x, wx, vx = _bilinear_taps_1d(box[:, 0], box_w / output_size, w, output_size, sampling_ratio)
    # Broadcast to (R, py, px, sy, sx, corner y, corner x).
    r, p, s = rois.shape[0], output_size, sampling_ratio
    y, wy = y.view(r, p, 1, s, 1, 2, 1), wy.view(r, p, 1, s, 1, 2, 1)
    x, wx = x.view(r, 1, p, 1, s, 1, 2), wx.view(r, 1, p, 1, s, 1, 2)
    valid = (vy.view(r, p, 1, s, 1, 1, 1) & vx.view(r, 1, p, 1, s, 1, 1))
    base = first_row + rois[:, 0].to(torch.int64) * h * w
    index = base.view(r, 1, 1, 1, 1, 1, 1) + y * w.view(r, 1, 1, 1, 1, 1, 1) + x
    index = torch.where(valid, index, sum(rows))  # the zero row
    weight = torch.where(valid, wy * wx / (s * s), 0.0)
    k = s * s * 4
    return index.reshape(r * p * p, k), weight.reshape(r * p * p, k)


def check_args(features: list[torch.Tensor], spatial_scales: list[float],
               sampling_ratio: int) -> None:
    """Raises ValueError for arguments no ROIAlign method takes."""
    if sampling_ratio <= 0:
        raise ValueError(f"sampling_ratio must be > 0 (no adaptive mode), got {sampling_ratio}")
    if len(features) != len(spatial_scales) or not features:
        raise ValueError(f"{len(features)} feature levels but {len(spatial_scales)} scales")


@torch.library.custom_op("maskrcnn::multilevel_roi_align", mutates_args=())
def roi_align_levels(features: list[torch.Tensor], rois: torch.Tensor, levels: torch.Tensor,
                     output_size: int, spatial_scales: list[float], sampling_ratio: int,
                     aligned: bool) -> torch.Tensor:
    """ROIAlign of each RoI on the level given for it.

    Args:
        features: L tensors float[N, C, H_l, W_l].
        rois: float[R, 5] (batch index, x1, y1, x2, y2) in input-image pixels.
        levels: int64[R], index into `features` of each RoI's level.
        output_size: P; spatial_scales: L floats, feature pixels per input pixel.
        sampling_ratio: S > 0; aligned: shift the RoI by -0.5 feature pixel.

    Returns:
        float[R, C, P, P] in the features' dtype.
    """
    check_args(features, spatial_scales, sampling_ratio)
    n, c = features[0].shape[:2]
    r, p = rois.shape[0], output_size
    # (N, C, H_l, W_l) per level -> (T + 1, C) channels-last rows, the last one zero.
    table = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, c) for f in features]
                      + [features[0].new_zeros(1, c)])
    index, weight = _bilinear_taps(rois, levels, n, [f.shape[2] for f in features],
                                   [f.shape[3] for f in features], spatial_scales, output_size,
                                   sampling_ratio, aligned)
    pooled = F.embedding_bag(index, table, per_sample_weights=weight.to(table.dtype), mode="sum")
    # (R*P*P, C) -> (R, C, P, P)
    return pooled.view(r, p, p, c).permute(0, 3, 1, 2).contiguous()


@roi_align_levels.register_fake
def _(features, rois, levels, output_size, spatial_scales, sampling_ratio, aligned):
    check_args(features, spatial_scales, sampling_ratio)
    return features[0].new_empty(rois.shape[0], features[0].shape[1], output_size, output_size)


@torch.library.custom_op("maskrcnn::multilevel_roi_align_backward", mutates_args=())
def roi_align_levels_backward(grad: torch.Tensor, rois: torch.Tensor, levels: torch.Tensor,
                              batch_size: int, heights: list[int], widths: list[int],
                              spatial_scales: list[float], sampling_ratio: int,
                              aligned: bool) -> torch.Tensor:
    """Gradient of `roi_align_levels` w.r.t. all levels' features at once.

    Args:
        grad: float[R, C, P, P]; the other arguments as the forward's, with the levels' shapes
            given as N (batch_size) and heights, widths (L ints each).

    Returns:
        float[T, C]: rows level by level, image by image, y, x (channels-last).
    """
    r, c, p = grad.shape[:3]
    index, weight = _bilinear_taps(rois, levels, batch_size, heights, widths, spatial_scales,
                                   p, sampling_ratio, aligned)
    total_rows = batch_size * sum(h * w for h, w in zip(heights, widths, strict=True))
    k = index.shape[1]
    # (R, C, P, P) -> (R*P*P, C), one row per bin.
    grad_bins = grad.permute(0, 2, 3, 1).reshape(r * p * p, c)
    # Group the taps by the feature row they read; row t's taps are [starts[t], starts[t+1]),
    # and the zero row's taps (at the end) are left out of every bag.
    rows, order = index.flatten().sort()
    starts = torch.searchsorted(rows, torch.arange(total_rows + 1, device=rows.device))
    return F.embedding_bag(order // k, grad_bins, starts, mode="sum",
                           per_sample_weights=weight.flatten()[order].to(grad.dtype),
                           include_last_offset=True)


@roi_align_levels_backward.register_fake
def _(grad, rois, levels, batch_size, heights, widths, spatial_scales, sampling_ratio, aligned):
    total_rows = batch_size * sum(h * w for h, w in zip(heights, widths, strict=True))
    return grad.new_empty(total_rows, grad.shape[1])


def _setup_context(ctx, inputs, output):
    features, rois, levels, _, spatial_scales, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois, levels)
    ctx.shapes = [f.shape for f in features]
    ctx.args = (spatial_scales, sampling_ratio, aligned)


def _backward(ctx, grad):
    rois, levels = ctx.saved_tensors
    n, c = ctx.shapes[0][:2]
    heights = [shape[2] for shape in ctx.shapes]
    widths = [shape[3] for shape in ctx.shapes]
    grad_rows = roi_align_levels_backward(grad, rois, levels, n, heights, widths, *ctx.args)
    grad_features = []
    start = 0
    for h, w in zip(heights, widths, strict=True):
        # (N*H_l*W_l, C) rows of level l -> (N, C, H_l, W_l), a channels-last view.
        grad_features.append(grad_rows[start:start + n * h * w].view(n, h, w, c)
                             .permute(0, 3, 1, 2))
        start += n * h * w
    return grad_features, None, None, None, None, None, None


roi_align_levels.register_autograd(_backward, setup_context=_setup_context)


def _levels_op(method: str):
    """The op that pools each RoI on its level by `method` (one of ROI_ALIGN_METHODS)."""
    if method == "gather":
        return roi_align_levels
    if method == "triton":
        from maskrcnn.ops.roi_align_triton import (  # noqa: PLC0415 (needs Triton)
            roi_align_levels_triton,
        )
        return roi_align_levels_triton
    raise ValueError(f"unknown ROIAlign method {method!r}; expected one of "
                     f"{', '.join(ROI_ALIGN_METHODS)}")


def roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float,
              sampling_ratio: int, aligned: bool, method: str = "gather") -> torch.Tensor:
    """Single-level ROIAlign, as torchvision.ops.roi_align with sampling_ratio > 0.

    Args:
        features: float[N, C, H, W]; rois: float[R, 5] (batch index, x1, y1, x2, y2) in
            input-image pixels; spatial_scale: feature pixels per input pixel.
        method: one of ROI_ALIGN_METHODS (see the module docstring).

    Returns:
        float[R, C, output_size, output_size].
    """
    pool = _levels_op(method)
    levels = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
    return pool([features], rois, levels, output_size, [spatial_scale], sampling_ratio, aligned)


def multilevel_roi_align(features: list[torch.Tensor], rois: torch.Tensor, output_size: int,
                         strides: list[int], sampling_ratio: int = 2, aligned: bool = True,
                         method: str = "gather") -> torch.Tensor:
    """ROIAlign of each RoI on its FPN level, as torchvision's MultiScaleRoIAlign.

    Args:
        features: per level float[N, C, H_l, W_l], e.g. P2..P5.
        rois: float[R, 5] (batch index, x1, y1, x2, y2) in input-image pixels.
        output_size: P; strides: per level, consecutive powers of two (level = log2(stride)).
        method: one of ROI_ALIGN_METHODS (see the module docstring).

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
