"""Per-image geometry of the input pipeline: canvas choice, resize, flip, pad.

Sizes are (height, width) pairs of ints; boxes are (x1, y1, x2, y2) in pixels.
"""

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from maskrcnn.data.coco import DatasetError

Size = tuple[int, int]


def choose_canvas(height: int, width: int, canvases: Sequence[Size]) -> int:
    """Index of the canvas whose aspect ratio is closest to the image's (log scale).

    Depends only on the image size, so the sampler can group images by canvas without
    decoding them.
    """
    aspect = math.log(width / height)
    return min(range(len(canvases)),
               key=lambda i: abs(math.log(canvases[i][1] / canvases[i][0]) - aspect))


def resized_size(height: int, width: int, short_side: int, max_long_side: int,
                 canvas: Size) -> Size:
    """The size an image is resized to: short side `short_side`, long side at most
    `max_long_side`, and never larger than the canvas it is padded into."""
    scale = min(short_side / min(height, width), max_long_side / max(height, width),
                canvas[0] / height, canvas[1] / width)
    return (min(canvas[0], max(1, round(height * scale))),
            min(canvas[1], max(1, round(width * scale))))


def load_image(path, json_path, height: int, width: int) -> np.ndarray:
    """Decodes an image as uint8[height, width, 3] RGB, or stops naming the file."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DatasetError(f"cannot read image {path} (listed in {json_path}): {error}") from None
    if array.shape[:2] != (height, width):
        raise DatasetError(f"image {path} is {array.shape[1]}x{array.shape[0]} but {json_path} "
                           f"says {width}x{height}")
    return array


def resize_image(image: np.ndarray, size: Size) -> np.ndarray:
    """uint8[H, W, 3] -> uint8[h, w, 3] with bilinear (antialiased) resampling."""
    if image.shape[:2] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def resize_boxes(boxes: np.ndarray, old: Size, new: Size) -> np.ndarray:
    """float[T, 4] boxes scaled per axis from an image of size old to one of size new."""
    sx, sy = new[1] / old[1], new[0] / old[0]
    return boxes * np.array([sx, sy, sx, sy], dtype=boxes.dtype)


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """float[T, 4] boxes mirrored left-right in an image of the given width."""
    return np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)


def pad_to_canvas(image: np.ndarray, canvas: Size) -> np.ndarray:
    """uint8[h, w, 3] -> uint8[3, H, W] with zeros at the bottom and right."""
    out = np.zeros((3, *canvas), dtype=np.uint8)
    out[:, : image.shape[0], : image.shape[1]] = image.transpose(2, 0, 1)
    return out
