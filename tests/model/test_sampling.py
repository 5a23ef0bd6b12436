"""Matching and fixed-size sampling, on hand-made cases."""

import torch

from maskrcnn.model.sampling import BACKGROUND, FOREGROUND, IGNORE, match, sample


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
                            allow_low_quality=False)
    assert labels.tolist() == [[FOREGROUND, IGNORE, BACKGROUND, BACKGROUND]]
    assert matched[0, 0] == 0
    # Without the perfect candidate, the best remaining one (IoU 0.625) becomes foreground.
    valid = torch.tensor([False, True, True, True])
    _, labels = match(candidates, valid, gt, gt_valid, 0.7, 0.3, allow_low_quality=True)
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
