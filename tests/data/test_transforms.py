"""Per-image geometry: canvas choice, resize rule, flip, pad, image decoding errors; the fast
decoder and resize against the PIL reference on real COCO photos."""

import numpy as np
import pytest
from PIL import Image

from maskrcnn.data.coco import DatasetError
from maskrcnn.data.transforms import (
    choose_canvas,
    flip_boxes,
    load_image,
    pad_to_canvas,
    resize_boxes,
    resize_image,
    resize_image_pil,
    resized_size,
)
from tests.tiny import REPO

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
    Image.new("RGB", (8, 6)).save(tmp_path / "small.png")
    with pytest.raises(DatasetError, match="is 8x6 but a.json says 10x10"):
        load_image(tmp_path / "small.png", "a.json", 10, 10)


COCO_IMAGES = sorted((REPO / "tests" / "assets" / "coco2017-tiny" / "val2017").glob("*.jpg"))


def _image(path):
    with Image.open(path) as image:
        width, height = image.size
    return load_image(path, "a.json", height, width)


@pytest.mark.parametrize("mode, suffix", [("RGB", "jpg"), ("L", "jpg"), ("CMYK", "jpg"),
                                          ("RGB", "png")])
def test_decoding_is_pils_rgb_conversion(tmp_path, mode, suffix):
    """If this fails, skipping PIL's convert for RGB files changed pixels, or a grayscale
    or CMYK JPEG or a PNG no longer decodes to PIL's RGB conversion."""
    pixels = np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    path = tmp_path / f"x.{suffix}"
    Image.fromarray(pixels).convert(mode).save(path)
    with Image.open(path) as image:
        expected = np.asarray(image.convert("RGB"))
    decoded = load_image(path, "a.json", 24, 40)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, expected)
    np.testing.assert_array_equal(_image(COCO_IMAGES[0]), np.asarray(
        Image.open(COCO_IMAGES[0]).convert("RGB")))


def test_truncated_jpeg_is_named(tmp_path):
    """If this fails, a truncated JPEG (a half-copied file) decodes silently or gives a
    traceback instead of naming the file."""
    data = COCO_IMAGES[0].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with Image.open(COCO_IMAGES[0]) as image:
        width, height = image.size
    with pytest.raises(DatasetError, match=r"cannot read image .*cut\.jpg \(listed in a\.json\)"
                                           r": image file is truncated"):
        load_image(tmp_path / "cut.jpg", "a.json", height, width)


# (short side, long side): the COCO recipe (upscaling every COCO photo) and a shrink.
RESIZES = [(800, 1333), (200, 333)]


@pytest.mark.parametrize("short_side, long_side", RESIZES)
def test_resize_is_pil_within_one(short_side, long_side):
    """If this fails, the uint8 torch resize drifts from PIL's bilinear (antialiased)
    resampling that the pipeline used: a value differs by more than 1, more than 0.5% of the
    values differ at all (0.03% here), or the shape is wrong."""
    differing, values = 0, 0
    for path in COCO_IMAGES[:6]:
        image = _image(path)
        canvases = [(short_side, long_side), (long_side, short_side)]
        canvas = canvases[choose_canvas(*image.shape[:2], canvases)]
        size = resized_size(*image.shape[:2], short_side, long_side, canvas)
        fast, reference = resize_image(image, size), resize_image_pil(image, size)
        assert fast.shape == (*size, 3) and fast.dtype == np.uint8
        difference = np.abs(fast.astype(np.int16) - reference)
        assert difference.max() <= 1, path.name
        differing, values = differing + (difference > 0).sum(), values + difference.size
    assert differing / values < 0.005


def test_pad_mirrors_in_the_copy():
    """If this fails, a flipped image is padded unmirrored, mirrored about the canvas instead
    of its own width, or with stale memory in the margins."""
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) + 1
    out = pad_to_canvas(image, (4, 5), flip=True)
    np.testing.assert_array_equal(out[:, :2, :3], image[:, ::-1].transpose(2, 0, 1))
    assert out[:, 2:].sum() == 0 and out[:, :, 3:].sum() == 0
    resized = resize_image(image, (4, 4))  # a view of channel-planar memory
    np.testing.assert_array_equal(pad_to_canvas(resized, (4, 6), flip=True)[:, :, :4],
                                  resized[:, ::-1].transpose(2, 0, 1))
