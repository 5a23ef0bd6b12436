"""Matching candidates to ground truth and sampling a fixed number of them, at static shapes.

Shape legend: N images, K candidates per image (anchors or RoI candidates), G ground-truth
slots, S samples per image.

Sampling draws random keys instead of calling `nonzero`: positives keep the top
(S x positive_fraction) keys among positives, then one top-k over
key = 2 + u (kept positive), 1 + u (negative), -1 (neither) picks S candidates, positives
first. Every shape is fixed; how many samples are real is carried in a mask.
"""

from collections.abc import Callable

import torch

from maskrcnn.ops.boxes import box_iou

# Labels of a candidate.
FOREGROUND, BACKGROUND, IGNORE = 1, 0, -1

Keys = Callable[[torch.Tensor], torch.Tensor]  # labels int[N, K] -> float[N, K] in [0, 1)
# Loss normalisers from the counts they divide by: float[C] -> float[C]. One process:
# `local_counts`; data-parallel training passes distributed.global_counts, which sums the
# counts over the ranks (see there).
Normalizers = Callable[[torch.Tensor], torch.Tensor]


def uniform_keys(labels: torch.Tensor) -> torch.Tensor:
    """Independent uniform random keys from the global generator (seed with torch.manual_seed)."""
    return torch.rand(labels.shape, device=labels.device)


def global_batch_keys(rank: int, world_size: int) -> Keys:
    """Keys for this rank's N images as rows rank*N .. (rank+1)*N - 1 of the global batch.

    Every rank draws the keys of all world_size x N images from the global generator (seeded
    and advanced identically on every rank) and keeps its own rows, so an image's keys depend
    on the seed, the step and its position in the global batch only: N ranks x M images sample
    what one process of N x M images samples. With world_size 1 this is `uniform_keys`. The
    draw is world_size times larger than this rank's keys (float[N*world, K], transient).
    """
    def keys(labels: torch.Tensor) -> torch.Tensor:
        n, k = labels.shape
        drawn = torch.rand((world_size * n, k), device=labels.device)  # (world*N, K)
        return drawn[rank * n:(rank + 1) * n]

    return keys


def local_counts(counts: torch.Tensor) -> torch.Tensor:
    """Loss normalisers of one process: the counts themselves, at least 1."""
    return counts.clamp(min=1)


def match(candidates: torch.Tensor, candidates_valid: torch.Tensor, gt_boxes: torch.Tensor,
          gt_valid: torch.Tensor, fg_iou: float, bg_iou: float,
          allow_low_quality: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Assigns each candidate its best ground truth and a label.

    Args:
        candidates: float[N, K, 4] or float[K, 4] (shared, e.g. anchors) boxes.
        candidates_valid: bool[N, K] or bool[K]; invalid ones are labelled IGNORE.
        gt_boxes: float[N, G, 4]; gt_valid: bool[N, G].
        fg_iou, bg_iou: IoU >= fg_iou is FOREGROUND, < bg_iou BACKGROUND, between IGNORE.
        allow_low_quality: also make FOREGROUND every candidate whose IoU with some ground
            truth equals that ground truth's best IoU (> 0), so each object gets a candidate.

    Returns:
        matched int64[N, K] in 0..G-1 (0 where no valid ground truth), labels int64[N, K].
    """
    n = gt_boxes.shape[0]
    if candidates.dim() == 2:
        candidates = candidates.unsqueeze(0).expand(n, -1, -1)
        candidates_valid = candidates_valid.unsqueeze(0).expand(n, -1)
    iou = box_iou(gt_boxes.float(), candidates.float())  # (N, G, K)
    # Padded ground truth never wins a match.
    iou = torch.where(gt_valid.unsqueeze(-1), iou, torch.full_like(iou, -1.0))
    best, matched = iou.max(dim=1)  # (N, K)
    labels = torch.full_like(matched, IGNORE)
    labels = torch.where(best < bg_iou, BACKGROUND, labels)
    labels = torch.where(best >= fg_iou, FOREGROUND, labels)
    if allow_low_quality:
        # Each ground truth's best IoU over the valid candidates only.
        usable = torch.where(candidates_valid.unsqueeze(1), iou, torch.full_like(iou, -1.0))
        best_per_gt = usable.max(dim=2, keepdim=True).values  # (N, G, 1)
        is_best = (usable == best_per_gt) & (best_per_gt > 0) & gt_valid.unsqueeze(-1)
        labels = torch.where(is_best.any(dim=1), FOREGROUND, labels)
    labels = torch.where(candidates_valid, labels, IGNORE)
    return matched, labels


def sample(labels: torch.Tensor, num_samples: int, positive_fraction: float,
           keys: Keys = uniform_keys) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draws up to num_samples candidates per image, at most positive_fraction of them
    foreground, the rest background.

    Args:
        labels: int64[N, K] FOREGROUND / BACKGROUND / IGNORE.
        keys: random keys in [0, 1) for labels' shape (tests pass deterministic ones).

    Returns:
        indices int64[N, S] into K, positives first; is_fg bool[N, S]; valid bool[N, S]
        (False where fewer candidates than S were available). S = min(num_samples, K).
    """
    s = min(num_samples, labels.shape[1])
    max_fg = min(int(num_samples * positive_fraction), s)
    u = keys(labels)
    fg = labels == FOREGROUND
    # Keep a random max_fg of the positives: the top keys among them.
    fg_top = torch.topk(torch.where(fg, u, -1.0), max_fg, dim=1)
    kept_fg = torch.zeros_like(fg).scatter(1, fg_top.indices, fg_top.values >= 0)
    combined = torch.where(kept_fg, 2.0 + u,
                           torch.where(labels == BACKGROUND, 1.0 + u, torch.full_like(u, -1.0)))
    top = torch.topk(combined, s, dim=1)
    return top.indices, top.values >= 2.0, top.values >= 0.0
