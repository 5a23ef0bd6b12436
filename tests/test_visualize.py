"""Pictures for people: labels that stay readable, mask outlines, the image's own size."""

import numpy as np
from PIL import Image

from maskrcnn.visualize import (
    _overlap,
    draw_instances,
    enlarged,
    grid,
    outline,
    place_label,
    side_by_side,
    titled,
)


def test_labels_of_crowded_boxes_do_not_overlap():
    """If this fails, the labels of boxes that share a corner are drawn over each other
    (what made class names and scores unreadable where objects crowd together)."""
    taken = []
    box = (100, 100, 160, 150)  # three detections of nearly the same box
    tags = [place_label(box, (50, 14), 640, 480, taken) for _ in range(3)]
    assert len(taken) == 3
    assert all(_overlap(a, b) == 0 for i, a in enumerate(tags) for b in tags[i + 1:])
    assert tags[0] == (100, 86, 150, 100)  # the first goes above the box's top-left corner


def test_labels_stay_inside_the_image():
    """If this fails, a label of a box at the image's edge is cut off."""
    tag = place_label((600, 0, 640, 30), (60, 14), 640, 480, [])
    assert tag[0] >= 0 and tag[1] >= 0 and tag[2] <= 640 and tag[3] <= 480


def test_outline_is_the_border_of_the_mask():
    """If this fails, masks are drawn without their outline, or the outline leaks outside
    the mask or fills it."""
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    border = outline(mask, 2)
    assert border[5, 5] and border[6, 10] and not border[7, 10] and not border[10, 10]
    assert not (border & ~mask).any() and border.sum() == 100 - 36


def test_pictures_keep_the_image_size_and_titles_add_a_band():
    """If this fails, predictions are drawn at another resolution than the image's own."""
    image = np.full((48, 64, 3), 128, np.uint8)
    mask = np.zeros((48, 64), bool)
    mask[10:30, 10:40] = True
    picture = draw_instances(image, np.array([[10, 10, 40, 30]], np.float32), [1],
                             ["person 0.97"], [mask])
    assert picture.size == (64, 48)
    drawn = np.asarray(picture)
    assert (drawn[20, 20] != 128).any()  # the mask is drawn
    with_title = titled(picture, "predictions")
    assert with_title.width == 64 and with_title.height > 48


def test_grid_places_pictures_in_rows():
    """If this fails, the preview's pictures overlap, leave the sheet, or are not in rows of
    the requested number of columns."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0)]
    pictures = [Image.new("RGB", (30, 20 if k < 2 else 10), c) for k, c in enumerate(colours)]
    sheet = grid(pictures, 2)
    assert sheet.size == (30 + 8 + 30, 20 + 8 + 10)
    drawn = np.asarray(sheet)
    assert tuple(drawn[0, 0]) == colours[0] and tuple(drawn[19, 67]) == colours[1]
    assert tuple(drawn[28, 0]) == colours[2] and tuple(drawn[37, 67]) == colours[3]
    assert (drawn[20:28] == 255).all()  # the gap between the rows
    assert side_by_side(pictures).size == (4 * 30 + 3 * 8, 20)


def test_enlarged_scales_image_boxes_and_masks_together():
    """If this fails, an enlarged picture draws boxes or masks off their objects."""
    image = np.zeros((10, 20, 3), np.uint8)
    image[2:6, 4:8] = 255
    mask = image[..., 0] > 0
    big, boxes, masks = enlarged(image, np.array([[4, 2, 8, 6]], np.float32), [mask], 2.5)
    assert big.shape == (25, 50, 3) and masks[0].shape == (25, 50)
    np.testing.assert_allclose(boxes, [[10, 5, 20, 15]])
    assert masks[0][10, 15] and not masks[0][20, 30] and big[10, 15, 0] == 255
