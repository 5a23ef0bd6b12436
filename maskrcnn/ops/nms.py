"""Batched non-maximum suppression with a fixed-size, score-sorted, padded output.

Shape legend: B rows (images), K candidate boxes per row, O = max_out output slots per row,
C valid candidates in the whole batch.

Semantics per row are torchvision's `batched_nms` over the row's valid boxes: greedy, a box is
suppressed by a kept box of the same group with IoU > iou_threshold, boxes are visited by
descending score and among equal scores the lower index goes first.

Four ways to compute it (`method`, runtime.NMS_METHODS: the Runtime chooses one per device
and checks its name), and a fifth for export, with the same results:
- "triton" (the GPU default): rows ranked with two stable sorts on the device, then one
  Triton kernel walks each row greedily (ops/nms_triton.py). No host synchronisation.
- "torch" (the GPU default where Triton is absent, and the kernel's reference): the same
  ranking, a [B, K, K] suppression matrix, then a static loop over the K ranks. No host
  synchronisation; K small kernels in sequence, so slower than the kernel.
- "per_cell" (the CPU default): the valid candidates selected with `nonzero`, one call of
  torchvision's C++ `nms` per (row, group) cell (see _nms_per_cell). Host reads cost nothing
  on a CPU, and this is the fastest there.
- "shifted": the valid candidates selected likewise, one torchvision `nms` call for the whole
  batch, rows and groups kept apart with torchvision's `batched_nms` offset trick: each (row,
  group) cell is shifted to its own region of the plane, in float64 so that it costs no
  precision (in float32, shifting boxes by 16 images x 80 classes x 1300 px would round their
  coordinates to 1/8 px). On CUDA it synchronises several times (`nonzero`, `unique`, the
  mask torchvision's kernel copies to the host); it was the GPU path before "triton" and is
  kept as the baseline the GPU benchmark compares with.
- "loop" (what maskrcnn-export traces in place of "torch", engine/deploy.py): the same
  ranking, then one `while_loop` (a higher-order op that torch.export, AOTInductor and ONNX
  keep as one loop) whose body keeps the first unremoved rank of every row and removes the
  boxes it suppresses, IoUs computed against that box only. The graph is the same size
  whatever K (the "torch" loop unrolls into K steps when traced: ~5000 x 5 nodes at COCO
  sizes), it stops after the most boxes any row keeps (at most O) and needs no [B, K, K]
  matrix. Not a runtime choice (runtime.NMS_METHODS): export selects it.
In "per_cell" and "shifted" the candidates are ranked once by (score descending, index
ascending) and `nms` gets that rank as its score, so ties break the same way whatever sort
torchvision uses.

IoUs are computed in float32 at least (float64 boxes stay float64, except in the kernel, which is
float32): float16 boxes of a few hundred pixels have areas past float16's largest value (65504),
so their IoUs would be inf / inf = NaN and nothing would be suppressed.

The op is opaque to torch.compile (a `torch.library` op with a fake implementation giving its
static output shapes), so the data-dependent steps of the last two methods cause no graph
break.
"""

import torch
from torch._higher_order_ops.while_loop import while_loop_op
from torchvision.ops import nms

# The methods with static shapes and no host synchronisation.
STATIC_METHODS = ("triton", "torch", "loop")
# Rows of the [B, K, K] suppression matrix of the "torch" method computed at once (bounds the
# float32 IoU temporary to B x CHUNK x K).
IOU_CHUNK = 512


@torch.library.custom_op("maskrcnn::batched_nms_fixed", mutates_args=())
def batched_nms_fixed(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor,
                      groups: torch.Tensor, iou_threshold: float, max_out: int,
                      method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy NMS within each row and group, the first `max_out` kept boxes of each row.

    Args:
        boxes: float[B, K, 4] (x1, y1, x2, y2).
        scores: float[B, K].
        valid: bool[B, K]; invalid boxes neither are kept nor suppress others.
        groups: int64[B, K]; boxes only suppress boxes of the same group (class, FPN level).
        iou_threshold: IoU above which the lower-scoring box is suppressed.
        max_out: O.
        method: "triton", "torch", "per_cell", "shifted" or "loop" (module docstring).

    Returns:
        indices int64[B, O] into K of the kept boxes, by descending score, and keep bool[B, O];
        slots past the last kept box hold index 0 and keep False.
    """
    if method in STATIC_METHODS:
        return _nms_static(boxes, scores, valid, groups, iou_threshold, max_out, method)
    b, k = scores.shape
    indices = torch.zeros(b, max_out, dtype=torch.int64, device=scores.device)
    keep = torch.zeros(b, max_out, dtype=torch.bool, device=scores.device)
    candidates = valid.reshape(-1).nonzero().squeeze(1)  # (C,) flat indices row * K + index
    if candidates.numel() == 0 or max_out == 0:
        return indices, keep
    # Rank by score, descending; the stable sort keeps the lower index first among equals.
    order = scores.reshape(-1)[candidates].sort(descending=True, stable=True).indices
    candidates = candidates[order]
    row = candidates // k
    _, group = torch.unique(groups.reshape(-1)[candidates], return_inverse=True)
    cell = row * (group.max() + 1) + group  # (C,) one id per (row, group)
    cell_boxes = boxes.reshape(-1, 4)[candidates]  # (C, 4)
    if method == "per_cell":
        kept = candidates[_nms_per_cell(_at_least_float32(cell_boxes), cell, iou_threshold)]
    else:
        kept = candidates[_nms_shifted(cell_boxes.double(), cell, iou_threshold)]
    # Regroup by row, keeping the score order within each row, and give each a slot.
    kept_row, by_row = (kept // k).sort(stable=True)
    kept = kept[by_row]
    count = torch.bincount(kept_row, minlength=b)
    first = count.cumsum(0) - count  # position in `kept` of each row's best box
    slot = torch.arange(kept.numel(), device=kept.device) - first[kept_row]
    fits = slot < max_out
    indices[kept_row[fits], slot[fits]] = kept[fits] % k
    keep[kept_row[fits], slot[fits]] = True
    return indices, keep


def _nms_static(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor,
                groups: torch.Tensor, iou_threshold: float, max_out: int,
                method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`batched_nms_fixed` with static shapes only (methods "triton", "torch", "loop")."""
    b, k = scores.shape
    # Rank each row: valid first, then by score descending, the lower index first among
    # equals (two stable sorts; the second only moves valid -inf scores ahead of invalid ones).
    order = torch.where(valid, scores, -torch.inf).sort(dim=1, descending=True,
                                                        stable=True).indices
    order = order.gather(1, (~valid.gather(1, order)).to(torch.uint8)
                         .sort(dim=1, stable=True).indices)  # (B, K) candidate by rank
    ranked_boxes = boxes.gather(1, order.unsqueeze(-1).expand(-1, -1, 4))
    ranked_groups = groups.gather(1, order)
    ranked_valid = valid.gather(1, order)
    if method == "triton":
        from maskrcnn.ops.nms_triton import greedy_nms_triton  # noqa: PLC0415 (needs Triton)
        kept = greedy_nms_triton(ranked_boxes, ranked_groups, ranked_valid.sum(1),
                                 iou_threshold, max_out)
    elif method == "loop":
        kept = _greedy_while_loop(ranked_boxes, ranked_groups, ranked_valid, iou_threshold,
                                  max_out)
    else:
        kept = _greedy_torch(ranked_boxes, ranked_groups, ranked_valid, iou_threshold)
    # The first max_out kept ranks of each row go to slots 0, 1, ...; the others to a spare
    # slot O that is cut off.
    slot = kept.cumsum(1) - 1
    take = kept & (slot < max_out)
    slot = torch.where(take, slot, max_out)
    indices = torch.zeros(b, max_out + 1, dtype=torch.int64, device=boxes.device)
    indices = indices.scatter(1, slot, torch.where(take, order, 0))[:, :max_out].contiguous()
    keep = torch.zeros(b, max_out + 1, dtype=torch.bool, device=boxes.device)
    return indices, keep.scatter(1, slot, take)[:, :max_out].contiguous()


def _at_least_float32(boxes: torch.Tensor) -> torch.Tensor:
    """float16 and bfloat16 boxes as float32, for their areas (module docstring)."""
    return boxes.to(torch.promote_types(boxes.dtype, torch.float32))


def _greedy_torch(boxes: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor,
                  iou_threshold: float) -> torch.Tensor:
    """Greedy NMS of rank-ordered rows with static shapes: boxes float[B, K, 4], groups
    int[B, K], valid bool[B, K] -> kept bool[B, K]. Memory: the bool[B, K, K] matrix."""
    b, k, _ = boxes.shape
    boxes = _at_least_float32(boxes)
    later = torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu(1)  # j > i
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # (B, K)
    suppresses = []  # chunks of bool[B, c, K]: rank i removes rank j
    for start in range(0, k, IOU_CHUNK):
        a = boxes[:, start:start + IOU_CHUNK, None]  # (B, c, 1, 4)
        o = boxes[:, None]  # (B, 1, K, 4)
        w = (torch.minimum(a[..., 2], o[..., 2]) - torch.maximum(a[..., 0], o[..., 0])).clamp(0)
        h = (torch.minimum(a[..., 3], o[..., 3]) - torch.maximum(a[..., 1], o[..., 1])).clamp(0)
        inter = w * h
        # torchvision's formula; 0 / 0 is NaN, never above the threshold.
        iou = inter / (area[:, start:start + IOU_CHUNK, None] + area[:, None] - inter)
        same = groups[:, start:start + IOU_CHUNK, None] == groups[:, None]
        suppresses.append((iou > iou_threshold) & same & later[start:start + IOU_CHUNK])
    suppresses = torch.cat(suppresses, dim=1) if suppresses else later.expand(b, k, k)
    removed = ~valid
    kept = torch.zeros(b, k, dtype=torch.bool, device=boxes.device)
    for i in range(k):  # greedy is sequential over ranks; a static loop, no host read
        keeps = ~removed[:, i]
        kept[:, i] = keeps
        removed = removed | (keeps[:, None] & suppresses[:, i])
    return kept


def _greedy_while_loop(boxes: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor,
                       iou_threshold: float, max_out: int) -> torch.Tensor:
    """Greedy NMS of rank-ordered rows as one `while_loop`: boxes float[B, K, 4], groups
    int[B, K], valid bool[B, K] -> kept bool[B, K] (at most max_out per row, the first ones).

    Each step keeps, in every row that has one and has kept fewer than max_out, the first
    rank not yet removed: the ranks before it are all kept or removed, so it is the box
    greedy NMS visits next and keeps. It then removes itself and every box of its group whose
    IoU with it is above the threshold (torchvision's formula, as _greedy_torch; boxes before
    it are already kept or removed, so removing them again changes nothing). Memory: a few
    [B, K] tensors; work: B x K per step, steps = the most boxes a row keeps."""
    b, k, _ = boxes.shape
    boxes = _at_least_float32(boxes)
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # (B, K)
    rank = torch.arange(k, device=boxes.device)

    def pending(removed, kept, count, boxes, area, groups, rank):
        # (B,) rows with a rank left and room for it
        return (~removed).any(1) & (count < max_out)

    def more(removed, kept, count, boxes, area, groups, rank):
        return pending(removed, kept, count, boxes, area, groups, rank).any()

    def step(removed, kept, count, boxes, area, groups, rank):
        active = pending(removed, kept, count, boxes, area, groups, rank)  # (B,)
        # (B,) the first rank not removed (K where none; clamped, unused then)
        first = torch.where(removed, k, rank).amin(1).clamp(max=k - 1)
        box = boxes.gather(1, first[:, None, None].expand(-1, 1, 4))  # (B, 1, 4)
        w = (torch.minimum(box[..., 2], boxes[..., 2])
             - torch.maximum(box[..., 0], boxes[..., 0])).clamp(0)  # (B, K)
        h = (torch.minimum(box[..., 3], boxes[..., 3])
             - torch.maximum(box[..., 1], boxes[..., 1])).clamp(0)
        inter = w * h
        iou = inter / (area.gather(1, first[:, None]) + area - inter)  # 0 / 0: NaN, not above
        same = groups == groups.gather(1, first[:, None])
        picked = (rank == first[:, None]) & active[:, None]  # (B, K) one-hot, or none
        removed = removed | picked | ((iou > iou_threshold) & same & active[:, None])
        return removed, kept | picked, count + active.long()

    if b * k == 0 or max_out == 0:
        return torch.zeros(b, k, dtype=torch.bool, device=boxes.device)
    count = torch.zeros(b, dtype=torch.int64, device=boxes.device)
    _, kept, _ = while_loop_op(more, step, (~valid, torch.zeros_like(valid), count),
                               (boxes, area, groups, rank))
    return kept


def _nms_shifted(boxes: torch.Tensor, cell: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS of rank-ordered float64 boxes[C, 4] within each cell, in one `nms` call: each
    cell is shifted to its own region of the plane. Returns the kept positions in rank order.
    """
    finite = boxes.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    low = finite.min()
    span = finite.max() - low + 1  # wider than any box, so shifted cells never intersect
    shifted = boxes - low + (cell * span)[:, None]
    rank = -torch.arange(boxes.shape[0], dtype=torch.float64, device=boxes.device)
    return nms(shifted, rank, iou_threshold)


def _nms_per_cell(boxes: torch.Tensor, cell: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """As _nms_shifted, with one `nms` call per cell: torchvision's CPU kernel compares every
    kept box with every later box of its call, so one call over B rows costs about B times more
    than B calls (the shifted boxes of other rows never overlap, but are still visited)."""
    order = cell.sort(stable=True).indices  # by cell, rank order within each cell
    counts = torch.bincount(cell[order]).tolist()
    rank = -torch.arange(boxes.shape[0], dtype=boxes.dtype)
    kept = []
    for positions in order.split(counts):
        if positions.numel():
            kept.append(positions[nms(boxes[positions], rank[positions], iou_threshold)])
    return torch.cat(kept).sort().values  # rank order over all cells


@batched_nms_fixed.register_fake
def _(boxes, scores, valid, groups, iou_threshold, max_out, method):
    b = scores.shape[0]
    return (scores.new_empty((b, max_out), dtype=torch.int64),
            scores.new_empty((b, max_out), dtype=torch.bool))


def _iou(a: list[float], b: list[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes; 0 when the union has no area."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms_reference(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor,
                  groups: torch.Tensor, iou_threshold: float,
                  max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for `batched_nms_fixed`: textbook greedy NMS, one row and one box at a time,
    in Python floats (float64). Same arguments and outputs."""
    b, k = scores.shape
    indices = torch.zeros(b, max_out, dtype=torch.int64)
    keep = torch.zeros(b, max_out, dtype=torch.bool)
    for i in range(b):
        row_boxes = boxes[i].tolist()
        row_scores = scores[i].tolist()
        row_groups = groups[i].tolist()
        kept: list[int] = []
        for j in sorted(range(k), key=lambda j: (-row_scores[j], j)):
            if valid[i, j] and not any(
                    row_groups[m] == row_groups[j]
                    and _iou(row_boxes[m], row_boxes[j]) > iou_threshold for m in kept):
                kept.append(j)
        kept = kept[:max_out]
        indices[i, :len(kept)] = torch.tensor(kept, dtype=torch.int64)
        keep[i, :len(kept)] = True
    return indices.to(scores.device), keep.to(scores.device)
