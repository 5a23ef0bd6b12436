"""Box IoU, delta encoding/decoding and clipping against torchvision and hand-computed cases."""

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou as tv_box_iou

from maskrcnn.ops.boxes import box_iou, clip_boxes, decode_boxes, encode_boxes


def _random_boxes(*shape, seed, size=100.0, degenerate=True):
    """float64[*shape, 4]; with `degenerate`, some boxes have zero width, height or both."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(*shape, 2, generator=g, dtype=torch.float64) * size
    wh = torch.rand(*shape, 2, generator=g, dtype=torch.float64) * size / 2 + 0.5
    if degenerate:
        wh = wh * (torch.rand(*shape, 2, generator=g, dtype=torch.float64) > 0.2)
    return torch.cat([xy, xy + wh], dim=-1)


def test_box_iou_hand_cases():
    """If this fails, the IoU formula itself is wrong (intersection, union, or the 0 given
    to a pair whose union has no area)."""
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 5.0, 5.0],
                      [10.0, 10.0, 11.0, 11.0]])
    expected = torch.tensor([[1 / 7, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(box_iou(a, b), expected)


def test_box_iou_matches_torchvision():
    """If this fails, box_iou disagrees with torchvision on random or degenerate boxes (where
    torchvision's 0/0 = NaN is our 0), or mixes up batch elements."""
    boxes1, boxes2 = _random_boxes(3, 20, seed=0), _random_boxes(3, 30, seed=1)
    ours = box_iou(boxes1, boxes2)
    assert ours.shape == (3, 20, 30) and ours.dtype == torch.float64
    for i in range(3):
        torch.testing.assert_close(ours[i], tv_box_iou(boxes1[i], boxes2[i]).nan_to_num(0.0))
    assert box_iou(torch.zeros(2, 0, 4), torch.zeros(2, 5, 4)).shape == (2, 0, 5)


def test_box_iou_broadcasts_and_stays_float32():
    """If this fails, shared candidates [M, 4] no longer broadcast against per-image boxes
    [N, G, 4], or half-precision inputs (autocast) are not computed in float32."""
    gt, anchors = _random_boxes(2, 5, seed=2), _random_boxes(7, seed=3)
    ours = box_iou(gt.bfloat16(), anchors.bfloat16())
    assert ours.shape == (2, 5, 7) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, box_iou(gt.bfloat16().float(), anchors.bfloat16().float()))


@pytest.mark.parametrize("weights", [(10.0, 10.0, 5.0, 5.0), (1.0, 1.0, 1.0, 1.0)])
def test_encode_decode_match_torchvision_box_coder(weights):
    """If this fails, our regression targets or decoded boxes differ from torchvision's
    BoxCoder (and so from the recipe's box parametrisation), or decoding does not invert
    encoding."""
    gt = _random_boxes(2, 50, seed=4, degenerate=False)
    anchors = _random_boxes(2, 50, seed=5, degenerate=False)
    coder = BoxCoder(weights)
    deltas = encode_boxes(gt, anchors, weights)
    assert deltas.shape == (2, 50, 4)
    torch.testing.assert_close(deltas.reshape(-1, 4),
                               coder.encode_single(gt.reshape(-1, 4), anchors.reshape(-1, 4)))
    decoded = decode_boxes(deltas, anchors, weights)
    torch.testing.assert_close(decoded, gt)
    random_deltas = torch.randn(2, 50, 4, dtype=torch.float64, generator=torch.Generator()
                                .manual_seed(6))
    torch.testing.assert_close(
        decode_boxes(random_deltas, anchors, weights).reshape(-1, 4),
        coder.decode_single(random_deltas.reshape(-1, 4), anchors.reshape(-1, 4)))


def test_decode_broadcasts_anchors_and_computes_in_float32():
    """If this fails, per-class deltas [N, P, K, 4] can no longer be decoded against their
    proposals [N, P, 1, 4], or bf16 deltas are decoded in bf16."""
    deltas = torch.randn(2, 3, 4, 4).bfloat16()
    anchors = _random_boxes(2, 3, 1, seed=7, degenerate=False).float()
    ours = decode_boxes(deltas, anchors, (10.0, 10.0, 5.0, 5.0))
    assert ours.shape == (2, 3, 4, 4) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, decode_boxes(deltas.float(), anchors.expand(-1, -1, 4, -1),
                                                  (10.0, 10.0, 5.0, 5.0)))


def test_decode_clamps_huge_scale():
    """If this fails, a huge predicted dw / dh overflows exp (inf boxes, NaN losses) instead of
    being clamped to log(1000 / 16) (or the given clamp) as torchvision does."""
    anchors = torch.tensor([[0.0, 0.0, 16.0, 8.0]])
    deltas = torch.tensor([[0.0, 0.0, 500.0, 500.0]])
    boxes = decode_boxes(deltas, anchors, (1.0, 1.0, 1.0, 1.0))
    torch.testing.assert_close(boxes, torch.tensor([[8.0 - 500, 4.0 - 250, 8.0 + 500, 4.0 + 250]]))
    boxes = decode_boxes(deltas, anchors, (1.0, 1.0, 1.0, 1.0), clamp=math.log(2.0))
    torch.testing.assert_close(boxes, torch.tensor([[-8.0, -4.0, 24.0, 12.0]]))


def test_clip_boxes_uses_each_image_size():
    """If this fails, boxes are clipped to the wrong image's size (or the canvas), or
    height and width are swapped."""
    boxes = torch.tensor([[[-5.0, -5.0, 50.0, 50.0], [10.0, 2.0, 20.0, 8.0]],
                          [[-5.0, -5.0, 50.0, 50.0], [35.0, 25.0, 45.0, 45.0]]])
    image_sizes = torch.tensor([[30, 40], [20, 10]])  # (height, width)
    expected = torch.tensor([[[0.0, 0.0, 40.0, 30.0], [10.0, 2.0, 20.0, 8.0]],
                             [[0.0, 0.0, 10.0, 20.0], [10.0, 20.0, 10.0, 20.0]]])
    torch.testing.assert_close(clip_boxes(boxes, image_sizes), expected)
