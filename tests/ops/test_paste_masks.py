"""Batched mask pasting against a per-detection reference and torchvision's own paste."""

import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from maskrcnn.ops.paste_masks import paste_masks, paste_masks_reference


def _random_detections(n, d, m, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n, d, m, m, generator=g)
    xy = torch.rand(n, d, 2, generator=g) * torch.tensor([width * 1.1, height * 1.1]) - 10
    wh = torch.rand(n, d, 2, generator=g) * torch.tensor([width / 2, height / 2]) + 0.2
    return masks, torch.cat([xy, xy + wh], dim=-1)


def test_matches_reference_and_torchvision():
    """If this fails, pasted masks differ from torchvision's (mask AP and parity would
    differ), including boxes partly outside the image and boxes under a pixel wide."""
    masks, boxes = _random_detections(2, 7, 28, 50, 70)
    ours = paste_masks(masks, boxes, 50, 70)
    reference = paste_masks_reference(masks, boxes, 50, 70)
    assert ours.shape == (2, 7, 50, 70)
    torch.testing.assert_close(ours.double(), reference, atol=1e-5, rtol=0)
    for i in range(2):
        theirs = paste_masks_in_image(masks[i][:, None], boxes[i], (50, 70))[:, 0]
        torch.testing.assert_close(ours[i], theirs, atol=1e-5, rtol=0)


def test_no_detections_and_tracing():
    """If this fails, an image batch with zero detection slots breaks, or the op cannot be
    traced by torch.compile without a graph break."""
    assert paste_masks(torch.zeros(1, 0, 28, 28), torch.zeros(1, 0, 4), 8, 9).shape == (1, 0, 8, 9)
    masks, boxes = _random_detections(1, 3, 14, 20, 20)
    compiled = torch.compile(lambda m, b: paste_masks(m, b, 20, 20) * 2, backend="eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(masks, boxes), paste_masks(masks, boxes, 20, 20) * 2)
    torch.library.opcheck(paste_masks, (masks, boxes, 20, 20))


def test_inverted_and_zero_area_boxes():
    """If this fails, an inverted box (x2 < x1 or y2 < y1) paints pixels where torchvision and
    the reference paint none (its slice start:end + 1 is empty), a box of zero width or height
    paints something (torchvision paints one pixel there; we paint nothing, on purpose), or a
    box with area no longer pastes as torchvision's does."""
    masks = torch.rand(1, 6, 28, 28, generator=torch.Generator().manual_seed(3)) + 0.1
    boxes = torch.tensor([[[12.0, 5.0, 4.0, 9.0], [5.0, 12.0, 9.0, 4.0], [9.0, 9.0, 3.0, 2.0],
                           [5.0, 5.0, 5.0, 5.0], [2.0, 3.0, 2.0, 11.0], [2.0, 3.0, 6.0, 11.0]]])
    ours = paste_masks(masks, boxes, 20, 20)
    theirs = paste_masks_in_image(masks[0][:, None], boxes[0], (20, 20))[:, 0]
    assert (ours[0, :5] == 0).all()
    assert (theirs[3] > 0).sum() == 1 and (theirs[4] > 0).sum() > 5  # torchvision's pixels
    assert (ours[0, 5] > 0).sum() > 20
    torch.testing.assert_close(ours[0, [0, 1, 2, 5]], theirs[[0, 1, 2, 5]], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.double(), paste_masks_reference(masks, boxes, 20, 20),
                               atol=1e-5, rtol=0)
