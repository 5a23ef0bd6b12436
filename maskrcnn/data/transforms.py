"""Per-image geometry of the input pipeline: canvas choice, decode, resize, flip, pad.

Sizes are (height, width) pairs of ints; boxes are (x1, y1, x2, y2) in pixels.

Images stay uint8 from the file to the Batch and are copied as few times as possible: PIL
decodes (one copy out of PIL); the resize is torch's uint8 bilinear kernel (PIL's filter, 2-3x
faster than PIL, within 1 of it per value), whose output is channel-planar already, so padding
is a plain copy. `resize_image_pil` is the PIL resize this replaced, kept as the reference the
tests and the loader benchmark measure the fast one against.
"""

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
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
    """Decodes an image as uint8[height, width, 3] RGB, or stops naming the file.

    The array is read-only: PIL's pixels copied once (an RGB file skips convert's copy).
    """
    try:
        with Image.open(path) as image:
            array = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DatasetError(f"cannot read image {path} (listed in {json_path}): {error}") from None
    if array.shape[:2] != (height, width):
        raise DatasetError(f"image {path} is {array.shape[1]}x{array.shape[0]} but {json_path} "
                           f"says {width}x{height}")
    return array


def _planes(image: np.ndarray) -> torch.Tensor:
    """uint8[h, w, 3] -> a uint8[3, h, w] tensor over the same memory, which may be read-only
    (torch warns about that; its readers here never write)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(image).permute(2, 0, 1)


def resize_image(image: np.ndarray, size: Size) -> np.ndarray:
    """uint8[H, W, 3] -> uint8[h, w, 3], bilinear, antialiased when shrinking (PIL's filter).

    torch's uint8 kernel (F.interpolate, antialias=True): each value within 1 of PIL's
    (resize_image_pil). The result is a view of channel-planar (3, h, w) memory, which
    pad_to_canvas copies without a transpose.
    """
    if image.shape[:2] == size:
        return image
    pixels = _planes(image)[None]  # (1, 3, H, W), channels-last memory: the kernel's fast path
    out = torch.nn.functional.interpolate(pixels, size=size, mode="bilinear", antialias=True,
                                          align_corners=False)
    return out[0].permute(1, 2, 0).numpy()  # (1, 3, h, w) -> (h, w, 3), a view


def resize_image_pil(image: np.ndarray, size: Size) -> np.ndarray:
    """Reference for resize_image: PIL's bilinear (antialiased) resampling."""
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


def pad_to_canvas(image: np.ndarray, canvas: Size, flip: bool = False) -> np.ndarray:
    """uint8[h, w, 3] -> uint8[3, H, W] with zeros at the bottom and right; mirrored
    left-right first if flip.

    One pass over the canvas: the image is copied in, transposed (and mirrored: torch's flip,
    4x faster here than numpy's reversed copy), and only the margins are zeroed.
    """
    h, w = image.shape[:2]
    out = np.empty((3, *canvas), dtype=np.uint8)
    if flip:
        torch.from_numpy(out)[:, :h, :w] = _planes(image).flip(-1)
    else:
        out[:, :h, :w] = image.transpose(2, 0, 1)
    out[:, :h, w:] = 0
    out[:, h:] = 0
    return out
