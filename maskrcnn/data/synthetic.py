"""A built-in COCO-format instance-segmentation dataset of coloured shapes, deterministic by seed.

Each image has a textured background and up to six rotated shapes of five classes that may
occlude each other and leave the image, but never so much that the class could no longer be
told from what is visible; every annotation is the visible part of its shape. The
files use all of COCO's segmentation formats (polygons, compressed and uncompressed RLE), crowd
regions, images without objects and non-contiguous category ids, so training on it exercises
the whole COCO loading path while staying small enough to learn on a CPU in minutes.
"""

import inspect
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# Ids skip numbers, as COCO's do (1..90 for 80 classes), so the loader's id mapping is exercised.
CATEGORIES: list[dict] = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 4, "name": "triangle", "supercategory": "shape"},
    {"id": 7, "name": "star", "supercategory": "shape"},
    {"id": 9, "name": "ring", "supercategory": "shape"},
]
_CATEGORY_NAMES = {c["id"]: c["name"] for c in CATEGORIES}
_CATEGORY_IDS = [c["id"] for c in CATEGORIES]

# Bumped whenever the generated content changes, so ensure_synthetic_coco regenerates stale caches.
_GENERATOR_VERSION = 2
_READY = "READY"
# Split name in COCO's layout, its code in the per-image seed, and an image id offset that keeps
# ids unique across splits (as in COCO) for up to a million training images.
_SPLITS = {"train": (0, 0), "val": (1, 1_000_000)}

# The most shapes per image: enough for heavy occlusion, within the configs' max_instances.
_MAX_SHAPES = 6
# Shape diameters: 16 px is about the smallest object a stride-4 feature map still localises;
# 60% of the short side leaves room for other shapes. Sampled log-uniformly so small objects
# are as common as large ones, as in COCO.
_MIN_DIAMETER = 16.0
_MAX_DIAMETER_FRACTION = 0.6
# 48 vertices put a circle's polygon within 0.2 px of the true circle at the largest diameter.
_CIRCLE_VERTICES = 48
# A star's inner radius relative to its outer one: clearly pointed, still one blob at 16 px.
_STAR_INNER_RATIO = 0.45
# A ring's hole relative to its outer radius: wide enough to tell from a circle, band still solid.
_RING_HOLE_RATIO = (0.45, 0.65)
# How much of every shape stays in view. A shape is placed only where at least this fraction of
# it lies inside the image and where it leaves at least this fraction of each earlier shape
# visible; with less, a square cut to a wedge or a ring without its hole shows no trace of its
# class, and such fragments (annotated or left unannotated) only teach the model noise.
# (Generator version 1 allowed 30%: the same shapes config reached box AP 0.26 on it.)
_MIN_VISIBLE_FRACTION = 0.6
_MIN_VISIBLE_PIXELS = 40
# Tries to place a shape under those rules; after that it is skipped.
_PLACEMENT_TRIES = 10
# Shape colours: RGB distance from the mean background under the shape, far above the noise so
# the task is learnable; _COLOUR_TRIES random colours nearly always reach it, else the farthest.
_MIN_CONTRAST = 90.0
_COLOUR_TRIES = 16
# Background: per-pixel noise sigma range, applied after drawing so shapes are not flat either.
_NOISE_SIGMA = (2.0, 10.0)
# Each texture (stripes, blobs) appears on about a third of the backgrounds, to vary them.
_TEXTURE_PROB = 1 / 3
# Image index patterns (not random draws) so even a small dataset holds every feature: one
# training image in 16 has a crowd region, one image in 32 of either split is background only.
_CROWD_PERIOD, _CROWD_PHASE = 16, 3
_EMPTY_PERIOD, _EMPTY_PHASE = 32, 16
# A crowd region: several small same-class shapes within a small radius of one centre.
_CROWD_SHAPES = (4, 9)
_CROWD_DIAMETER = (10.0, 20.0)
_CROWD_SPREAD = 30.0
# JPEG quality of COCO-like files: artefacts present but small.
_JPEG_QUALITY = 90


@dataclass
class _Shape:
    """One drawn shape: its polygons (outer boundary, then a ring's hole) and its full area."""

    category_id: int
    polygons: list[np.ndarray]
    full_area: float


def _polygon_area(points: np.ndarray) -> float:
    """Shoelace area of an [N, 2] polygon."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _regular_polygon(center: np.ndarray, radii: np.ndarray, angle: float) -> np.ndarray:
    """Vertices at evenly spaced angles from `angle`, one radius each, rounded as written."""
    theta = angle + np.arange(len(radii)) * (2 * np.pi / len(radii))
    points = center + radii[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    return np.round(points, 2)


def _make_shape(rng: np.random.Generator, category_id: int, center: np.ndarray,
                diameter: float) -> _Shape:
    """A shape of the given class, size and position, with a random rotation."""
    name, radius, angle = _CATEGORY_NAMES[category_id], diameter / 2, rng.uniform(0, 2 * np.pi)
    corners = {"square": 4, "triangle": 3}
    if name in corners:
        outer = _regular_polygon(center, np.full(corners[name], radius), angle)
    elif name == "star":
        radii = np.tile([radius, radius * _STAR_INNER_RATIO], 5)
        outer = _regular_polygon(center, radii, angle)
    else:
        outer = _regular_polygon(center, np.full(_CIRCLE_VERTICES, radius), angle)
    polygons = [outer]
    if name == "ring":
        hole = radius * rng.uniform(*_RING_HOLE_RATIO)
        polygons.append(_regular_polygon(center, np.full(_CIRCLE_VERTICES, hole), angle))
    area = _polygon_area(outer) - sum(_polygon_area(p) for p in polygons[1:])
    return _Shape(category_id, polygons, area)


def _rasterize(shape: _Shape, height: int, width: int) -> np.ndarray:
    """The shape's pixels inside the image, bool[H, W].

    pycocotools rasterises, so the pixels drawn are exactly those a COCO reader decodes from the
    written polygon (PIL's polygon fill adds about half a pixel all round).
    """
    rles = mask_utils.frPyObjects([p.ravel().tolist() for p in shape.polygons], height, width)
    layers = mask_utils.decode(rles).astype(bool)
    return layers[:, :, 0] & ~layers[:, :, 1:].any(axis=2)


def _enough_visible(pixels: int, full_area: float) -> bool:
    """Whether an instance with this many visible pixels is kept."""
    return pixels >= _MIN_VISIBLE_PIXELS and pixels >= _MIN_VISIBLE_FRACTION * full_area


def _place_shape(rng: np.random.Generator, category_id: int, diameter: float,
                 height: int, width: int,
                 placed: list[tuple[_Shape, np.ndarray]]) -> tuple[_Shape, np.ndarray] | None:
    """A shape with its centre in the image, enough of it inside, and hiding too little of the
    shapes already placed (drawn before it) to make them unrecognisable; with its mask, or None.
    """
    visible = _visible_masks([mask for _, mask in placed], height, width)
    for _ in range(_PLACEMENT_TRIES):
        center = rng.uniform([0, 0], [width, height])
        shape = _make_shape(rng, category_id, center, diameter)
        mask = _rasterize(shape, height, width)
        if _enough_visible(int(mask.sum()), shape.full_area) and all(
                _enough_visible(int((seen & ~mask).sum()), earlier.full_area)
                for (earlier, _), seen in zip(placed, visible, strict=True)):
            return shape, mask
    return None


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float32[H, W, 3]: a colour gradient, sometimes with stripes and soft blobs."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)

    def projection() -> np.ndarray:
        angle = rng.uniform(0, 2 * np.pi)
        return xs * np.float32(np.cos(angle)) + ys * np.float32(np.sin(angle))

    along = projection()
    along = (along - along.min()) / max(float(np.ptp(along)), 1.0)
    start, end = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    image = start + along[:, :, None] * (end - start)
    if rng.random() < _TEXTURE_PROB:  # stripes: 6-32 px period, one tint
        period, amplitude = rng.uniform(6, 32), rng.uniform(10, 35, size=3).astype(np.float32)
        image += np.sin(projection() * np.float32(2 * np.pi / period))[:, :, None] * amplitude
    if rng.random() < _TEXTURE_PROB:  # blobs: a few Gaussian colour patches
        for _ in range(rng.integers(2, 7)):
            (cx, cy), sigma = rng.uniform([0, 0], [width, height]), rng.uniform(8, 40)
            weight = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / np.float32(2 * sigma**2))
            image += weight[:, :, None] * rng.uniform(-60, 60, size=3).astype(np.float32)
    return image


def _pick_colour(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A random colour far enough from the mean colour the shape is drawn over."""
    local = canvas[mask].mean(axis=0)
    candidates = rng.integers(0, 256, size=(_COLOUR_TRIES, 3)).astype(np.float32)
    distance = np.linalg.norm(candidates - local, axis=1)
    good = np.flatnonzero(distance >= _MIN_CONTRAST)
    return candidates[good[0] if good.size else int(distance.argmax())]


def _visible_masks(masks: list[np.ndarray], height: int, width: int) -> list[np.ndarray]:
    """Each drawn mask less the pixels of the masks drawn after it."""
    visible, covered = [], np.zeros((height, width), dtype=bool)
    for mask in reversed(masks):
        visible.append(mask & ~covered)
        covered |= mask
    return visible[::-1]


def _compressed_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE with str counts, as json can hold it."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"counts": rle["counts"].decode("ascii"), "size": [int(s) for s in rle["size"]]}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: column-major run lengths, starting with a (maybe empty) zero run."""
    flat = mask.ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]]))
    if flat[0]:
        counts = np.concatenate([[0], counts])
    return {"counts": counts.tolist(), "size": list(mask.shape)}


def _segmentation(shape: _Shape, full: np.ndarray, visible: np.ndarray) -> list | dict:
    """The drawn polygon if the shape is whole, in view and has no hole; else compressed RLE."""
    height, width = visible.shape
    outer = shape.polygons[0]
    inside = outer.min() >= 0 and outer[:, 0].max() <= width and outer[:, 1].max() <= height
    if len(shape.polygons) == 1 and inside and np.array_equal(full, visible):
        return [outer.ravel().tolist()]
    return _compressed_rle(visible)


def _annotation(category_id: int, segmentation: list | dict, mask: np.ndarray,
                iscrowd: int) -> dict:
    """An annotation without ids; area and bbox are those of `mask`, the decoded segmentation."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    x0, y0 = float(cols[0]), float(rows[0])
    bbox = [x0, y0, float(cols[-1] + 1) - x0, float(rows[-1] + 1) - y0]
    return {"category_id": category_id, "segmentation": segmentation,
            "area": float(mask.sum()), "bbox": bbox, "iscrowd": iscrowd}


def _random_diameter(rng: np.random.Generator, short_side: int) -> float:
    """Log-uniform between _MIN_DIAMETER and _MAX_DIAMETER_FRACTION of the short side."""
    top = max(_MIN_DIAMETER, _MAX_DIAMETER_FRACTION * short_side)
    return float(np.exp(rng.uniform(np.log(_MIN_DIAMETER), np.log(top))))


def _crowd_cluster(rng: np.random.Generator, height: int,
                   width: int) -> list[tuple[_Shape, np.ndarray]]:
    """Several small same-class shapes around one point, annotated together as a crowd."""
    category_id = int(rng.choice(_CATEGORY_IDS))
    center = rng.uniform([0, 0], [width, height])
    members = []
    for _ in range(rng.integers(*_CROWD_SHAPES)):
        offset = rng.uniform(-_CROWD_SPREAD, _CROWD_SPREAD, size=2)
        shape = _make_shape(rng, category_id, center + offset, rng.uniform(*_CROWD_DIAMETER))
        mask = _rasterize(shape, height, width)
        if mask.any():  # a member off the image is not drawn at all
            members.append((shape, mask))
    return members


def _render_image(rng: np.random.Generator, height: int, width: int, *, crowd: bool,
                  empty: bool) -> tuple[np.ndarray, list[dict]]:
    """One image, uint8[H, W, 3], and its annotations (without ids), crowd first."""
    canvas = _background(rng, height, width)
    crowd_members = _crowd_cluster(rng, height, width) if crowd else []
    shapes = []
    for _ in range(0 if empty else rng.integers(1, _MAX_SHAPES + 1)):
        category_id = int(rng.choice(_CATEGORY_IDS))
        placed = _place_shape(rng, category_id, _random_diameter(rng, min(height, width)),
                              height, width, shapes)
        if placed is not None:
            shapes.append(placed)
    drawn = crowd_members + shapes  # drawing order: crowd first, later shapes hide earlier ones
    for _, mask in drawn:
        canvas[mask] = _pick_colour(rng, canvas, mask)
    canvas += rng.normal(0, rng.uniform(*_NOISE_SIGMA), size=canvas.shape).astype(np.float32)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

    visible = _visible_masks([mask for _, mask in drawn], height, width)
    annotations = []
    if crowd_members:
        region = np.logical_or.reduce(visible[: len(crowd_members)])
        if region.sum() >= _MIN_VISIBLE_PIXELS:
            category_id = crowd_members[0][0].category_id
            annotations.append(_annotation(category_id, _uncompressed_rle(region), region, 1))
    for (shape, full), seen in zip(shapes, visible[len(crowd_members):], strict=True):
        if _enough_visible(int(seen.sum()), shape.full_area):
            segmentation = _segmentation(shape, full, seen)
            annotations.append(_annotation(shape.category_id, segmentation, seen, 0))
    return image, annotations


def _write_split(root: Path, split: str, count: int, *, seed: int, min_side: int,
                 max_side: int) -> None:
    """Writes root/{split}2017/*.jpg and root/annotations/instances_{split}2017.json."""
    split_code, id_offset = _SPLITS[split]
    image_dir = root / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        # Seeded by (seed, split, index) alone, so an image does not depend on any other.
        rng = np.random.default_rng([seed, split_code, index])
        height, width = (int(s) for s in rng.integers(min_side, max_side + 1, size=2))
        crowd = split == "train" and index % _CROWD_PERIOD == _CROWD_PHASE
        empty = index % _EMPTY_PERIOD == _EMPTY_PHASE
        pixels, image_annotations = _render_image(rng, height, width, crowd=crowd, empty=empty)
        image_id = id_offset + index + 1
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(pixels).save(image_dir / file_name, quality=_JPEG_QUALITY)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for annotation in image_annotations:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **annotation})
    info = {"description": f"maskrcnn synthetic shapes, {split} split, seed {seed}",
            "version": str(_GENERATOR_VERSION), "year": 2017, "contributor": "maskrcnn",
            "url": "", "date_created": "2017-01-01"}  # fixed, so files are reproducible
    data = {"info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": CATEGORIES}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / f"instances_{split}2017.json"
    path.write_text(json.dumps(data, separators=(",", ":")))


def generate_synthetic_coco(root: Path, *, seed: int = 0, num_train: int = 256, num_val: int = 64,
                            min_side: int = 192, max_side: int = 320) -> Path:
    """Writes root/annotations/instances_{train,val}2017.json and root/{train,val}2017/*.jpg;
    returns root."""
    if not 0 < min_side <= max_side:
        raise ValueError(f"need 0 < min_side <= max_side, got {min_side} and {max_side}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"image counts must be >= 0, got {num_train} and {num_val}")
    root = Path(root)
    for split, count in (("train", num_train), ("val", num_val)):
        _write_split(root, split, count, seed=seed, min_side=min_side, max_side=max_side)
    return root


def _ready_stamp(root: Path) -> str | None:
    """The READY file's text, or None if there is none."""
    try:
        return (root / _READY).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None


def ensure_synthetic_coco(root: Path, **kwargs) -> Path:
    """Generates into root once: if root/READY exists and holds the same kwargs (as json), returns
    at once; otherwise generates into a temporary sibling folder and renames it into place (atomic,
    safe if killed), then writes READY.

    READY is written into the temporary folder just before the rename, so it appears together with
    the data. It holds the arguments with defaults filled in, plus the generator version. A folder
    at root that has content but no READY is not ours and is never deleted.
    """
    root = Path(root)
    bound = inspect.signature(generate_synthetic_coco).bind(root, **kwargs)
    bound.apply_defaults()
    params = {key: value for key, value in bound.arguments.items() if key != "root"}
    stamp = json.dumps({"generator_version": _GENERATOR_VERSION, **params}, sort_keys=True)
    if _ready_stamp(root) == stamp:
        return root
    if root.exists() and _ready_stamp(root) is None and any(root.iterdir()):
        raise FileExistsError(f"{root} has content but no {_READY} file; not replacing it")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        generate_synthetic_coco(staging, **params)
        (staging / _READY).write_text(stamp)
        if _ready_stamp(root) != stamp:  # another process may have finished it meanwhile
            if root.exists():
                stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
                os.replace(root, stale)
                shutil.rmtree(stale)
            os.replace(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
