"""Fixed-size batched NMS against torchvision's batched_nms and a per-box reference loop."""

import functools

import pytest
import torch
from torchvision.ops import batched_nms

from maskrcnn.ops import nms as nms_module
from maskrcnn.ops.nms import nms_reference
from maskrcnn.runtime import NMS_METHODS
from tests.triton_compile import compile_for_gpu


@pytest.fixture(params=[*NMS_METHODS, "loop"])
def method(request):
    """Every test runs every method: the Triton kernel (interpreted on a CPU), the static
    PyTorch loop, torchvision per (row, group) cell, torchvision once with shifted boxes, and
    the export's while_loop."""
    return request.param


@pytest.fixture
def batched_nms_fixed(method):
    """The op with the method under test."""
    return functools.partial(nms_module.batched_nms_fixed, method=method)


def _random_batch(b, k, seed, groups=3, score_levels=None, size=100.0):
    """Random boxes float32[B, K, 4] (some degenerate), scores, valid (80%), groups."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(b, k, 2, generator=g) * size
    wh = torch.rand(b, k, 2, generator=g) * size / 3
    wh = wh * (torch.rand(b, k, 2, generator=g) > 0.1)  # zero width or height, or a point
    boxes = torch.cat([xy, xy + wh], dim=-1)
    scores = torch.rand(b, k, generator=g)
    if score_levels is not None:  # many equal scores
        scores = (scores * score_levels).floor() / score_levels
    valid = torch.rand(b, k, generator=g) > 0.2
    return boxes, scores, valid, torch.randint(0, groups, (b, k), generator=g)


def _torchvision(boxes, scores, valid, groups, iou_threshold, max_out):
    """Per row: torchvision's batched_nms over the valid boxes, as indices into K."""
    rows = []
    for i in range(boxes.shape[0]):
        candidates = valid[i].nonzero().squeeze(1)
        kept = batched_nms(boxes[i, candidates], scores[i, candidates], groups[i, candidates],
                           iou_threshold)
        rows.append(candidates[kept][:max_out])
    return rows


def _check(nms_op, boxes, scores, valid, groups, iou_threshold, max_out):
    indices, keep = nms_op(boxes, scores, valid, groups, iou_threshold, max_out)
    b = boxes.shape[0]
    assert indices.shape == keep.shape == (b, max_out)
    assert indices.dtype == torch.int64 and keep.dtype == torch.bool
    ref_indices, ref_keep = nms_reference(boxes.double(), scores.double(), valid, groups,
                                          iou_threshold, max_out)
    torch.testing.assert_close(indices, ref_indices, rtol=0, atol=0)
    torch.testing.assert_close(keep, ref_keep, rtol=0, atol=0)
    for i, theirs in enumerate(_torchvision(boxes, scores, valid, groups, iou_threshold,
                                            max_out)):
        torch.testing.assert_close(indices[i, keep[i]], theirs, rtol=0, atol=0)
        # Kept boxes come first; padding holds index 0.
        assert keep[i, :len(theirs)].all() and not keep[i, len(theirs):].any()
        assert (indices[i, len(theirs):] == 0).all()
    return indices, keep


def test_hand_case(batched_nms_fixed):
    """If this fails, the greedy order, the strict IoU > threshold rule or the groups are
    wrong: box 1 (IoU 0.5 with box 0) survives at threshold 0.5, box 2 (IoU 1/3 with box 3,
    IoU 0.6 with box 0) is suppressed by box 0, box 4 is the same box as box 0 in another
    group, box 5 is invalid."""
    boxes = torch.tensor([[[0.0, 0.0, 4.0, 1.0], [0.0, 0.0, 2.0, 1.0], [1.0, 0.0, 4.0, 1.0],
                           [3.0, 0.0, 5.0, 1.0], [0.0, 0.0, 4.0, 1.0], [0.0, 0.0, 4.0, 1.0]]])
    scores = torch.tensor([[0.9, 0.5, 0.8, 0.7, 0.6, 1.0]])
    valid = torch.tensor([[True, True, True, True, True, False]])
    groups = torch.tensor([[0, 0, 0, 0, 1, 0]])
    indices, keep = _check(batched_nms_fixed, boxes, scores, valid, groups, 0.5, 6)
    assert indices[0, keep[0]].tolist() == [0, 3, 4, 1]


@pytest.mark.parametrize("max_out", [5, 40, 400])
def test_random_rows_match_torchvision(batched_nms_fixed, max_out):
    """If this fails, some row keeps different boxes than torchvision's batched_nms (rows or
    groups leak into each other, the output is not sorted by score, or truncation to max_out
    / padding beyond the kept boxes is wrong)."""
    _check(batched_nms_fixed, *_random_batch(4, 200, seed=0), 0.5, max_out)
    _check(batched_nms_fixed, *_random_batch(2, 150, seed=1, groups=1), 0.3, max_out)


def test_equal_scores_lower_index_wins(batched_nms_fixed):
    """If this fails, ties are broken differently from torchvision's stable sort (the lower
    index should be visited first), so results depend on the sort used."""
    _check(batched_nms_fixed, *_random_batch(3, 200, seed=2, score_levels=3), 0.5, 100)
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0]] * 4])
    scores = torch.ones(1, 4)
    indices, keep = _check(batched_nms_fixed, boxes, scores, torch.ones(1, 4, dtype=torch.bool),
                           torch.tensor([[0, 1, 0, 1]]), 0.5, 4)
    assert indices[0, keep[0]].tolist() == [0, 1]


def test_invalid_and_empty_rows(batched_nms_fixed):
    """If this fails, a row with no valid boxes (or no boxes at all, or max_out 0) crashes or
    returns kept slots, or one empty row disturbs the others."""
    boxes, scores, valid, groups = _random_batch(3, 50, seed=3)
    valid[1] = False
    indices, keep = _check(batched_nms_fixed, boxes, scores, valid, groups, 0.5, 20)
    assert not keep[1].any() and keep[0].any() and keep[2].any()
    valid[:] = False
    indices, keep = _check(batched_nms_fixed, boxes, scores, valid, groups, 0.5, 20)
    assert not keep.any()
    empty = _check(batched_nms_fixed, torch.zeros(2, 0, 4), torch.zeros(2, 0),
                   torch.zeros(2, 0, dtype=torch.bool), torch.zeros(2, 0, dtype=torch.int64),
                   0.5, 7)
    assert empty[0].shape == (2, 7) and not empty[1].any()
    zero_out = _check(batched_nms_fixed, boxes, scores, valid | True, groups, 0.5, 0)
    assert zero_out[0].shape == (3, 0)


def test_offsets_keep_precision(batched_nms_fixed):
    """If this fails, the shift that separates rows and groups rounds the coordinates (as
    float32 would at 16 rows x 80 groups x 1300 px): a pair with IoU just above the
    threshold in the last (row, group) cell must still be suppressed, one just below not."""
    b, k = 16, 160
    boxes = torch.zeros(b, k, 4)
    boxes[:, :, 2:] = 1300.0
    groups = torch.arange(k).div(2, rounding_mode="floor").expand(b, -1).contiguous()
    # Last cell: boxes 156, 157 (IoU 0.5 + 2e-5) and 158, 159 (IoU 0.5 - 2e-5), in group 79.
    base = torch.tensor([100.0, 100.0, 1100.0, 1100.0])
    boxes[-1, 156:] = base
    boxes[-1, 157] = torch.tensor([100.0, 100.0, 1100.0, 600.02])
    boxes[-1, 159] = torch.tensor([100.0, 100.0, 1100.0, 599.98])
    groups[-1, 158:] = 80
    scores = torch.linspace(1.0, 0.5, k).expand(b, -1)
    indices, keep = batched_nms_fixed(boxes, scores, torch.ones(b, k, dtype=torch.bool), groups,
                                      0.5, k)
    last = indices[-1, keep[-1]].tolist()
    assert 156 in last and 157 not in last and 158 in last and 159 in last


def test_degenerate_huge_and_equal(batched_nms_fixed):
    """If this fails, boxes of zero or negative area, huge boxes (1e6 px, where float32 areas
    lose their last digits) or a row whose scores are all equal are handled differently from
    torchvision: a zero-area box suppresses nothing and is never suppressed (0 / 0 IoU)."""
    g = torch.Generator().manual_seed(6)
    xy = torch.rand(2, 120, 2, generator=g) * 1e6
    wh = torch.rand(2, 120, 2, generator=g) * 3e5
    boxes = torch.cat([xy, xy + wh], dim=-1)
    boxes[:, :20, 2:] = boxes[:, :20, :2]  # points
    boxes[:, 20:30, 2] = boxes[:, 20:30, 0] - 5  # inverted: negative width
    scores = torch.rand(2, 120, generator=g)
    scores[1] = 0.25  # all equal: rank by index
    valid = torch.ones(2, 120, dtype=torch.bool)
    groups = torch.randint(0, 2, (2, 120), generator=g)
    _check(batched_nms_fixed, boxes, scores, valid, groups, 0.4, 120)
    _check(batched_nms_fixed, boxes, scores, valid, groups, 0.0, 30)


def test_float16_boxes_whose_areas_overflow(batched_nms_fixed):
    """If this fails, float16 boxes over 256 px wide (areas past float16's 65504, so inf / inf
    IoUs) are kept although they overlap, or one method refuses them: every method must
    suppress as the float64 reference does."""
    boxes, scores, valid, groups = _random_batch(2, 60, seed=9)
    g = torch.Generator().manual_seed(10)
    xy = torch.rand(2, 60, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + 300 + torch.rand(2, 60, 2, generator=g) * 300], -1).half()
    scores = scores.half()
    indices, keep = batched_nms_fixed(boxes, scores, valid, groups, 0.5, 60)
    ref_indices, ref_keep = nms_reference(boxes.double(), scores.double(), valid, groups, 0.5, 60)
    torch.testing.assert_close(indices, ref_indices, rtol=0, atol=0)
    torch.testing.assert_close(keep, ref_keep, rtol=0, atol=0)
    assert keep.sum() < valid.sum() - 10  # many suppressed: the case tests something


@pytest.mark.parametrize("max_out", [50, 2000])
def test_2000_candidates_several_groups(method, max_out):
    """If this fails, a row of RPN size (2000 candidates of 4 groups, as one FPN level's
    pre-NMS top-k) keeps different boxes than torchvision, whether max_out is smaller than the
    number kept or larger than the row. The Triton interpreter and the reference loop are slow
    at this size: one row for them."""
    rows = 1 if method == "triton" else 3
    boxes, scores, valid, groups = _random_batch(rows, 2000, seed=7, groups=4, size=800.0)
    indices, keep = nms_module.batched_nms_fixed(boxes, scores, valid, groups, 0.7, max_out,
                                                 method=method)
    for i, theirs in enumerate(_torchvision(boxes, scores, valid, groups, 0.7, max_out)):
        assert keep[i].sum() == len(theirs) and len(theirs) > 40
        torch.testing.assert_close(indices[i, :len(theirs)], theirs, rtol=0, atol=0)



def test_op_registration(method):
    """If this fails, the op's fake implementation or schema is wrong, so torch.compile
    cannot trace it (see also tests/ops/test_proposals.py for a whole-graph check)."""
    op = nms_module.batched_nms_fixed
    args = (*_random_batch(2, 30, seed=4), 0.5, 10, method)
    torch.library.opcheck(op, args)
    compiled = torch.compile(op, backend="eager", fullgraph=True)
    for ours, theirs in zip(compiled(*args), op(*args), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_nms_kernel_compiles_for_a_gpu():
    """If this fails, the NMS kernel that the interpreter runs does not compile for a GPU
    (sm_90; the RPN's 40 rows of 2000 and 1000 candidates, the box head's 8 rows of 5000), so
    "triton" would fail on the first CUDA step, or it spills registers, or its PTX fuses a
    multiply and an add (FMA) or divides approximately: an IoU at the threshold could then
    round to the other side of it than in the "torch" method that maskrcnn-check compares the
    kernel with exactly."""
    compiled = compile_for_gpu("nms")
    assert [(kernel, case) for kernel, case, *_ in compiled] == [
        ("_greedy_nms_kernel", "rpn-train"), ("_greedy_nms_kernel", "rpn-test"),
        ("_greedy_nms_kernel", "box-head")]
    for _, case, _, _, spills, fma, div_rn in compiled:
        assert spills == 0 and fma == 0 and div_rn > 0, case
