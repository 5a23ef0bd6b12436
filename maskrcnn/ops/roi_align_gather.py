"""ROIAlign by gathers: the "gather" method of ops/roi_align.py (which gives the semantics,
those of torchvision.ops.roi_align with sampling_ratio > 0), as `torch.library` ops with a
backward.

Shape legend: N images, C channels, L levels, H_l x W_l the size of level l, R RoIs,
P output side (P x P bins per RoI), S sampling ratio (S x S sample points per bin),
K = S*S*4 bilinear taps per bin (4 corners per sample point), T = sum_l N*H_l*W_l feature rows.
RoIs are float[R, 5] (batch index, x1, y1, x2, y2) in input-image pixels.

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

import torch
from torch.nn import functional as F


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


def table_and_taps(features: list[torch.Tensor], rois: torch.Tensor, levels: torch.Tensor,
                   output_size: int, spatial_scales: list[float], sampling_ratio: int,
                   aligned: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows ROIAlign reads and which of them each bin sums: (table float[T + 1, C], the
    levels' pixels as channels-last rows and a last zero row; index int64[R*P*P, K];
    weight[R*P*P, K] in the table's dtype)."""
    n, c = features[0].shape[:2]
    table = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, c) for f in features]
                      + [features[0].new_zeros(1, c)])
    index, weight = _bilinear_taps(rois, levels, n, [f.shape[2] for f in features],
                                   [f.shape[3] for f in features], spatial_scales, output_size,
                                   sampling_ratio, aligned)
    return table, index, weight.to(table.dtype)


def bins_to_rois(pooled: torch.Tensor, num_rois: int, output_size: int) -> torch.Tensor:
    """float[R*P*P, C] bin values -> float[R, C, P, P]."""
    p, c = output_size, pooled.shape[1]
    return pooled.view(num_rois, p, p, c).permute(0, 3, 1, 2).contiguous()


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
    table, index, weight = table_and_taps(features, rois, levels, output_size, spatial_scales,
                                          sampling_ratio, aligned)
    pooled = F.embedding_bag(index, table, per_sample_weights=weight, mode="sum")
    return bins_to_rois(pooled, rois.shape[0], output_size)


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


