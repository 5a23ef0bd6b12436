"""Anchors per canvas: same boxes and order as torchvision's AnchorGenerator."""

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from maskrcnn.model.anchors import AnchorCache, base_anchors, level_shapes

SIZES, RATIOS, STRIDES = [32, 64, 128, 256, 512], [0.5, 1.0, 2.0], [4, 8, 16, 32, 64]


def test_level_shapes_follow_the_backbone_strides():
    """If this fails, anchors would not line up with the feature maps (P6 pools P5)."""
    assert level_shapes((800, 1344), STRIDES) == [(200, 336), (100, 168), (50, 84), (25, 42),
                                                   (13, 21)]
    assert level_shapes((256, 320), STRIDES)[-1] == (4, 5)


def test_base_anchors_hand_computed():
    """If this fails, the aspect ratio convention (height / width) or rounding changed."""
    assert base_anchors(32, [1.0]).tolist() == [[-16.0, -16.0, 16.0, 16.0]]
    assert base_anchors(32, [2.0]).tolist() == [[-11.0, -23.0, 11.0, 23.0]]


@pytest.mark.parametrize("canvas", [(256, 320), (800, 1344), (320, 416)])
def test_same_anchors_as_torchvision(canvas):
    """If this fails, our RPN would not be interchangeable with torchvision's (weights from
    torchvision would predict deltas for different anchors). The last two canvases are not
    multiples of 64: torchvision's P6 anchors are then 800 // 13 = 61 (resp. 416 // 7 = 59)
    px apart, not 64."""
    ours = AnchorCache([canvas], SIZES, RATIOS, STRIDES)(canvas)
    generator = AnchorGenerator(tuple((s,) for s in SIZES), (tuple(RATIOS),) * len(SIZES))
    features = [torch.zeros(1, 1, h, w) for h, w in level_shapes(canvas, STRIDES)]
    theirs = generator(ImageList(torch.zeros(1, 3, *canvas), [canvas]), features)[0]
    assert torch.equal(torch.cat(ours), theirs)


def test_unconfigured_canvas_is_computed_on_the_fly():
    """If this fails, evaluating at a canvas not in the config breaks."""
    cache = AnchorCache([(64, 64)], SIZES, RATIOS, STRIDES)
    other = cache((96, 64))
    assert [a.shape[0] for a in other] == [h * w * 3 for h, w in level_shapes((96, 64), STRIDES)]
