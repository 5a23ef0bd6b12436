"""RPN proposal generation against a per-image torchvision reference and torchvision's own
RegionProposalNetwork.filter_proposals; tracing of the custom ops by torch.compile."""

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.rpn import RegionProposalNetwork

from maskrcnn.ops.nms import batched_nms_fixed
from maskrcnn.ops.proposals import generate_proposals, generate_proposals_reference
from maskrcnn.runtime import NMS_METHODS

# A 64 x 96 canvas; level shapes (H_l, W_l) for strides 8, 16, 32 with 3 anchors per location.
CANVAS = (64, 96)
STRIDES = (8, 16, 32)
IMAGE_SIZES = torch.tensor([[60, 80], [45, 70]])  # two images, smaller than the canvas


def _random_rpn_outputs(seed):
    """Per level objectness float32[2, A_l], deltas float32[2, A_l, 4], anchors float32[A_l, 4]
    (grid anchors of 2, 4 and 8 strides around each location, partly outside the canvas)."""
    g = torch.Generator().manual_seed(seed)
    objectness, deltas, anchors = [], [], []
    for stride in STRIDES:
        h, w = CANVAS[0] // stride, CANVAS[1] // stride
        ys, xs = torch.meshgrid(torch.arange(h) * stride, torch.arange(w) * stride,
                                indexing="ij")
        centres = torch.stack([xs, ys], dim=-1).reshape(-1, 1, 2).float()  # (H*W, 1, 2)
        half = torch.tensor([1.0, 2.0, 4.0]).reshape(1, 3, 1) * stride  # (1, 3, 1)
        # (H*W, 3, 4) -> (H*W*3, 4), location-major as the RPN head's output
        anchors.append(torch.cat([centres - half, centres + half], dim=-1).reshape(-1, 4))
        a = h * w * 3
        objectness.append(torch.randn(2, a, generator=g) * 2)
        deltas.append(torch.randn(2, a, 4, generator=g) * 0.3)
    return objectness, deltas, anchors


@pytest.fixture(params=NMS_METHODS)
def nms_method(request):
    """Proposal tests run with every NMS method (ops/nms.py; the Triton kernel interpreted on
    a CPU): the synchronisation-free ones take all levels in one call, the others one per
    level."""
    return request.param


def _compare_with_reference(objectness, deltas, anchors, image_sizes, *args, nms_method):
    boxes, scores, valid = generate_proposals(objectness, deltas, anchors, image_sizes, *args,
                                              nms_method=nms_method)
    ref_boxes, ref_scores, ref_valid = generate_proposals_reference(
        [o.double() for o in objectness], [d.double() for d in deltas],
        [a.double() for a in anchors], image_sizes, *args)
    post = args[1]
    assert boxes.shape == (2, post, 4) and scores.shape == valid.shape == (2, post)
    assert boxes.dtype == scores.dtype == torch.float32 and valid.dtype == torch.bool
    torch.testing.assert_close(valid, ref_valid, rtol=0, atol=0)
    torch.testing.assert_close(boxes.double(), ref_boxes, rtol=0, atol=1e-4)
    torch.testing.assert_close(scores.double(), ref_scores, rtol=0, atol=1e-6)
    return boxes, scores, valid


@pytest.mark.parametrize(("pre_nms_topk", "post_nms_topk"), [(40, 30), (40, 300), (1000, 1000)])
def test_matches_reference(pre_nms_topk, post_nms_topk, nms_method):
    """If this fails, proposals differ from torchvision's algorithm run image by image in
    float64: per-level top-k (smaller or larger than the level), decoding, clipping to each
    image's own size, small-box removal, NMS per level, the best post_nms_topk over levels,
    or the padding when fewer remain."""
    objectness, deltas, anchors = _random_rpn_outputs(seed=0)
    _, _, valid = _compare_with_reference(objectness, deltas, anchors, IMAGE_SIZES,
                                          pre_nms_topk, post_nms_topk, 0.7, 2.0,
                                          nms_method=nms_method)
    assert valid[:, 0].all()


def test_matches_torchvision_filter_proposals():
    """If this fails, our proposals are not torchvision's RPN proposals (boxes, order, or
    scores, which torchvision returns as probabilities)."""
    objectness, deltas, anchors = _random_rpn_outputs(seed=1)
    rpn = RegionProposalNetwork(None, None, 0.7, 0.3, 256, 0.5, {"training": 50, "testing": 50},
                                {"training": 100, "testing": 100}, 0.6).train()
    rpn.min_size = 1.5
    all_anchors = torch.cat(anchors)  # (A, 4)
    all_deltas = torch.cat(deltas, dim=1)  # (2, A, 4)
    decoded = BoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(
        all_deltas.reshape(-1, 4), all_anchors.repeat(2, 1)).reshape(2, -1, 4)
    theirs_boxes, theirs_probs = rpn.filter_proposals(
        decoded, torch.cat(objectness, dim=1), [tuple(s) for s in IMAGE_SIZES.tolist()],
        [a.shape[0] for a in anchors])
    boxes, scores, valid = generate_proposals(objectness, deltas, anchors, IMAGE_SIZES, 50, 100,
                                              0.6, 1.5, "per_cell")
    for i in range(2):
        count = theirs_boxes[i].shape[0]
        assert valid[i, :count].all() and not valid[i, count:].any()
        torch.testing.assert_close(boxes[i, :count], theirs_boxes[i])
        torch.testing.assert_close(scores[i, :count].sigmoid(), theirs_probs[i])


def test_clips_to_image_not_canvas_and_pads(nms_method):
    """If this fails, boxes are clipped to the padded canvas (or the wrong image) instead of
    each image's content, zero-area boxes (an anchor wholly outside the image) or boxes
    under min_size survive, or padding slots are not box 0, score 0, valid False."""
    anchors = [torch.tensor([[-10.0, -10.0, 200.0, 200.0], [50.0, 60.0, 90.0, 90.0],
                             [0.0, 0.0, 1.0, 40.0]])]
    objectness = [torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])]
    deltas = [torch.zeros(2, 3, 4)]
    image_sizes = torch.tensor([[30, 40], [80, 20]])
    boxes, scores, valid = _compare_with_reference(objectness, deltas, anchors, image_sizes,
                                                   10, 4, 0.7, 0.0, nms_method=nms_method)
    expected = torch.tensor([[[0.0, 0.0, 40.0, 30.0], [0.0, 0.0, 1.0, 30.0]] + [[0.0] * 4] * 2,
                             [[0.0, 0.0, 20.0, 80.0], [0.0, 0.0, 1.0, 40.0]] + [[0.0] * 4] * 2])
    torch.testing.assert_close(boxes, expected)
    torch.testing.assert_close(scores, torch.tensor([[3.0, 1.0, 0.0, 0.0]] * 2))
    assert valid.tolist() == [[True, True, False, False]] * 2
    _, _, valid = _compare_with_reference(objectness, deltas, anchors, image_sizes,
                                          10, 4, 0.7, 2.0, nms_method=nms_method)
    assert valid.tolist() == [[True, False, False, False]] * 2


def test_ties_go_to_the_lower_level_and_nan_is_dropped(nms_method):
    """If this fails, equal logits on different levels are not ranked level first (as
    torchvision's batched_nms does), or a NaN logit, which torchvision's score threshold
    drops, becomes a proposal."""
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
               torch.tensor([[20.0, 0.0, 30.0, 10.0], [40.0, 0.0, 50.0, 10.0]])]
    deltas = [torch.zeros(2, 1, 4), torch.zeros(2, 2, 4)]
    image_sizes = torch.tensor([[64, 64], [64, 64]])
    objectness = [torch.tensor([[1.0], [1.0]]), torch.tensor([[1.0, torch.nan], [1.5, 0.0]])]
    boxes, scores, valid = _compare_with_reference(objectness, deltas, anchors, image_sizes,
                                                   10, 3, 0.7, 0.0, nms_method=nms_method)
    assert valid.tolist() == [[True, True, False], [True, True, True]]
    torch.testing.assert_close(boxes[:, 0], torch.tensor([[0.0, 0.0, 10.0, 10.0],
                                                          [20.0, 0.0, 30.0, 10.0]]))


def test_no_gradient():
    """If this fails, proposals carry an autograd history (backward through the op would
    raise, as it has no gradient formula) instead of being constants for the heads."""
    objectness, deltas, anchors = _random_rpn_outputs(seed=2)
    objectness = [o.requires_grad_() for o in objectness]
    deltas = [d.requires_grad_() for d in deltas]
    outputs = generate_proposals(objectness, deltas, anchors, IMAGE_SIZES, 20, 10, 0.7, 0.0,
                                 "per_cell")
    assert not any(t.requires_grad for t in outputs)


def _proposals_then_nms(objectness, deltas, anchors, image_sizes):
    boxes, scores, valid = generate_proposals(objectness, deltas, anchors, image_sizes, 30, 40,
                                              0.7, 1.0, "per_cell")
    groups = (boxes[..., 2] - boxes[..., 0] > 20).long()
    index, keep = batched_nms_fixed(boxes, scores, valid, groups, 0.3, 25, "per_cell")
    return boxes.gather(1, index.unsqueeze(-1).expand(-1, -1, 4)) * keep.unsqueeze(-1), keep


def test_ops_trace_without_graph_breaks():
    """If this fails, torch.compile cannot capture proposal generation and NMS in one graph
    (a graph break or a wrong fake implementation), which the static-shape design needs."""
    inputs = (*_random_rpn_outputs(seed=3), IMAGE_SIZES)
    torch.library.opcheck(torch.ops.maskrcnn.generate_proposals.default,
                          (*inputs[:4], 30, 40, 0.7, 1.0, "per_cell"))
    explanation = torch._dynamo.explain(_proposals_then_nms)(*inputs)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(_proposals_then_nms, backend="eager", fullgraph=True)
    for ours, eager in zip(compiled(*inputs), _proposals_then_nms(*inputs), strict=True):
        torch.testing.assert_close(ours, eager, rtol=0, atol=0)
