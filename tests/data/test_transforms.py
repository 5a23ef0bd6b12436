"""Per-image geometry: canvas choice, resize rule, flip, pad, image decoding errors."""

import numpy as np
import pytest

from maskrcnn.data.coco import DatasetError
from maskrcnn.data.transforms import (
    choose_canvas,
    flip_boxes,
    load_image,
    pad_to_canvas,
    resize_boxes,
    resized_size,
)

COCO_CANVASES = [(800, 1344), (1344, 800)]


def test_canvas_follows_orientation():
    """If this fails, portrait images land on a landscape canvas (and are shrunk a lot)."""
    assert choose_canvas(480, 640, COCO_CANVASES) == 0
    assert choose_canvas(640, 480, COCO_CANVASES) == 1


@pytest.mark.parametrize("size, canvas, expected", [
    ((480, 640), (800, 1344), (800, 1067)),    # short side 800
    ((300, 1000), (800, 1344), (400, 1333)),   # long side capped at 1333
    ((640, 480), (1344, 800), (1067, 800)),
    ((500, 500), (800, 1344), (800, 800)),
    ((480, 640), (512, 512), (384, 512)),      # shrunk further to fit a small canvas
])
def test_resize_rule(size, canvas, expected):
    """If this fails, images are not resized as the recipe says (short 800, long <= 1333),
    or overflow their canvas."""
    assert resized_size(*size, 800, 1333, canvas) == expected


def test_boxes_follow_resize_and_flip():
    """If this fails, boxes drift from the pixels they mark after resizing or flipping."""
    boxes = np.array([[10, 20, 30, 60]], np.float32)
    np.testing.assert_allclose(resize_boxes(boxes, (100, 200), (50, 400)),
                               [[20, 10, 60, 30]])
    flipped = flip_boxes(boxes, 100)
    np.testing.assert_allclose(flipped, [[70, 20, 90, 60]])
    np.testing.assert_allclose(flip_boxes(flipped, 100), boxes)


def test_pad_puts_image_top_left_on_zeros():
    """If this fails, padding shifts the image (boxes would be off) or is not zero."""
    image = np.full((2, 3, 3), 7, np.uint8)
    out = pad_to_canvas(image, (4, 5))
    assert out.shape == (3, 4, 5) and (out[:, :2, :3] == 7).all()
    assert out.sum() == 7 * image.size


def test_unreadable_and_wrong_size_images_are_named(tmp_path):
    """If this fails, a corrupt or mis-sized image gives a traceback instead of naming it."""
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"cannot read image .*broken\.jpg \(listed in a\.json"):
        load_image(broken, "a.json", 10, 10)
    with pytest.raises(DatasetError, match="does not exist|cannot read"):
        load_image(tmp_path / "missing.jpg", "a.json", 10, 10)
    from PIL import Image

    Image.new("RGB", (8, 6)).save(tmp_path / "small.png")
    with pytest.raises(DatasetError, match="is 8x6 but a.json says 10x10"):
        load_image(tmp_path / "small.png", "a.json", 10, 10)
