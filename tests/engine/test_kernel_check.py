"""The kernel comparisons (engine/kernel_check.py) at Sizes.small(), the Triton kernels run by
the interpreter on CPU tensors: each fast path passes, and a kernel that raises or computes
wrong values fails its row without raising."""

import math

import pytest
import torch

from maskrcnn.engine import kernel_check
from maskrcnn.engine.kernel_check import Sizes, compare_op
from maskrcnn.ops import match_triton, nms_triton, roi_align_triton

CPU = torch.device("cpu")
ROWS = {"nms": ["nms"], "proposals": ["proposals"], "match": ["match"],
        "roi_align": ["roi_align", "roi_align_backward"]}


@pytest.mark.parametrize("op", ["nms", "proposals", "roi_align", "match"])
def test_triton_passes(op):
    """If this fails, the Triton kernel disagrees with its PyTorch path at the small sizes (or
    the comparison is wrong), and the GPU fallback would drop a good kernel."""
    rows = compare_op(op, "triton", CPU, Sizes.small())
    assert [r.op for r in rows] == ROWS[op]
    for row in rows:
        assert row.ok, row
        assert (row.method, row.reference, row.error) == ("triton", kernel_check.reference_of(
            op, "triton"), None)
        assert row.ms > 0


@pytest.mark.parametrize("op, method", [("nms", "torch"), ("nms", "per_cell"),
                                        ("proposals", "per_cell"), ("roi_align", "gather"),
                                        ("match", "tiled"), ("paste_masks", "matmul")])
def test_pytorch_paths_pass(op, method):
    """If this fails, a CPU path disagrees with its reference (maskrcnn-check on a CPU would
    report a failure), or a comparison compares a path with itself."""
    rows = compare_op(op, method, CPU, Sizes.small())
    assert all(r.ok for r in rows), rows
    assert all(r.reference not in (method, "") for r in rows)


def _raise(*args, **kwargs):
    raise RuntimeError("PassManager::run failed\nfull MLIR dump follows")


@pytest.mark.parametrize("op, module, name", [
    ("nms", nms_triton, "greedy_nms_triton"),
    ("proposals", nms_triton, "greedy_nms_triton"),
    ("roi_align", roi_align_triton, "_launch"),
    ("match", match_triton, "match_triton"),
])
def test_raising_kernel_fails_without_raising(monkeypatch, op, module, name):
    """If this fails, a kernel that cannot compile or launch either crashes the check (and the
    training run that checks before its first step) or passes it."""
    monkeypatch.setattr(module, name, _raise)
    rows = compare_op(op, "triton", CPU, Sizes.small())
    assert [r.op for r in rows] == ROWS[op]
    for row in rows:
        assert not row.ok
        assert row.error == "RuntimeError: PassManager::run failed"
        assert row.max_diff == math.inf
        assert row.reference == kernel_check.reference_of(op, "triton")


def _keep_all(boxes, groups, count, iou_threshold, max_out):
    return torch.ones(groups.shape, dtype=torch.bool)


def _match_nothing(candidates, candidates_valid, gt_boxes, gt_valid, allow_low_quality):
    n, k = gt_valid.shape[0], candidates.shape[-2]
    return (torch.zeros(n, k), torch.zeros(n, k, dtype=torch.int64),
            torch.zeros(n, k, dtype=torch.bool))


@pytest.mark.parametrize("op, module, name, wrong", [
    ("nms", nms_triton, "greedy_nms_triton", _keep_all),
    ("proposals", nms_triton, "greedy_nms_triton", _keep_all),
    ("roi_align", roi_align_triton, "_launch", lambda *args, **kwargs: None),
    ("match", match_triton, "match_triton", _match_nothing),
])
def test_wrong_kernel_fails(monkeypatch, op, module, name, wrong):
    """If this fails, a kernel that runs but computes wrong values (NMS keeping every box,
    ROIAlign writing nothing, matching finding no overlap) passes the check."""
    monkeypatch.setattr(module, name, wrong)
    rows = compare_op(op, "triton", CPU, Sizes.small())
    assert [r.op for r in rows] == ROWS[op]
    for row in rows:
        assert not row.ok
        assert row.error is None
        # Exact ops: many differing entries; float ops: about the size of the values.
        assert row.max_diff >= (0.5 if op in ("roi_align", "proposals") else 10), row


def test_inputs_are_seeded():
    """If this fails, two runs of the check compare different inputs (a failure could not be
    reproduced), or the seed is ignored."""
    sizes = Sizes.small()
    first, again, other = (kernel_check._nms_inputs(sizes, torch.Generator().manual_seed(s))
                           for s in (0, 0, 1))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_nms_inputs_have_ties_and_degenerate_boxes():
    """If this fails, the NMS comparison no longer covers equal scores, duplicate boxes and
    zero-width boxes, where a tie-breaking bug would show."""
    boxes, scores, valid, _ = kernel_check._nms_inputs(Sizes.small(),
                                                       torch.Generator().manual_seed(0))
    assert scores[0].unique().numel() < scores.shape[1]
    assert torch.equal(boxes[:, 1], boxes[:, 0])
    assert (boxes[..., 2] == boxes[..., 0]).any()
    assert not valid.all()


def test_from_config_8x4():
    """If this fails, maskrcnn-check runs the comparisons at other sizes than the recipe's."""
    from maskrcnn.config import load_config  # noqa: PLC0415

    sizes = Sizes.from_config(load_config("8x4"))
    assert (sizes.images, sizes.height, sizes.width) == (4, 800, 1344)
    assert (sizes.gt_slots, sizes.pre_nms_topk, sizes.post_nms_topk) == (100, 2000, 1000)
    assert (sizes.rois_per_image, sizes.channels, sizes.pooler_resolution) == (512, 256, 7)
    assert sizes.strides == (4, 8, 16, 32, 64)


def test_unknown_op_raises():
    """If this fails, a typo in an op name would silently check nothing."""
    with pytest.raises(ValueError, match="unknown op"):
        compare_op("nmss", "triton", CPU, Sizes.small())
