"""Matching candidates to ground truth by IoU as two Triton kernels, as a `torch.library` op.

Shape legend: N images, K candidates per image (anchors or RoI candidates), G ground-truth
slots, B = ceil(K / BLOCK) candidate blocks per image.

This is the "triton" method of model/sampling.py's `match`, the tiled PyTorch loop there the
"tiled" one. Neither stores the float[N, G, K] IoU matrix; here memory is O(N x K) outputs and
an N x B x G buffer (0.8 MB for 8 images x 100 slots x 268,569 anchors).

Kernel 1, one program per (image, block of BLOCK candidates): a loop over the G slots; for each
valid slot the IoUs of the block's candidates with that box, keeping each candidate's best IoU
and its slot (a later slot wins only with a strictly larger IoU: the first maximum, as
torch.max(dim) gives), and writing the block's best IoU over its valid candidates into the
[N, B, G] buffer (-1 for an invalid slot, or a block with no valid candidate). A candidate with no
valid slot keeps best -1 and slot 0, as `match`. The buffer's max over B (torch.amax, after the
kernel: deterministic, no float atomics) is each ground truth's best IoU.
Kernel 2, only for allow_low_quality: the same grid and loop; a valid candidate is at some
ground truth's best when its IoU, recomputed identically, equals that best (> 0) of a valid slot.
Slots whose best is not > 0 (invalid ones included) are skipped.

IoUs are box_iou's (ops/boxes.py) float32 operations in the same order: areas (x2 - x1) *
(y2 - y1), intersection from max / min clamped at 0, union (area_gt + area_candidate) - inter,
IoU inter / union where union > 0, else 0. Compiled code could differ from torch's in the last
bit in two ways, both switched off: fusing a multiply and an add into one FMA (the kernels are
launched with enable_fp_fusion=False, which also passes --fmad=false to ptxas) and Triton's
default float32 division (div.full.f32, not correctly rounded; tl.div_rn rounds as IEEE, as
torch does). So the interpreter (numpy, on the CPU tests) and, in principle, the compiled
kernels give torch's IoUs bit for bit, hence the same matches (maskrcnn-check counts any
difference on a GPU).

G is a compile-time constant (one compiled kernel per slot count; the recipe has one, 100):
the loop over the slots then has a Python int bound in the interpreter, where Triton 3.6 cannot
use a tensor as a `range` bound under numpy >= 2.4 (it converts a 1-element array with int(),
which numpy 2.4 rejects).

No host synchronisation: the grid depends on shapes only. On a CPU the kernels run only under
TRITON_INTERPRET=1 (tests).
"""

import torch
import triton
import triton.language as tl

# Candidates per program: a 268,569-anchor canvas is 263 blocks per image (8 per thread of 4
# warps); fewer candidates, the next power of two (at least 16).
MATCH_BLOCK = 1024


@triton.jit
def _block_iou(gt_ptr, x1, y1, x2, y2, area):
    """IoU of the box at gt_ptr (4 float32) with the block's candidates (float32[BLOCK] each,
    area their areas), box_iou's operations in its order."""
    gx1 = tl.load(gt_ptr)
    gy1 = tl.load(gt_ptr + 1)
    gx2 = tl.load(gt_ptr + 2)
    gy2 = tl.load(gt_ptr + 3)
    gt_area = (gx2 - gx1) * (gy2 - gy1)
    w = tl.maximum(tl.minimum(gx2, x2) - tl.maximum(gx1, x1), 0.0)
    h = tl.maximum(tl.minimum(gy2, y2) - tl.maximum(gy1, y1), 0.0)
    inter = w * h
    union = gt_area + area - inter
    # The divisor is 1 where the IoU is 0 anyway: no 0 / 0 (the interpreter's numpy warns).
    return tl.where(union > 0, tl.div_rn(inter, tl.where(union > 0, union, 1.0)), 0.0)


@triton.jit
def _load_block(cand_ptr, cand_stride, valid_ptr, valid_stride, image, offs, inside):
    """The block's candidates (x1, y1, x2, y2 float32[BLOCK]), their areas and usable flags
    (valid and inside K)."""
    box = cand_ptr + image * cand_stride + offs.to(tl.int64) * 4
    x1 = tl.load(box, mask=inside, other=0.0)
    y1 = tl.load(box + 1, mask=inside, other=0.0)
    x2 = tl.load(box + 2, mask=inside, other=0.0)
    y2 = tl.load(box + 3, mask=inside, other=0.0)
    usable = tl.load(valid_ptr + image * valid_stride + offs, mask=inside, other=0) != 0
    return x1, y1, x2, y2, (x2 - x1) * (y2 - y1), usable & inside


@triton.jit
def _best_match_kernel(cand_ptr, cand_stride, valid_ptr, valid_stride, gt_ptr, gt_valid_ptr,
                       best_ptr, matched_ptr, block_best_ptr, K, G: tl.constexpr,
                       BLOCK: tl.constexpr):
    image = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    inside = offs < K
    x1, y1, x2, y2, area, usable = _load_block(cand_ptr, cand_stride, valid_ptr, valid_stride,
                                               image, offs, inside)
    best = tl.full([BLOCK], -1.0, tl.float32)
    matched = tl.zeros([BLOCK], tl.int32)
    block_best = block_best_ptr + (image * tl.num_programs(1) + block) * G  # (G,) of this block
    for g in range(0, G):
        slot = image * G + g
        if tl.load(gt_valid_ptr + slot):
            iou = _block_iou(gt_ptr + slot * 4, x1, y1, x2, y2, area)
            better = iou > best  # ties keep the earlier slot
            best = tl.where(better, iou, best)
            matched = tl.where(better, g, matched)
            tl.store(block_best + g, tl.max(tl.where(usable, iou, -1.0), axis=0))
        else:
            tl.store(block_best + g, -1.0)
    tl.store(best_ptr + image * K + offs, best, mask=inside)
    tl.store(matched_ptr + image * K + offs, matched.to(tl.int64), mask=inside)


@triton.jit
def _at_gt_best_kernel(cand_ptr, cand_stride, valid_ptr, valid_stride, gt_ptr, gt_valid_ptr,
                       best_per_gt_ptr, at_best_ptr, K, G: tl.constexpr,
                       BLOCK: tl.constexpr):
    image = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < K
    x1, y1, x2, y2, area, usable = _load_block(cand_ptr, cand_stride, valid_ptr, valid_stride,
                                               image, offs, inside)
    hit = tl.zeros([BLOCK], tl.int1)
    for g in range(0, G):
        slot = image * G + g
        target = tl.load(best_per_gt_ptr + slot)
        if tl.load(gt_valid_ptr + slot) & (target > 0):
            hit = hit | (_block_iou(gt_ptr + slot * 4, x1, y1, x2, y2, area) == target)
    tl.store(at_best_ptr + image * K + offs, hit & usable, mask=inside)


def _per_image(x: torch.Tensor, dims: int) -> tuple[torch.Tensor, int]:
    """x with `dims` dims per image, shared (no image dim, or an image dim of stride 0 as
    `expand` gives) or per image, as a tensor whose per-image part is contiguous and the
    stride between images (0 when shared: not copied per image)."""
    if x.dim() == dims:
        return x.contiguous(), 0
    if x.stride(0) == 0:
        return x[0].contiguous(), 0
    x = x.contiguous()
    return x, x.stride(0)


def _check_args(candidates: torch.Tensor, candidates_valid: torch.Tensor,
                gt_boxes: torch.Tensor, gt_valid: torch.Tensor) -> None:
    if candidates.dtype != torch.float32 or gt_boxes.dtype != torch.float32:
        raise ValueError(f"candidates and gt_boxes must be float32, got {candidates.dtype} and "
                         f"{gt_boxes.dtype}")
    if candidates_valid.dtype != torch.bool or gt_valid.dtype != torch.bool:
        raise ValueError("candidates_valid and gt_valid must be bool")
    if candidates.dim() not in (2, 3) or candidates.shape[-1] != 4:
        raise ValueError(f"candidates must be [K, 4] or [N, K, 4], got {list(candidates.shape)}")
    if candidates_valid.shape != candidates.shape[:-1]:
        raise ValueError(f"candidates_valid {list(candidates_valid.shape)} does not match "
                         f"candidates {list(candidates.shape)}")
    n, g = gt_valid.shape
    if gt_boxes.shape != (n, g, 4) or (candidates.dim() == 3 and candidates.shape[0] != n):
        raise ValueError(f"gt_boxes {list(gt_boxes.shape)}, gt_valid {list(gt_valid.shape)} and "
                         f"candidates {list(candidates.shape)} disagree on N or G")


@torch.library.custom_op("maskrcnn::match_triton", mutates_args=())
def match_triton(candidates: torch.Tensor, candidates_valid: torch.Tensor,
                 gt_boxes: torch.Tensor, gt_valid: torch.Tensor, allow_low_quality: bool,
                 block: int = MATCH_BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each candidate's best ground truth, by the Triton kernels.

    Args:
        candidates: float32[N, K, 4] or [K, 4] (shared, e.g. anchors; also an expanded [N, K, 4]
            view, read without a copy) boxes (x1, y1, x2, y2).
        candidates_valid: bool[N, K] or [K], as candidates.
        gt_boxes: float32[N, G, 4]; gt_valid: bool[N, G].
        allow_low_quality: compute at_gt_best (else it is all False).
        block: candidates per program, at most (a power of two; tests pass small ones).

    Returns:
        best float32[N, K], the candidate's largest IoU with a valid ground truth (-1 if none);
        matched int64[N, K], the first slot with that IoU (0 if none); at_gt_best bool[N, K],
        whether the valid candidate's IoU with some valid ground truth equals that ground
        truth's largest IoU over the valid candidates, when that is > 0.
    """
    _check_args(candidates, candidates_valid, gt_boxes, gt_valid)
    n, g = gt_valid.shape
    k = candidates.shape[-2]
    best = candidates.new_empty(n, k)
    matched = torch.empty(n, k, dtype=torch.int64, device=candidates.device)
    at_gt_best = torch.zeros(n, k, dtype=torch.bool, device=candidates.device)  # if not computed
    if n == 0 or k == 0:
        return best, matched, at_gt_best
    block = min(block, triton.next_power_of_2(max(k, 16)))
    grid = (n, triton.cdiv(k, block))
    boxes, box_stride = _per_image(candidates, 2)
    valid, valid_stride = _per_image(candidates_valid, 1)
    gt, gt_ok = gt_boxes.contiguous(), gt_valid.contiguous()
    block_best = candidates.new_empty(n, grid[1], g)  # (N, B, G)
    # enable_fp_fusion=False: no FMA contraction, so the IoUs round as torch's (docstring).
    _best_match_kernel[grid](boxes, box_stride, valid, valid_stride, gt, gt_ok, best, matched,
                             block_best, k, G=g, BLOCK=block, enable_fp_fusion=False)
    if allow_low_quality:
        best_per_gt = block_best.amax(dim=1)  # (N, B, G) -> (N, G)
        _at_gt_best_kernel[grid](boxes, box_stride, valid, valid_stride, gt, gt_ok, best_per_gt,
                                 at_gt_best, k, G=g, BLOCK=block, enable_fp_fusion=False)
    return best, matched, at_gt_best


@match_triton.register_fake
def _(candidates, candidates_valid, gt_boxes, gt_valid, allow_low_quality, block=MATCH_BLOCK):
    _check_args(candidates, candidates_valid, gt_boxes, gt_valid)
    n, k = gt_valid.shape[0], candidates.shape[-2]
    return (candidates.new_empty(n, k), candidates.new_empty(n, k, dtype=torch.int64),
            candidates.new_empty(n, k, dtype=torch.bool))
