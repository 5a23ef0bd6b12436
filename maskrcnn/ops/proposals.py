"""RPN proposal generation for the whole batch, with static output shapes (the ancestor's fused
proposal op).

Shape legend: N images, L levels, A_l anchors on level l, k_l = min(pre_nms_topk, A_l)
candidates on level l, P = post_nms_topk proposals per image.

Semantics are torchvision's `RegionProposalNetwork.filter_proposals`: on each level, the k_l
anchors with the highest objectness logits; their boxes decoded with weights (1, 1, 1, 1) in
float32, exp clamped; clipped to the image's real (unpadded) size; boxes with a side shorter
than min_size dropped; NMS within each level; then the P best kept boxes of the image over all
levels.

Boxes are ranked by logit, torchvision by sigmoid(logit). Sigmoid is monotonic, so this is
torchvision's order wherever its float32 probabilities differ; where distinct logits round to
the same probability (all logits above about 17 give 1.0) torchvision's order depends on its
code path (its CPU path for over 1000 boxes sorts unstably), ours stays by logit. Equal
logits keep the lower level, then the lower top-k position, first.

One difference: a box with zero width or height is always dropped, where torchvision keeps it
if min_size <= 0 (with its default min_size of 1e-3 it drops it too). A zero-area proposal can
only give an empty RoI.

How: per level (a static Python loop over L), one batched top-k, decode and clip over all N
images; then NMS within each level: a level never contributes more than P boxes, so each
level's NMS returns min(P, k_l) slots, and the P best of their concatenation are taken with a
stable sort. With the synchronisation-free NMS methods ("triton", "torch"), all levels go
through one `batched_nms_fixed` call of L*N rows; with torchvision's ("per_cell", "shifted"),
one call per level (torchvision's nms is quadratic in the boxes of a call, so L calls of
N * k_l boxes cost about L times less than one over all levels). Every step has static
shapes; with the first two methods nothing reads the device from the host.
"""

import torch
from torch.nn import functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import batched_nms, clip_boxes_to_image, remove_small_boxes

from maskrcnn.ops.boxes import clip_boxes, decode_boxes
from maskrcnn.ops.nms import STATIC_METHODS, batched_nms_fixed

# RPN deltas are not weighted (torchvision and Detectron2 use (1, 1, 1, 1)); the RPN's box
# targets (model/rpn.py) are encoded with the same weights.
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


@torch.library.custom_op("maskrcnn::generate_proposals", mutates_args=())
def _generate_proposals(objectness: list[torch.Tensor], deltas: list[torch.Tensor],
                        anchors: list[torch.Tensor], image_sizes: torch.Tensor,
                        pre_nms_topk: int, post_nms_topk: int, nms_threshold: float,
                        min_size: float, nms_method: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """The op behind `generate_proposals` (which documents it), on detached inputs."""
    boxes_per_level, logits_per_level, valid_per_level = [], [], []
    for level_logits, level_deltas, level_anchors in zip(objectness, deltas, anchors,
                                                         strict=True):
        k = min(pre_nms_topk, level_logits.shape[1])
        top = level_logits.float().topk(k, dim=1)  # (N, k_l)
        # (N, A_l, 4) -> (N, k_l, 4) at the top anchors
        picked = level_deltas.float().gather(1, top.indices.unsqueeze(-1).expand(-1, -1, 4))
        boxes = decode_boxes(picked, level_anchors.float()[top.indices], RPN_BOX_WEIGHTS)
        boxes = clip_boxes(boxes, image_sizes)
        width = boxes[..., 2] - boxes[..., 0]
        height = boxes[..., 3] - boxes[..., 1]
        # ~isnan is torchvision's score_thresh of 0 on sigmoid(logit): it drops NaN logits only.
        valid = ((width >= min_size) & (height >= min_size) & (width > 0) & (height > 0)
                 & ~top.values.isnan())
        boxes_per_level.append(boxes)
        logits_per_level.append(top.values)
        valid_per_level.append(valid)
    # A level never contributes more than P boxes: each level's NMS keeps min(P, k_l) slots.
    keep_per_level = [min(post_nms_topk, v.shape[1]) for v in valid_per_level]
    if nms_method in STATIC_METHODS:
        nms_per_level = _nms_levels_at_once(boxes_per_level, logits_per_level, valid_per_level,
                                            nms_threshold, keep_per_level, nms_method)
    else:
        nms_per_level = [batched_nms_fixed(b, s, v, torch.zeros_like(v, dtype=torch.int64),
                                           nms_threshold, o, nms_method)
                         for b, s, v, o in zip(boxes_per_level, logits_per_level,
                                               valid_per_level, keep_per_level, strict=True)]
    for level, (index, keep) in enumerate(nms_per_level):
        boxes_per_level[level] = boxes_per_level[level].gather(
            1, index.unsqueeze(-1).expand(-1, -1, 4))
        logits_per_level[level] = logits_per_level[level].gather(1, index)
        valid_per_level[level] = keep
    boxes = torch.cat(boxes_per_level, dim=1)  # (N, sum of min(P, k_l), 4)
    logits = torch.cat(logits_per_level, dim=1)
    valid = torch.cat(valid_per_level, dim=1)
    # The P best over all levels; the stable sort keeps level order among equal logits. A valid
    # logit of -inf is raised to the lowest finite value to stay ahead of the invalid slots.
    ranked = torch.where(valid, logits.clamp(min=torch.finfo(logits.dtype).min), -torch.inf)
    best = ranked.sort(dim=1, descending=True, stable=True).indices[:, :post_nms_topk]
    valid = valid.gather(1, best)
    boxes = torch.where(valid.unsqueeze(-1),
                        boxes.gather(1, best.unsqueeze(-1).expand(-1, -1, 4)), 0.0)
    logits = torch.where(valid, logits.gather(1, best), 0.0)
    # Fewer than P candidates over all levels: pad to P.
    missing = post_nms_topk - best.shape[1]
    return (F.pad(boxes, (0, 0, 0, missing)), F.pad(logits, (0, missing)),
            F.pad(valid, (0, missing)))


def _nms_levels_at_once(boxes: list[torch.Tensor], logits: list[torch.Tensor],
                        valid: list[torch.Tensor], nms_threshold: float, keep: list[int],
                        nms_method: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-level NMS as one `batched_nms_fixed` call of L*N rows (the Triton kernel then runs
    all rows in parallel, the PyTorch loop walks max k_l ranks once): each level padded to
    max k_l invalid candidates. Returns each level's (index int64[N, keep_l], bool[N, keep_l])."""
    n = valid[0].shape[0]
    k = max(v.shape[1] for v in valid)

    def rows(tensors: list[torch.Tensor], fill) -> torch.Tensor:
        # L x (N, k_l, ...) -> (L*N, k, ...), padded with `fill`
        return torch.cat([F.pad(t, (0, 0) * (t.dim() - 2) + (0, k - t.shape[1]), value=fill)
                          for t in tensors])

    index, kept = batched_nms_fixed(rows(boxes, 0.0), rows(logits, 0.0), rows(valid, False),
                                    torch.zeros(len(valid) * n, k, dtype=torch.int64,
                                                device=valid[0].device),
                                    nms_threshold, max(keep), nms_method)
    return [(index[level * n:(level + 1) * n, :o], kept[level * n:(level + 1) * n, :o])
            for level, o in enumerate(keep)]


@_generate_proposals.register_fake
def _(objectness, deltas, anchors, image_sizes, pre_nms_topk, post_nms_topk, nms_threshold,
      min_size, nms_method):
    n = image_sizes.shape[0]
    return (objectness[0].new_empty((n, post_nms_topk, 4), dtype=torch.float32),
            objectness[0].new_empty((n, post_nms_topk), dtype=torch.float32),
            objectness[0].new_empty((n, post_nms_topk), dtype=torch.bool))


def generate_proposals(objectness: list[torch.Tensor], deltas: list[torch.Tensor],
                       anchors: list[torch.Tensor], image_sizes: torch.Tensor,
                       pre_nms_topk: int, post_nms_topk: int, nms_threshold: float,
                       min_size: float, nms_method: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                  torch.Tensor]:
    """Proposals of every image (op `maskrcnn::generate_proposals`; no gradient flows).

    Args:
        objectness: per level float[N, A_l] logits.
        deltas: per level float[N, A_l, 4] box deltas of the anchors (weights (1, 1, 1, 1)).
        anchors: per level float[A_l, 4] (x1, y1, x2, y2) in canvas pixels, shared by the batch.
        image_sizes: int64[N, 2] (height, width) of each image's content; boxes are clipped
            to it, not to the padded canvas.
        pre_nms_topk: candidates per level and image before NMS.
        post_nms_topk: P.
        nms_threshold: IoU above which a box is suppressed by a better one of its level.
        min_size: boxes with a side shorter than this (pixels) are dropped.
        nms_method: how `batched_nms_fixed` runs (ops/nms.py; the Runtime's `nms`).

    Returns:
        boxes float32[N, P, 4], scores float32[N, P] (the logits), valid bool[N, P]: by
        descending score; slots past an image's last proposal hold box 0, score 0, valid False.
    """
    return _generate_proposals([o.detach() for o in objectness], [d.detach() for d in deltas],
                               [a.detach() for a in anchors], image_sizes, pre_nms_topk,
                               post_nms_topk, nms_threshold, min_size, nms_method)


def generate_proposals_reference(objectness: list[torch.Tensor], deltas: list[torch.Tensor],
                                 anchors: list[torch.Tensor], image_sizes: torch.Tensor,
                                 pre_nms_topk: int, post_nms_topk: int, nms_threshold: float,
                                 min_size: float) -> tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
    """Reference for `generate_proposals`: torchvision's filter_proposals, one image at a time
    with torchvision's ops, in the dtype of `objectness` (float64 in the tests). Same
    arguments and outputs."""
    coder = BoxCoder(RPN_BOX_WEIGHTS)
    n = image_sizes.shape[0]
    dtype = objectness[0].dtype
    out_boxes = torch.zeros(n, post_nms_topk, 4, dtype=dtype)
    out_scores = torch.zeros(n, post_nms_topk, dtype=dtype)
    out_valid = torch.zeros(n, post_nms_topk, dtype=torch.bool)
    for i in range(n):
        boxes, logits, levels = [], [], []
        for level, (level_logits, level_deltas, level_anchors) in enumerate(
                zip(objectness, deltas, anchors, strict=True)):
            top = level_logits[i].topk(min(pre_nms_topk, level_logits.shape[1]))
            boxes.append(coder.decode_single(level_deltas[i][top.indices],
                                             level_anchors[top.indices]))
            logits.append(top.values)
            levels.append(torch.full_like(top.indices, level))
        height, width = image_sizes[i].tolist()
        boxes = clip_boxes_to_image(torch.cat(boxes), (height, width))
        logits, levels = torch.cat(logits), torch.cat(levels)
        keep = remove_small_boxes(boxes, min_size)
        # Our one difference from torchvision: zero-area boxes go even when min_size <= 0.
        sides = boxes[keep, 2:] - boxes[keep, :2]
        keep = keep[(sides > 0).all(dim=1)]
        keep = keep[logits[keep].sigmoid() >= 0]  # torchvision's score_thresh = 0
        # Ranked by logit (torchvision: by probability; see the module docstring).
        keep = keep[batched_nms(boxes[keep], logits[keep], levels[keep],
                                nms_threshold)][:post_nms_topk]
        out_boxes[i, :len(keep)] = boxes[keep]
        out_scores[i, :len(keep)] = logits[keep]
        out_valid[i, :len(keep)] = True
    return out_boxes, out_scores, out_valid
