"""Multi-level ROIAlign as two Triton kernels, forward and backward, as `torch.library` ops.

Shape legend: N images, C channels, L levels, H_l x W_l the size of level l, R RoIs, P output
side (P x P bins per RoI), S sampling ratio (S x S sample points per bin).
RoIs are float[R, 5] (batch index, x1, y1, x2, y2) in input-image pixels.

Semantics are those of ops/roi_align.py (torchvision.ops.roi_align with sampling_ratio > 0, each
RoI on the level `levels` gives it); this is the "triton" method of `multilevel_roi_align`, the
embedding_bag op of ops/roi_align_gather.py the "gather" one.

Forward: one program per (RoI, chunk of BINS of its P*P bins, block of BLOCK_C channels). It
reads the RoI and its level, selects that level's pointer, size, strides and scale from the
tuple arguments, and computes the 4*S*S taps of each of its bins as one [BINS, TAPS] tile
(two pixels per axis per sample point, with torchvision's rules; `_bilinear_taps`). It gathers
the taps' channels as one [BINS, TAPS, BLOCK_C] load, masked off for sample points outside the
map (they add nothing, not even 0 * inf), sums weight * value over the taps in float32, divides
by S*S and stores the result in the features' dtype. The features are read through their
strides, so any layout works; in channels-last a tap's channels are contiguous (vector loads).
The output is written [R, P, P, C] in memory, returned as an [R, C, P, P] tensor with
channels-last strides (the "gather" method returns it contiguous). RoI coordinates are float32
(the "gather" method scales them in float64 first: the same for power-of-two scales). BINS is
as many bins as fit a tile of MAX_TILE values: 2 at 256 channels and S = 2, more with fewer
channels (so small tests also run few programs in the interpreter).

Backward: the same grid; each program scales its bin's gradient by the bilinear weight / (S*S)
of every tap and atomically adds it into a zeroed float32 gradient buffer per level, stored
channels-last [N, H_l, W_l, C] (adjacent channels, adjacent addresses). Atomics rather than the
"gather" method's sorted segmented reduction because the forward's per-bin structure maps onto
them directly (no sort of R*P*P*S*S*4 taps, no index arrays in memory) and torchvision's CUDA
kernel does the same; the cost is that float additions land in a run-dependent order on a GPU,
so gradients are not bitwise reproducible from run to run. The "gather" method stays the
deterministic path. Buffers are converted to the features' dtype at the end (a copy unless
float32).

Levels: the per-level arguments (pointers, sizes, strides, scales) are tuples, so the level
count is a compile-time constant: any count works (P2..P5, P2..P6), one compiled kernel per
count, no dummy pointers. The RoI's level (in [0, L)) picks its entries with a chain of L-1
scalar selects, the same for all threads of a program.

On a CPU the kernels run only under TRITON_INTERPRET=1 (tests).
"""

import torch
import triton
import triton.language as tl

from maskrcnn.ops.roi_align_gather import check_args as check_gather_args

# Channels per program: the next power of two of C, at most this (a 256-channel FPN level takes
# two channel blocks; a tap's 128 channels in channels-last are 256 or 512 contiguous bytes).
MAX_BLOCK_C = 128
# Gathered values per program, at most (BINS x TAPS x BLOCK_C): 32 float32 registers per thread
# of 4 warps. With 128 channels and 16 taps (S = 2) a program takes 2 bins; fewer channels, more.
MAX_TILE = 4096
# Read, then summed in float32.
FEATURE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _bilinear_taps(rois_ptr, levels_ptr, roi, bins, scales, heights, widths,
                   NUM_LEVELS: tl.constexpr, P: tl.constexpr, S: tl.constexpr,
                   ALIGNED: tl.constexpr, TAPS: tl.constexpr):
    """The 4*S*S taps of each of a RoI's bins `bins` (int64[BINS], py * P + px), with
    torchvision's rules.

    Returns the RoI's level (int scalar) and image (int64 scalar), and per (bin, tap) (taps
    ordered sample y, sample x, corner y, corner x, then padding): pixel y and x int64[BINS, TAPS]
    on the level, bilinear weight float32[BINS, TAPS] (not yet divided by S*S) and read
    bool[BINS, TAPS] (False for padding bins and taps and for sample points outside the map,
    which contribute nothing).
    """
    level = tl.load(levels_ptr + roi)
    scale, height, width = scales[0], heights[0], widths[0]
    for index in tl.static_range(1, NUM_LEVELS):
        scale = tl.where(level == index, scales[index], scale)
        height = tl.where(level == index, heights[index], height)
        width = tl.where(level == index, widths[index], width)
    batch = tl.load(rois_ptr + roi * 5).to(tl.int64)
    offset: tl.constexpr = 0.5 if ALIGNED else 0.0
    x1 = tl.load(rois_ptr + roi * 5 + 1) * scale - offset
    y1 = tl.load(rois_ptr + roi * 5 + 2) * scale - offset
    roi_w = tl.load(rois_ptr + roi * 5 + 3) * scale - offset - x1
    roi_h = tl.load(rois_ptr + roi * 5 + 4) * scale - offset - y1
    if not ALIGNED:
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    bin_w = roi_w / P
    bin_h = roi_h / P
    py = (bins // P)[:, None]
    px = (bins % P)[:, None]
    tap = tl.arange(0, TAPS)[None, :]
    sample = tap // 4
    sy = (sample // S).to(tl.float32)
    sx = (sample % S).to(tl.float32)
    # torchvision's order of operations: start + p * bin + (s + 0.5) * bin / S.
    y = y1 + py * bin_h + (sy + 0.5) * bin_h / S  # (BINS, TAPS)
    x = x1 + px * bin_w + (sx + 0.5) * bin_w / S
    read = ((bins < P * P)[:, None] & (sample < S * S) & (y >= -1.0) & (y <= height)
            & (x >= -1.0) & (x <= width))
    y = tl.maximum(tl.where(read, y, 0.0), 0.0)  # NaN and far-off samples to 0, not read
    x = tl.maximum(tl.where(read, x, 0.0), 0.0)
    y_low = y.to(tl.int64)  # floor, as y >= 0
    x_low = x.to(tl.int64)
    y_edge = y_low >= height - 1  # a sample on or past the last row: both taps on that row
    x_edge = x_low >= width - 1
    y_low = tl.where(y_edge, height - 1, y_low)
    x_low = tl.where(x_edge, width - 1, x_low)
    ly = tl.where(y_edge, 0.0, y - y_low)
    lx = tl.where(x_edge, 0.0, x - x_low)
    high_y = (tap // 2) % 2 == 1
    high_x = tap % 2 == 1
    tap_y = tl.where(high_y & ~y_edge, y_low + 1, y_low)
    tap_x = tl.where(high_x & ~x_edge, x_low + 1, x_low)
    weight = tl.where(high_y, ly, 1.0 - ly) * tl.where(high_x, lx, 1.0 - lx)
    return level, batch, tap_y, tap_x, weight, read


@triton.jit
def _program_block(P: tl.constexpr, BINS: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's RoI, its bins (a block of the RoI's P*P) and its channel block."""
    chunks: tl.constexpr = (P * P + BINS - 1) // BINS  # programs per RoI and channel block
    roi = tl.program_id(0).to(tl.int64) // chunks
    bins = (tl.program_id(0) % chunks) * BINS + tl.arange(0, BINS).to(tl.int64)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return roi, bins, channels


@triton.jit
def _roi_align_forward_kernel(out_ptr, rois_ptr, levels_ptr, features, heights, widths,
                              strides_n, strides_c, strides_y, strides_x, scales, C,
                              NUM_LEVELS: tl.constexpr, P: tl.constexpr, S: tl.constexpr,
                              ALIGNED: tl.constexpr, BINS: tl.constexpr, TAPS: tl.constexpr,
                              BLOCK_C: tl.constexpr):
    roi, bins, channels = _program_block(P, BINS, BLOCK_C)
    level, batch, tap_y, tap_x, weight, read = _bilinear_taps(
        rois_ptr, levels_ptr, roi, bins, scales, heights, widths, NUM_LEVELS, P, S, ALIGNED,
        TAPS)
    ptr, stride_n, stride_c = features[0], strides_n[0], strides_c[0]
    stride_y, stride_x = strides_y[0], strides_x[0]
    for index in tl.static_range(1, NUM_LEVELS):
        ptr = tl.where(level == index, features[index], ptr)
        stride_n = tl.where(level == index, strides_n[index], stride_n)
        stride_c = tl.where(level == index, strides_c[index], stride_c)
        stride_y = tl.where(level == index, strides_y[index], stride_y)
        stride_x = tl.where(level == index, strides_x[index], stride_x)
    pixel = batch * stride_n + tap_y * stride_y + tap_x * stride_x  # (BINS, TAPS)
    # (BINS, TAPS, BLOCK_C): one tap's channels along the last axis.
    values = tl.load(ptr + pixel[:, :, None] + channels[None, None, :].to(tl.int64) * stride_c,
                     mask=read[:, :, None] & (channels < C)[None, None, :], other=0.0)
    total = tl.sum(values.to(tl.float32) * weight[:, :, None], axis=1) / (S * S)  # (BINS, BLOCK_C)
    # The output is (R, P, P, C) in memory: bin by bin, channels contiguous.
    tl.store(out_ptr + (roi * P * P + bins[:, None]) * C + channels[None, :],
             total.to(out_ptr.dtype.element_ty),
             mask=(bins < P * P)[:, None] & (channels < C)[None, :])


@triton.jit
def _roi_align_backward_kernel(grad_ptr, grad_stride_r, grad_stride_c, grad_stride_y,
                               grad_stride_x, rois_ptr, levels_ptr, grads, heights, widths,
                               scales, C, NUM_LEVELS: tl.constexpr, P: tl.constexpr,
                               S: tl.constexpr, ALIGNED: tl.constexpr, BINS: tl.constexpr,
                               TAPS: tl.constexpr, BLOCK_C: tl.constexpr):
    roi, bins, channels = _program_block(P, BINS, BLOCK_C)
    level, batch, tap_y, tap_x, weight, read = _bilinear_taps(
        rois_ptr, levels_ptr, roi, bins, scales, heights, widths, NUM_LEVELS, P, S, ALIGNED,
        TAPS)
    ptr, height, width = grads[0], heights[0], widths[0]
    for index in tl.static_range(1, NUM_LEVELS):
        ptr = tl.where(level == index, grads[index], ptr)
        height = tl.where(level == index, heights[index], height)
        width = tl.where(level == index, widths[index], width)
    in_c = (channels < C)[None, :]
    grad = tl.load(grad_ptr + roi * grad_stride_r + (bins // P * grad_stride_y
                                                     + bins % P * grad_stride_x)[:, None]
                   + channels[None, :].to(tl.int64) * grad_stride_c,
                   mask=(bins < P * P)[:, None] & in_c, other=0.0)  # (BINS, BLOCK_C)
    grad = grad.to(tl.float32) / (S * S)
    # The level's float32 buffer is (N, H, W, C) contiguous: pixel (batch * H + y) * W + x.
    pixel = (batch * height + tap_y) * width + tap_x  # (BINS, TAPS)
    tl.atomic_add(ptr + pixel[:, :, None] * C + channels[None, None, :],
                  weight[:, :, None] * grad[:, None, :], mask=read[:, :, None] & in_c[None],
                  sem="relaxed")


def _check_args(features: list[torch.Tensor], spatial_scales: list[float],
                sampling_ratio: int) -> None:
    """The gather op's checks, and those the kernels add (one dtype and device)."""
    check_gather_args(features, spatial_scales, sampling_ratio)
    first = features[0]
    if any(f.shape[:2] != first.shape[:2] or (f.dtype, f.device) != (first.dtype, first.device)
           for f in features[1:]):
        raise ValueError("feature levels differ in batch size, channels, dtype or device")
    if first.dtype not in FEATURE_DTYPES:
        raise ValueError(f"features must be bfloat16, float16 or float32, got {first.dtype}")


def _launch(kernel, r: int, c: int, output_size: int, sampling_ratio: int, *args,
            **constexprs) -> None:
    """Runs `kernel` on a grid of (R * bin chunks, channel blocks), the block sizes chosen:
    BLOCK_C channels, TAPS = 4*S*S rounded up to a power of two, and BINS bins of a RoI per
    program (a power of two, BINS x TAPS x BLOCK_C <= MAX_TILE, no more than the P*P bins)."""
    if r == 0 or c == 0:
        return
    block_c = min(MAX_BLOCK_C, triton.next_power_of_2(c))
    taps = triton.next_power_of_2(4 * sampling_ratio**2)
    bins = min(triton.next_power_of_2(output_size**2), max(1, MAX_TILE // (taps * block_c)))
    grid = (r * triton.cdiv(output_size**2, bins), triton.cdiv(c, block_c))
    kernel[grid](*args, P=output_size, S=sampling_ratio, BINS=bins, TAPS=taps, BLOCK_C=block_c,
                 **constexprs)


@torch.library.custom_op("maskrcnn::multilevel_roi_align_triton", mutates_args=())
def roi_align_levels_triton(features: list[torch.Tensor], rois: torch.Tensor,
                            levels: torch.Tensor, output_size: int, spatial_scales: list[float],
                            sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """ROIAlign of each RoI on the level given for it, by the Triton kernel.

    Args:
        features: L tensors float[N, C, H_l, W_l] (bfloat16, float16 or float32; any strides,
            channels-last the fastest).
        rois: float[R, 5] (batch index, x1, y1, x2, y2) in input-image pixels.
        levels: int[R], index into `features` of each RoI's level.
        output_size: P; spatial_scales: L floats, feature pixels per input pixel.
        sampling_ratio: S > 0; aligned: shift the RoI by -0.5 feature pixel.

    Returns:
        float[R, C, P, P] in the features' dtype, channels-last strides.
    """
    _check_args(features, spatial_scales, sampling_ratio)
    c, r, p = features[0].shape[1], rois.shape[0], output_size
    out = features[0].new_empty(r, p, p, c)  # (R, P, P, C), returned as (R, C, P, P)
    _launch(_roi_align_forward_kernel, r, c, p, sampling_ratio, out, rois.float().contiguous(),
            levels.contiguous(), tuple(features), tuple(f.shape[2] for f in features),
            tuple(f.shape[3] for f in features),
            *(tuple(f.stride(dim) for f in features) for dim in range(4)),
            tuple(float(s) for s in spatial_scales), c, NUM_LEVELS=len(features), ALIGNED=aligned)
    return out.permute(0, 3, 1, 2)


@roi_align_levels_triton.register_fake
def _(features, rois, levels, output_size, spatial_scales, sampling_ratio, aligned):
    _check_args(features, spatial_scales, sampling_ratio)
    c, p = features[0].shape[1], output_size
    return features[0].new_empty(rois.shape[0], p, p, c).permute(0, 3, 1, 2)


@torch.library.custom_op("maskrcnn::multilevel_roi_align_triton_backward", mutates_args=())
def roi_align_levels_triton_backward(grad: torch.Tensor, rois: torch.Tensor,
                                     levels: torch.Tensor, batch_size: int, heights: list[int],
                                     widths: list[int], spatial_scales: list[float],
                                     sampling_ratio: int, aligned: bool) -> list[torch.Tensor]:
    """Gradient of `roi_align_levels_triton` w.r.t. every level's features.

    Args:
        grad: float[R, C, P, P] (any strides); the other arguments as the forward's, with the
            levels' shapes given as N (batch_size) and heights, widths (L ints each).

    Returns:
        L tensors float[N, C, H_l, W_l] in grad's dtype, channels-last strides.
    """
    r, c, p = grad.shape[:3]
    # One zeroed float32 (N, H_l, W_l, C) buffer per level, the atomics' target.
    buffers = [grad.new_zeros(batch_size, h, w, c, dtype=torch.float32)
               for h, w in zip(heights, widths, strict=True)]
    _launch(_roi_align_backward_kernel, r, c, p, sampling_ratio, grad, *grad.stride(),
            rois.float().contiguous(), levels.contiguous(), tuple(buffers), tuple(heights),
            tuple(widths), tuple(float(s) for s in spatial_scales), c, NUM_LEVELS=len(buffers),
            ALIGNED=aligned)
    # (N, H_l, W_l, C) -> (N, C, H_l, W_l), a channels-last view.
    return [b.to(grad.dtype).permute(0, 3, 1, 2) for b in buffers]


@roi_align_levels_triton_backward.register_fake
def _(grad, rois, levels, batch_size, heights, widths, spatial_scales, sampling_ratio, aligned):
    c = grad.shape[1]
    return [grad.new_empty(batch_size, h, w, c).permute(0, 3, 1, 2)
            for h, w in zip(heights, widths, strict=True)]


def _setup_context(ctx, inputs, output):
    features, rois, levels, _, spatial_scales, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois, levels)
    ctx.batch_size = features[0].shape[0]
    ctx.heights = [f.shape[2] for f in features]
    ctx.widths = [f.shape[3] for f in features]
    ctx.args = (spatial_scales, sampling_ratio, aligned)


def _backward(ctx, grad):
    rois, levels = ctx.saved_tensors
    grads = roi_align_levels_triton_backward(grad, rois, levels, ctx.batch_size, ctx.heights,
                                             ctx.widths, *ctx.args)
    return grads, None, None, None, None, None, None


roi_align_levels_triton.register_autograd(_backward, setup_context=_setup_context)
