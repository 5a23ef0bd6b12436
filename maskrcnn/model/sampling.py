"""Matching candidates to ground truth and sampling a fixed number of them, at static shapes.

Shape legend: N images, K candidates per image (anchors or RoI candidates), G ground-truth
slots, S samples per image.

Matching has two ways to compute the same result (`method` of `match`, runtime.MATCH_METHODS,
which the Runtime chooses), neither of which stores the whole float[N, G, K] IoU matrix:
- "tiled": PyTorch ops on tiles of candidates, on every device.
- "triton": the Triton kernels of ops/match_triton.py (CUDA; on a CPU only interpreted), one
  pass over the ground truth per block of candidates, memory O(N x K).

Sampling draws random keys instead of calling `nonzero`: positives keep the top
(S x positive_fraction) keys among positives, then one top-k over
key = 2 + u (kept positive), 1 + u (negative), -1 (neither) picks S candidates, positives
first. Every shape is fixed; how many samples are real is carried in a mask.

Losses are divided by counts of samples: one process's (`local_counts`), or in data-parallel
training the global batch's (`global_counts`, summed over the ranks).
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from maskrcnn.ops.boxes import box_iou

# Labels of a candidate.
FOREGROUND, BACKGROUND, IGNORE = 1, 0, -1
# Candidates matched at once (see `match`): 2 images x 100 ground-truth slots x 16384 anchors
# is a 13 MB float32 IoU tile; the 800x1344 canvas has 268,569 anchors, 17 tiles.
MATCH_TILE = 16384

Keys = Callable[[torch.Tensor], torch.Tensor]  # labels int[N, K] -> float[N, K] in [0, 1)
# Loss normalisers from the counts they divide by: float[C] -> float[C]. One process:
# `local_counts`; data-parallel training passes `global_counts`, which sums the counts over
# the ranks.
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


def global_counts(counts: torch.Tensor) -> torch.Tensor:
    """Loss normalisers from every rank's counts, so that data parallelism does the maths of
    one process holding the whole global batch.

    counts: float[C] this rank's counts (e.g. sampled anchors, foreground RoIs). Returns
    float[C]: the counts summed over the ranks (at least 1), divided by the world size. A
    rank's loss (its sum / this) averaged over the ranks, as DDP averages gradients, is then
    the sum over all ranks / the count over all ranks. One small all-reduce per call, on the
    device (functional collective: no host wait, traceable by torch.compile).
    """
    total = funcol.all_reduce(counts, "sum", dist.group.WORLD)
    return total.clamp(min=1) / dist.get_world_size()


def match(candidates: torch.Tensor, candidates_valid: torch.Tensor, gt_boxes: torch.Tensor,
          gt_valid: torch.Tensor, fg_iou: float, bg_iou: float, allow_low_quality: bool,
          method: str, tile: int = MATCH_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Assigns each candidate its best ground truth and a label.

    Args:
        candidates: float[N, K, 4] or float[K, 4] (shared, e.g. anchors) boxes.
        candidates_valid: bool[N, K] or bool[K]; invalid ones are labelled IGNORE.
        gt_boxes: float[N, G, 4]; gt_valid: bool[N, G].
        fg_iou, bg_iou: IoU >= fg_iou is FOREGROUND, < bg_iou BACKGROUND, between IGNORE.
        allow_low_quality: also make FOREGROUND every candidate whose IoU with some ground
            truth equals that ground truth's best IoU (> 0), so each object gets a candidate.
        method: "tiled" or "triton" (see the module docstring; the Runtime checks the name).
        tile: candidates whose IoUs with the ground truth are computed at once ("tiled").

    Returns:
        matched int64[N, K] in 0..G-1 (0 where no valid ground truth), labels int64[N, K].

    How: in tiles of candidates, never the whole float[N, G, K] IoU matrix (860 MB for 8
    images x 100 slots x 268,569 anchors): a first pass keeps each candidate's best IoU and
    ground truth, and each ground truth's best IoU over the valid candidates; with
    allow_low_quality a second pass recomputes each tile's IoUs (unless there is only one) to
    find the candidates at those bests. Peak memory is O(N x K + N x G x tile); a static loop
    over the tiles, no host read. Each IoU is computed exactly as `match_reference` computes
    it, so the results are the same (tests). "triton" computes the same IoUs in the kernels
    (ops/match_triton.py) and the labels from them with the same code.
    """
    n, k = gt_boxes.shape[0], candidates.shape[-2]
    if candidates.dim() == 2:
        candidates = candidates.unsqueeze(0).expand(n, -1, -1)
        candidates_valid = candidates_valid.unsqueeze(0).expand(n, -1)
    if k == 0:
        empty = torch.zeros(n, 0, dtype=torch.int64, device=gt_boxes.device)
        return empty, empty.clone()
    if method == "triton":
        from maskrcnn.ops.match_triton import match_triton  # noqa: PLC0415 (needs Triton)
        # Detached: the outputs carry no gradient (the op has no autograd formula).
        best, matched, at_gt_best = match_triton(
            candidates.detach().float(), candidates_valid, gt_boxes.detach().float(), gt_valid,
            allow_low_quality)
        return matched, _labels(best, at_gt_best if allow_low_quality else None,
                                candidates_valid, fg_iou, bg_iou)
    gt = gt_boxes.float()
    gt_ok = gt_valid.unsqueeze(-1)  # (N, G, 1)

    def tile_iou(start: int) -> torch.Tensor:
        # (N, G, T): padded ground truth gets -1, so it never wins a match.
        iou = box_iou(gt, candidates[:, start:start + tile].float())
        return torch.where(gt_ok, iou, -1.0)

    def valid_only(iou: torch.Tensor, start: int) -> torch.Tensor:
        # The tile's IoUs with its invalid candidates set to -1 (for each gt's best).
        return torch.where(candidates_valid[:, None, start:start + tile], iou, -1.0)

    best, matched, best_per_gt = [], [], None
    one_tile = k <= tile  # then the second pass reuses the first pass's IoUs
    for start in range(0, k, tile):
        iou = tile_iou(start)
        tile_best, tile_matched = iou.max(dim=1)  # (N, T)
        best.append(tile_best)
        matched.append(tile_matched)
        if allow_low_quality:  # each ground truth's best IoU over the valid candidates
            tile_max = valid_only(iou, start).amax(dim=2)  # (N, G)
            best_per_gt = tile_max if best_per_gt is None else torch.maximum(best_per_gt,
                                                                             tile_max)
    best, matched = torch.cat(best, dim=1), torch.cat(matched, dim=1)  # (N, K)
    at_gt_best = None
    if allow_low_quality:
        target = best_per_gt.unsqueeze(-1)  # (N, G, 1)
        wanted = (target > 0) & gt_ok
        is_best = []
        for start in range(0, k, tile):
            usable = valid_only(iou if one_tile else tile_iou(start), start)
            is_best.append(((usable == target) & wanted).any(dim=1))  # (N, T)
        at_gt_best = torch.cat(is_best, dim=1)
    return matched, _labels(best, at_gt_best, candidates_valid, fg_iou, bg_iou)


def _labels(best: torch.Tensor, at_gt_best: torch.Tensor | None,
            candidates_valid: torch.Tensor, fg_iou: float, bg_iou: float) -> torch.Tensor:
    """`match`'s labels from each candidate's best IoU float[N, K] and, with
    allow_low_quality, whether it is at some ground truth's best bool[N, K] (else None)."""
    labels = torch.full(best.shape, IGNORE, dtype=torch.int64, device=best.device)
    labels = torch.where(best < bg_iou, BACKGROUND, labels)
    labels = torch.where(best >= fg_iou, FOREGROUND, labels)
    if at_gt_best is not None:
        labels = torch.where(at_gt_best, FOREGROUND, labels)
    return torch.where(candidates_valid, labels, IGNORE)


def match_reference(candidates: torch.Tensor, candidates_valid: torch.Tensor,
                    gt_boxes: torch.Tensor, gt_valid: torch.Tensor, fg_iou: float, bg_iou: float,
                    allow_low_quality: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for `match`: the whole float[N, G, K] IoU matrix at once (several copies of
    it: 860 MB each for 8 images x 100 slots x 268,569 anchors). Same arguments and outputs.
    """
    n, k = gt_boxes.shape[0], candidates.shape[-2]
    if k == 0:  # no candidate: nothing to label (the max over K below needs one)
        empty = torch.zeros(n, 0, dtype=torch.int64, device=gt_boxes.device)
        return empty, empty.clone()
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
