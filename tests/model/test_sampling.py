"""Matching and fixed-size sampling, on hand-made cases."""

import pytest
import torch

from maskrcnn.model.sampling import (
    BACKGROUND,
    FOREGROUND,
    IGNORE,
    match,
    match_reference,
    sample,
)


def test_match_labels_and_low_quality_matches():
    """If this fails, anchors get the wrong labels: IoU >= fg is foreground, < bg background,
    between ignored; a ground truth with no good anchor still gets its best one; padded
    ground truth never matches."""
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]]])
    gt_valid = torch.tensor([[True, False]])
    candidates = torch.tensor([[0.0, 0.0, 10.0, 10.0],   # IoU 1
                               [0.0, 0.0, 10.0, 16.0],   # IoU 0.625 -> ignore
                               [50.0, 50.0, 60.0, 60.0],  # IoU 0 -> background
                               [100.0, 100.0, 110.0, 110.0]])  # only matches padding
    matched, labels = match(candidates, torch.ones(4, dtype=torch.bool), gt, gt_valid, 0.7, 0.3,
                            allow_low_quality=False, method="tiled")
    assert labels.tolist() == [[FOREGROUND, IGNORE, BACKGROUND, BACKGROUND]]
    assert matched[0, 0] == 0
    # Without the perfect candidate, the best remaining one (IoU 0.625) becomes foreground.
    valid = torch.tensor([False, True, True, True])
    _, labels = match(candidates, valid, gt, gt_valid, 0.7, 0.3, allow_low_quality=True,
                      method="tiled")
    assert labels.tolist() == [[IGNORE, FOREGROUND, BACKGROUND, BACKGROUND]]


def _keys(labels):
    return torch.arange(labels.shape[1], dtype=torch.float32).expand_as(labels) / labels.shape[1]


def test_sample_counts_and_order():
    """If this fails, sampling takes more positives than allowed, fewer samples than
    available, or does not put positives first."""
    labels = torch.tensor([[1, 1, 1, 0, 0, 0, 0, -1, 0, 1]])
    index, is_fg, valid = sample(labels, 4, 0.5, _keys)
    assert valid.all() and is_fg.tolist() == [[True, True, False, False]]
    assert labels[0, index[0, :2]].eq(1).all() and labels[0, index[0, 2:]].eq(0).all()
    # Highest keys win: positives 9 and 2, negatives 8 and 6.
    assert index.tolist() == [[9, 2, 8, 6]]


def test_sample_pads_when_candidates_run_out():
    """If this fails, images with few candidates get garbage samples marked valid."""
    labels = torch.tensor([[1, -1, -1, 0, -1, -1], [-1, -1, -1, -1, -1, -1]])
    index, is_fg, valid = sample(labels, 4, 0.25, _keys)
    assert valid.tolist() == [[True, True, False, False], [False] * 4]
    assert is_fg.tolist() == [[True, False, False, False], [False] * 4]
    assert index[0, :2].tolist() == [0, 3]


def test_random_sampling_is_balanced():
    """If this fails, the random keys are biased towards some candidates."""
    torch.manual_seed(0)
    labels = torch.zeros(1, 1000, dtype=torch.int64)
    counts = torch.zeros(1000)
    for _ in range(200):
        index, _, _ = sample(labels, 100, 0.5)
        counts[index[0]] += 1
    assert counts.min() > 5 and counts.max() < 45  # expected 20 each


def _random_matching_case(seed, n=3, g=7, k=1000, shared=True):
    gen = torch.Generator().manual_seed(seed)
    def boxes(*shape):
        xy = torch.rand(*shape, 2, generator=gen) * 200
        return torch.cat([xy, xy + 2 + torch.rand(*shape, 2, generator=gen) * 80], -1)
    candidates = boxes(k) if shared else boxes(n, k)
    # Some candidates duplicate a ground-truth box exactly (ties at IoU 1), some repeat
    # another candidate (ties at each ground truth's best).
    gt = boxes(n, g)
    gt_valid = torch.rand(n, g, generator=gen) > 0.3
    if shared:
        candidates[10:13] = gt[0, :3]
        candidates[500:520] = candidates[100:120]
        valid = torch.rand(k, generator=gen) > 0.1
    else:
        candidates[:, 10:13] = gt[:, :3]
        valid = torch.rand(n, k, generator=gen) > 0.1
    return candidates, valid, gt, gt_valid


@pytest.mark.parametrize("tile", [1, 64, 999, 1000, 4096])
@pytest.mark.parametrize("shared", [True, False])
def test_tiled_match_equals_the_whole_matrix(tile, shared):
    """If this fails, matching candidates in tiles (anchors without the N x G x A IoU matrix)
    gives other matched ground truth or labels than the whole matrix: a tile boundary loses
    a ground truth's best IoU, a tie, or the low-quality rule."""
    for low_quality, thresholds in ((True, (0.7, 0.3)), (False, (0.5, 0.5))):
        args = (*_random_matching_case(tile, shared=shared), *thresholds, low_quality)
        ours = match(*args, "tiled", tile=tile)
        ref = match_reference(*args)
        assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
        assert (ref[1] == FOREGROUND).sum() > 3  # the case has positives


@pytest.mark.parametrize("shared", [True, False])
def test_match_reference_accepts_zero_candidates(shared):
    """If this fails, the reference crashes on an image batch with no candidates (the max over
    zero candidates of the low-quality rule) or returns other shapes than `match`, so it cannot
    check `match` there."""
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0]], [[5.0, 5.0, 9.0, 9.0]]])
    gt_valid = torch.ones(2, 1, dtype=torch.bool)
    candidates = torch.zeros(0, 4) if shared else torch.zeros(2, 0, 4)
    valid = torch.zeros(candidates.shape[:-1], dtype=torch.bool)
    for low_quality in (True, False):
        ref = match_reference(candidates, valid, gt, gt_valid, 0.7, 0.3, low_quality)
        ours = match(candidates, valid, gt, gt_valid, 0.7, 0.3, low_quality, "tiled")
        for r, o in zip(ref, ours, strict=True):
            assert r.shape == o.shape == (2, 0) and r.dtype == o.dtype == torch.int64
