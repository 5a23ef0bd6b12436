"""The fixed-size ground-truth mask representation: box-local masks.

Each instance's mask is stored in the frame of its own ground-truth box, resampled to S x S
cells (S = data.gt_mask_size, 64 by default). Cell (r, c) holds the fraction of the box region
[x1 + c*w/S, x1 + (c+1)*w/S) x [y1 + r*h/S, ...) that the instance covers, quantised to uint8
(0..255). An instance's mask lies inside its box, so nothing is lost by the crop, and:
- the shape is static: a batch holds gt_masks uint8[N, G, S, S] whatever the image size;
- resizing the image changes the box, not the box-local mask; a horizontal flip flips both;
- the mask target of any RoI is one bilinear resampling of the matched box-local mask
  (`mask_targets`), which runs on the device for all RoIs of a batch at once.
Its fidelity against exact rasterisation is measured in tests/data/test_gt_masks.py.

This is the approach of TPU and MLPerf Mask R-CNN (crop-and-resize from precropped masks); we
keep fractional coverage instead of binary cells, which makes small and thin parts survive.
"""

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import roi_align

# Polygons are rasterised at SUPERSAMPLE x the cell grid and averaged, for fractional coverage.
SUPERSAMPLE = 4


def decode_segmentation(segm, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, compressed or uncompressed RLE) as uint8[height, width]."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    return mask_utils.decode(rle)


def _polygons_in_box(polygons: list, box: np.ndarray, size: int) -> np.ndarray:
    """Polygons rasterised exactly in the frame of box, as coverage float32[size, size]."""
    x1, y1, x2, y2 = (float(v) for v in box)
    grid = size * SUPERSAMPLE
    sx, sy = grid / max(x2 - x1, 1e-6), grid / max(y2 - y1, 1e-6)
    local = []
    for polygon in polygons:
        xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        # (x, y) in image pixels -> (u, v) in supersampled box cells.
        local.append(np.stack([(xy[:, 0] - x1) * sx, (xy[:, 1] - y1) * sy], 1).ravel().tolist())
    # pycocotools decodes column-major: its transpose is a C-ordered (u, v) array, 0 or 1.
    fine = decode_segmentation(local, grid, grid).T
    # Samples of each cell added up, in place of a reshape to (size, SS, size, SS), which
    # would copy the column-major array: (u, v) -> (u cells, v) -> (u cells, v cells), counts
    # 0..SS^2 in uint8 (SS^2 = 16 fits).
    cells = sum(fine[k::SUPERSAMPLE] for k in range(SUPERSAMPLE))
    cells = sum(cells[:, k::SUPERSAMPLE] for k in range(SUPERSAMPLE))
    return cells.T / np.float32(SUPERSAMPLE**2)  # (u, v) -> (v, u) rows and columns


def _overlaps(lo: float, hi: float, cells: int, first_pixel: int, pixels: int) -> np.ndarray:
    """float64[cells, pixels]: length of cell k of [lo, hi) split into `cells` equal parts
    that lies in pixel first_pixel + j, divided by the cell length."""
    edges = lo + (hi - lo) * np.arange(cells + 1) / cells
    pixel_lo = first_pixel + np.arange(pixels)
    overlap = (np.minimum(edges[1:, None], pixel_lo[None, :] + 1)
               - np.maximum(edges[:-1, None], pixel_lo[None, :]))
    return np.clip(overlap, 0.0, None) / max((hi - lo) / cells, 1e-12)


def _bitmap_in_box(bitmap: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """A full-image binary mask integrated over the cells of box: coverage float32[S, S].

    Exact area coverage of the piecewise-constant bitmap: (S, h) @ (h, w) @ (w, S).
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    c0, r0 = int(np.floor(x1)), int(np.floor(y1))
    crop = bitmap[r0:int(np.ceil(y2)), c0:int(np.ceil(x2))].astype(np.float64)
    rows = _overlaps(y1, y2, size, r0, crop.shape[0])
    cols = _overlaps(x1, x2, size, c0, crop.shape[1])
    return (rows @ crop @ cols.T).astype(np.float32)


def box_local_mask(segm, box: np.ndarray, height: int, width: int, size: int) -> np.ndarray:
    """One instance's box-local mask, uint8[size, size] coverage in 0..255.

    Args:
        segm: the COCO segmentation (polygon list or RLE dict) in image pixels.
        box: float[4] (x1, y1, x2, y2) in image pixels, the instance's ground-truth box.
        height, width: the image size the segmentation refers to.
    """
    if isinstance(segm, list):
        coverage = _polygons_in_box(segm, box, size)
    else:
        coverage = _bitmap_in_box(decode_segmentation(segm, height, width), box, size)
    return np.round(np.clip(coverage, 0.0, 1.0) * 255).astype(np.uint8)


def mask_targets(
    gt_masks: torch.Tensor,
    gt_boxes: torch.Tensor,
    rois: torch.Tensor,
    roi_batch_index: torch.Tensor,
    roi_gt_index: torch.Tensor,
    out_size: int,
) -> torch.Tensor:
    """Soft mask targets for RoIs, resampled from their matched box-local masks.

    Args:
        gt_masks: uint8[N, G, S, S] box-local masks (0..255).
        gt_boxes: float[N, G, 4] (x1, y1, x2, y2) ground-truth boxes in canvas pixels.
        rois: float[R, 4] (x1, y1, x2, y2) RoIs in canvas pixels.
        roi_batch_index: int64[R] image of each RoI, in 0..N-1.
        roi_gt_index: int64[R] matched ground truth of each RoI, in 0..G-1.
        out_size: side M of the targets.

    Returns:
        float32[R, M, M] in [0, 1]: the fraction of each target cell the instance covers.
        Static shapes, no host synchronisation; runs on gt_masks' device.
    """
    n, g, s, _ = gt_masks.shape
    # A one-cell zero border, so samples just outside the box fall off to 0 instead of
    # repeating the edge cells (roi_align clamps coordinates to the input).
    masks = torch.nn.functional.pad(gt_masks.float() / 255.0, (1, 1, 1, 1))
    masks = masks.reshape(n * g, 1, s + 2, s + 2)  # (N, G, S+2, S+2) -> (N*G, 1, S+2, S+2)
    flat = roi_batch_index * g + roi_gt_index
    boxes = gt_boxes.float().reshape(n * g, 4)[flat]  # (R, 4) matched gt box per RoI
    scale = s / (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-6)  # cells per pixel, (R, 2)
    # RoI corners in the matched mask's cell frame, shifted by the border cell.
    local_lo = (rois[:, :2].float() - boxes[:, :2]) * scale + 1.0
    local_hi = (rois[:, 2:].float() - boxes[:, :2]) * scale + 1.0
    local = torch.cat([flat[:, None].to(local_lo.dtype), local_lo, local_hi], dim=1)
    return roi_align(masks, local, (out_size, out_size), 1.0, 2, aligned=True)[:, 0]


def rasterize_in_roi(segm, roi: np.ndarray, height: int, width: int, out_size: int) -> np.ndarray:
    """Reference: a segmentation rasterised exactly in an RoI's frame, binary uint8[M, M].

    Polygons are transformed into the RoI's M x M grid and rasterised there (as Detectron2
    does); RLE masks are decoded at full resolution and each target cell takes the majority
    of 8 x 8 samples inside it. Slow; used by tests to measure `mask_targets`.
    """
    if isinstance(segm, list):
        coverage = _polygons_in_box(segm, roi, out_size)
    else:
        bitmap = decode_segmentation(segm, height, width).astype(np.float32)
        x1, y1, x2, y2 = (float(v) for v in roi)
        samples = 8
        step_x, step_y = (x2 - x1) / (out_size * samples), (y2 - y1) / (out_size * samples)
        xs = x1 + (np.arange(out_size * samples) + 0.5) * step_x
        ys = y1 + (np.arange(out_size * samples) + 0.5) * step_y
        inside_x = (xs >= 0) & (xs < width)
        inside_y = (ys >= 0) & (ys < height)
        cols = np.clip(np.floor(xs).astype(int), 0, width - 1)
        rows = np.clip(np.floor(ys).astype(int), 0, height - 1)
        fine = bitmap[rows[:, None], cols[None, :]] * inside_y[:, None] * inside_x[None, :]
        coverage = fine.reshape(out_size, samples, out_size, samples).mean(axis=(1, 3))
    return (coverage >= 0.5).astype(np.uint8)
