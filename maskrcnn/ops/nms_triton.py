"""Greedy NMS over score-sorted rows as one Triton kernel: no host synchronisation.

Shape legend: B rows, K candidates per row (sorted by rank, the valid ones first).

One program per row walks its candidates in rank order. A candidate not yet removed is kept;
it then removes every later candidate of its group whose IoU with it is above the threshold,
up to MAX_BLOCK candidates at a time (IoU computed on the fly in float32 with torchvision's
formula, so no K x K matrix is stored). The row's `removed` flags live in global memory: the
kept box's stores are made visible to the program's next scalar read by a barrier. The walk stops
keeping after `max_out` boxes and only visits the row's valid candidates (their count is read
by the kernel, not by the host).

IoUs round as the "torch" method's (ops/nms.py), the reference that maskrcnn-check
(engine/kernel_check.py) compares the kernel with exactly: the kernel is launched with
enable_fp_fusion=False (no multiply and add fused into an FMA; also ptxas --fmad=false) and
divides with tl.div_rn (IEEE rounding, not Triton's default approximate div.full.f32), as
ops/match_triton.py does. An IoU at the threshold is then above it on both or on neither.

The loops are `while` loops: their bounds are data (the row's count), and Triton 3.6's
interpreter cannot use a tensor as a `range` bound under numpy >= 2.4 (it converts a 1-element
array with int(), which numpy 2.4 rejects); a `while` condition only needs bool(), which works.

Cost: sequential in K per row (greedy NMS is inherently sequential), O(kept x K) IoUs; the
B rows run in parallel. On the CPU the kernel runs under TRITON_INTERPRET=1 (tests).
"""

import torch
import triton
import triton.language as tl

# Candidates compared with a kept box per inner iteration, at most (a row of 2000 RPN candidates
# takes two; fewer candidates, the next power of two).
MAX_BLOCK = 1024


@triton.jit
def _greedy_nms_kernel(x1_ptr, y1_ptr, x2_ptr, y2_ptr, group_ptr, count_ptr, removed_ptr,
                       keep_ptr, k, iou_threshold, max_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * k
    count = tl.load(count_ptr + row)  # valid candidates of this row, the first ones
    kept = 0
    i = 0
    while i < count:
        removed = tl.load(removed_ptr + base + i, volatile=True)
        if (removed == 0) & (kept < max_out):
            tl.store(keep_ptr + base + i, 1)
            kept += 1
            ax1 = tl.load(x1_ptr + base + i)
            ay1 = tl.load(y1_ptr + base + i)
            ax2 = tl.load(x2_ptr + base + i)
            ay2 = tl.load(y2_ptr + base + i)
            a_group = tl.load(group_ptr + base + i)
            a_area = (ax2 - ax1) * (ay2 - ay1)
            start = i + 1
            while start < count:
                offs = start + tl.arange(0, BLOCK)
                inside = offs < count
                bx1 = tl.load(x1_ptr + base + offs, mask=inside, other=0.0)
                by1 = tl.load(y1_ptr + base + offs, mask=inside, other=0.0)
                bx2 = tl.load(x2_ptr + base + offs, mask=inside, other=0.0)
                by2 = tl.load(y2_ptr + base + offs, mask=inside, other=0.0)
                b_group = tl.load(group_ptr + base + offs, mask=inside, other=0)
                w = tl.maximum(tl.minimum(ax2, bx2) - tl.maximum(ax1, bx1), 0.0)
                h = tl.maximum(tl.minimum(ay2, by2) - tl.maximum(ay1, by1), 0.0)
                inter = w * h
                # 0 / 0 (two empty boxes) is NaN, never above the threshold: not removed.
                iou = tl.div_rn(inter, a_area + (bx2 - bx1) * (by2 - by1) - inter)
                hit = inside & (b_group == a_group) & (iou > iou_threshold)
                tl.store(removed_ptr + base + offs, tl.full([BLOCK], 1, tl.int8), mask=hit)
                start += BLOCK
            tl.debug_barrier()
        i += 1


def greedy_nms_triton(boxes: torch.Tensor, groups: torch.Tensor, count: torch.Tensor,
                      iou_threshold: float, max_out: int) -> torch.Tensor:
    """Which candidates greedy NMS keeps, the first `max_out` per row.

    Args:
        boxes: float32[B, K, 4] (x1, y1, x2, y2), each row by rank, its valid boxes first.
        groups: int[B, K]; boxes only remove boxes of the same group.
        count: int[B], the number of valid boxes of each row (the first count[b]).
        iou_threshold: IoU above which the later box is removed.
        max_out: at most this many kept per row.

    Returns:
        bool[B, K], True at the kept candidates.
    """
    b, k = groups.shape
    keep = torch.zeros(b, k, dtype=torch.int8, device=boxes.device)
    if b == 0 or k == 0 or max_out == 0:
        return keep.bool()
    x1, y1, x2, y2 = (c.contiguous() for c in boxes.float().unbind(-1))
    removed = torch.zeros(b, k, dtype=torch.int8, device=boxes.device)
    _greedy_nms_kernel[(b,)](x1, y1, x2, y2, groups.to(torch.int32).contiguous(),
                             count.to(torch.int32).contiguous(), removed, keep, k,
                             float(iou_threshold), max_out,
                             BLOCK=min(MAX_BLOCK, triton.next_power_of_2(max(k, 16))),
                             enable_fp_fusion=False)  # IoUs as torch's (module docstring)
    return keep.bool()
