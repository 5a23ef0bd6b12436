"""Batched non-maximum suppression with a fixed-size, score-sorted, padded output.

Shape legend: B rows (images), K candidate boxes per row, O = max_out output slots per row,
C valid candidates in the whole batch.

Semantics per row are torchvision's `batched_nms` over the row's valid boxes: greedy, a box is
suppressed by a kept box of the same group with IoU > iou_threshold, boxes are visited by
descending score and among equal scores the lower index goes first.

How: on a GPU, one call of torchvision's `nms` (its CUDA kernel) for the whole batch. Rows and
groups are kept apart with torchvision's `batched_nms` offset trick: each (row, group) cell is
shifted to its own region of the plane, far enough that boxes of different cells never
intersect. The shift is done in float64 so it costs no precision (in float32, shifting boxes by
16 images x 80 classes x 1300 px would round their coordinates to 1/8 px). On the CPU, one call
of its C++ kernel per cell (see _nms_per_cell). The candidates are ranked once by (score
descending, index ascending) and `nms` gets that rank as its score, so ties break the same way
whatever sort torchvision uses on the device.

The op is opaque to torch.compile (a `torch.library` op with a fake implementation giving its
static output shapes), so the data-dependent steps inside it (selecting the valid boxes, the
variable number of kept boxes) cause no graph break. On CUDA, torchvision's `nms` copies its
suppression mask to the host: one synchronisation per call.
"""

import torch
from torchvision.ops import nms

# Devices whose candidates go through one `nms` call per (row, group) cell rather than one
# shifted call for the batch (tests run the CPU through both).
PER_CELL_DEVICE_TYPES = {"cpu"}


@torch.library.custom_op("maskrcnn::batched_nms_fixed", mutates_args=())
def batched_nms_fixed(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor,
                      groups: torch.Tensor, iou_threshold: float,
                      max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy NMS within each row and group, the first `max_out` kept boxes of each row.

    Args:
        boxes: float[B, K, 4] (x1, y1, x2, y2).
        scores: float[B, K].
        valid: bool[B, K]; invalid boxes neither are kept nor suppress others.
        groups: int64[B, K]; boxes only suppress boxes of the same group (class, FPN level).
        iou_threshold: IoU above which the lower-scoring box is suppressed.
        max_out: O.

    Returns:
        indices int64[B, O] into K of the kept boxes, by descending score, and keep bool[B, O];
        slots past the last kept box hold index 0 and keep False.
    """
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
    if boxes.device.type in PER_CELL_DEVICE_TYPES:
        kept = candidates[_nms_per_cell(cell_boxes, cell, iou_threshold)]
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
def _(boxes, scores, valid, groups, iou_threshold, max_out):
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
