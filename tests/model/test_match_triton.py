"""The Triton matching kernels (interpreted on the CPU) against the whole-matrix reference and
the tiled PyTorch path, exactly: random cases with padded ground truth and invalid candidates,
ties, images without ground truth, degenerate boxes, partial and many blocks; the
torch.library registration, torch.compile tracing and compiling the kernels for a GPU. Sizes
are small: the interpreter runs one program at a time."""


import pytest
import torch

from maskrcnn.model.sampling import (
    BACKGROUND,
    FOREGROUND,
    IGNORE,
    match,
    match_reference,
)
from maskrcnn.ops.boxes import box_iou
from maskrcnn.ops.match_triton import match_triton
from tests.triton_compile import compile_for_gpu

# (fg_iou, bg_iou, allow_low_quality): the RPN's rule and the RoI heads' rule.
RULES = [(0.7, 0.3, True), (0.5, 0.5, False)]


def _case(seed: int, n: int = 3, g: int = 8, k: int = 1100, shared: bool = True):
    """Random boxes in a 200 px square with the cases matching must get right: padded slots,
    invalid candidates, image 1 without valid ground truth, ground-truth boxes repeated in
    another slot (ties between slots), candidates equal to ground truth and repeated far apart
    (ties at a ground truth's best, in different blocks), zero-area and inverted boxes.
    k >= 200, g >= 8."""
    gen = torch.Generator().manual_seed(seed)

    def boxes(*shape):
        xy = torch.rand(*shape, 2, generator=gen) * 200
        return torch.cat([xy, xy + 2 + torch.rand(*shape, 2, generator=gen) * 80], -1)

    gt = boxes(n, g)
    gt_valid = torch.rand(n, g, generator=gen) > 0.3
    gt_valid[:, :4] = True
    gt_valid[1] = False
    gt[0, 5] = gt[0, 1]  # a duplicate slot: ties go to slot 1
    gt_valid[0, 5] = True
    gt[0, 6] = torch.tensor([50.0, 50.0, 50.0, 90.0])  # zero area
    gt[0, 7] = torch.tensor([90.0, 90.0, 60.0, 60.0])  # inverted
    candidates = boxes(k) if shared else boxes(n, k)
    per_image = candidates if shared else candidates[0]
    per_image[10:13] = gt[0, :3]
    per_image[k - 3:] = gt[0, :3]  # the same boxes in the last, partial block
    per_image[k - 43:k - 3] = per_image[100:140]
    per_image[20:24] = torch.tensor([[50.0, 60.0, 50.0, 70.0], [50.0, 50.0, 50.0, 90.0],
                                     [70.0, 70.0, 70.0, 70.0], [90.0, 90.0, 60.0, 60.0]])
    valid = torch.rand(*candidates.shape[:-1], generator=gen) > 0.1
    return candidates, valid, gt, gt_valid


def _assert_same(args, **kwargs):
    ours = match(*args, method="triton", **kwargs)
    reference = match_reference(*args)
    tiled = match(*args, method="tiled", tile=256)
    for name, other in (("reference", reference), ("tiled", tiled)):
        assert torch.equal(ours[0], other[0]), f"matched differs from {name}"
        assert torch.equal(ours[1], other[1]), f"labels differ from {name}"
    return ours


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("rule", RULES)
def test_match_triton_equals_reference_and_tiled(shared, rule):
    """If this fails, the Triton path gives other matched ground truth or labels than the whole
    IoU matrix and the tiled path: an IoU rounded differently, a tie broken towards another
    slot, a ground truth's best lost at a block boundary or in the last partial block (1100
    candidates: a full block of 1024 and one of 76), the low-quality rule, padded slots,
    invalid candidates, shared [K, 4] or per-image [N, K, 4] candidates, or an image without
    ground truth."""
    args = (*_case(1 if shared else 2, shared=shared), *rule)
    matched, labels = _assert_same(args)
    assert (labels == FOREGROUND).sum() > 10  # the case has positives
    assert (matched[1] == 0).all()  # image 1 has no valid ground truth


def _whole_matrix(candidates, valid, gt, gt_valid):
    """best, matched and at_gt_best of the op, from the whole IoU matrix."""
    if candidates.dim() == 2:
        candidates, valid = candidates.expand(gt.shape[0], -1, -1), valid.expand(gt.shape[0], -1)
    iou = torch.where(gt_valid[..., None], box_iou(gt, candidates), -1.0)  # (N, G, K)
    best, matched = iou.max(dim=1)
    target = torch.where(valid[:, None], iou, -1.0).amax(dim=2, keepdim=True)  # (N, G, 1)
    wanted = (target > 0) & gt_valid[..., None]
    return best, matched, ((iou == target) & wanted).any(dim=1) & valid


@pytest.mark.parametrize("block", [32, 128])
def test_match_triton_small_blocks_equal_whole_matrix(block):
    """If this fails, the op's best IoU, matched slot or at-best flags differ from the whole
    matrix's when the candidates span many blocks (300 candidates: 10 or 3 blocks, the last
    partial) and ground truths' bests and ties lie in different blocks: the per-block bests
    are reduced wrongly, or a block reads another's candidates."""
    candidates, valid, gt, gt_valid = _case(3, k=300, shared=False)
    best, matched, at_gt_best = match_triton(candidates, valid, gt, gt_valid, True, block)
    expected = _whole_matrix(candidates, valid, gt, gt_valid)
    assert torch.equal(best, expected[0]) and best.dtype == torch.float32
    assert torch.equal(matched, expected[1]) and matched.dtype == torch.int64
    assert torch.equal(at_gt_best, expected[2]) and at_gt_best.sum() > 3
    _, _, none = match_triton(candidates, valid, gt, gt_valid, False, block)
    assert not none.any()  # not computed without allow_low_quality


def test_match_triton_ties_hand_case():
    """If this fails, ties are broken otherwise than by match: a candidate equally good for two
    slots (a duplicated ground truth) must take the first slot, and every valid candidate at a
    ground truth's best IoU (identical candidates) must be foreground with allow_low_quality,
    while an invalid one at the same IoU stays ignored."""
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0],
                        [100.0, 100.0, 120.0, 120.0], [0.0, 0.0, 1.0, 1.0]]])
    gt_valid = torch.tensor([[True, True, True, False]])
    candidates = torch.tensor([[0.0, 0.0, 10.0, 10.0],      # IoU 1 with slots 0 and 1
                               [100.0, 100.0, 110.0, 130.0],  # IoU 1/3 with slot 2, twice
                               [100.0, 100.0, 110.0, 130.0],
                               [100.0, 100.0, 110.0, 130.0],  # the same, invalid
                               [50.0, 50.0, 60.0, 60.0]])   # nothing
    valid = torch.tensor([True, True, True, False, True])
    for rule, expected in (((0.7, 0.3, True), [FOREGROUND, FOREGROUND, FOREGROUND, IGNORE,
                                               BACKGROUND]),
                           ((0.7, 0.3, False), [FOREGROUND, IGNORE, IGNORE, IGNORE, BACKGROUND])):
        matched, labels = _assert_same((candidates, valid, gt, gt_valid, *rule))
        assert matched.tolist() == [[0, 2, 2, 2, 0]]
        assert labels.tolist() == [expected]


@pytest.mark.parametrize("rule", RULES)
def test_match_triton_images_without_ground_truth(rule):
    """If this fails, an image whose slots are all padding matches something (matched must be
    0), labels its valid candidates other than background (invalid ones ignored), or the
    low-quality rule makes one foreground; also with no valid candidate at all in image 0."""
    candidates, valid, gt, gt_valid = _case(4, k=200, shared=False)
    gt_valid[2] = False
    valid[0] = False
    matched, labels = _assert_same((candidates, valid, gt, gt_valid, *rule))
    for image in (1, 2):
        assert (matched[image] == 0).all()
        assert torch.equal(labels[image], torch.where(valid[image], BACKGROUND, IGNORE))
    assert (labels[0] == IGNORE).all()


def test_match_triton_degenerate_boxes():
    """If this fails, zero-area or inverted boxes get another IoU than box_iou gives them (0
    where the union has no area, not NaN; negative areas as computed), so the kernel's
    arithmetic departs from box_iou's: candidates and ground truth all degenerate or
    inverted, some coinciding."""
    point = torch.tensor([[5.0, 5.0, 5.0, 5.0]])
    gt = torch.cat([point, torch.tensor([[0.0, 0.0, 0.0, 10.0], [10.0, 10.0, 0.0, 0.0],
                                         [0.0, 0.0, 10.0, 10.0]])])[None]
    candidates = torch.cat([point, torch.tensor([[0.0, 0.0, 0.0, 10.0], [10.0, 10.0, 0.0, 0.0],
                                                 [0.0, 0.0, 10.0, 0.0], [2.0, 2.0, 8.0, 8.0],
                                                 [8.0, 8.0, 2.0, 2.0]])])
    valid = torch.ones(6, dtype=torch.bool)
    for rule in RULES:
        _assert_same((candidates, valid, gt, torch.ones(1, 4, dtype=torch.bool), *rule))
    best, _, _ = match_triton(candidates, valid, gt, torch.ones(1, 4, dtype=torch.bool), True)
    expected = _whole_matrix(candidates, valid, gt, torch.ones(1, 4, dtype=torch.bool))[0]
    assert torch.equal(best, expected) and torch.isfinite(best).all()


def test_match_triton_unsupported_dtype_is_an_error():
    """If this fails, the op accepts boxes in a dtype its kernels do not read instead of
    raising a ValueError that names it. (Misspelt methods: test_runtime.py.)"""
    candidates, valid, gt, gt_valid = _case(5, k=200)
    with pytest.raises(ValueError, match="float32"):
        match_triton(candidates.double(), valid, gt, gt_valid, True)


def test_match_triton_library_registration():
    """If this fails, the op's schema or fake implementation (shapes, dtypes) disagree with what
    it computes, so torch.compile would trace other shapes than eager runs: shared and
    per-image candidates."""
    for shared in (True, False):
        candidates, valid, gt, gt_valid = _case(6, n=2, k=200, shared=shared)
        torch.library.opcheck(match_triton, (candidates, valid, gt, gt_valid, True, 128))


def test_match_triton_compiles_without_graph_breaks():
    """If this fails, match(method="triton") breaks the torch.compile graph (the Triton launch
    or a host read leaked out of the op, or the lazy import) or the compiled matching differs
    from eager."""
    candidates, valid, gt, gt_valid = _case(7, k=300)

    def match_and_count(candidates, valid, gt, gt_valid):
        matched, labels = match(candidates, valid, gt, gt_valid, 0.7, 0.3, True,
                                method="triton")
        return matched, labels, (labels == FOREGROUND).sum()

    explanation = torch._dynamo.explain(match_and_count)(candidates, valid, gt, gt_valid)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(match_and_count, fullgraph=True, backend="aot_eager")
    for ours, eager in zip(compiled(candidates, valid, gt, gt_valid),
                           match_and_count(candidates, valid, gt, gt_valid), strict=True):
        assert torch.equal(ours, eager)


def test_match_triton_kernels_compile_for_a_gpu():
    """If this fails, a kernel that the interpreter runs does not compile for a GPU (sm_90, the
    RPN's 8 images x 100 slots x 268,569 anchors and the RoI heads' 1,100 candidates), so it
    would fail on the first CUDA step, or spills registers, or its PTX fuses a multiply and an
    add (FMA) or divides approximately, so its IoUs could differ from torch's in the last
    bit."""
    compiled = compile_for_gpu("match")
    assert [(kernel, case) for kernel, case, *_ in compiled] == [
        ("_best_match_kernel", "rpn"), ("_at_gt_best_kernel", "rpn"),
        ("_best_match_kernel", "roi-heads")]
    for kernel, case, _, _, spills, fma, div_rn in compiled:
        assert spills == 0 and fma == 0 and div_rn > 0, (kernel, case)
