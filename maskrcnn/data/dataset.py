"""The per-image input pipeline: decode, resize, flip, pad to a canvas, pad targets to G slots.

`DetectionDataset[(index, epoch)]` returns one sample (a dict with Batch's fields, without the
batch dimension). Its randomness (the flip) comes from a generator seeded by (seed, epoch,
index) alone, so a sample is the same whichever worker, rank or process count produces it.

Box-local masks are computed for every sample (about 0.2 ms an instance at S = 64, a fifth of a
sample at the COCO recipe's sizes; `maskrcnn-benchmark --loader` measures it), not cached: they
depend on neither the resize nor the flip, but a per-worker cache would be wrong at COCO scale.
Each epoch an image goes to one of the ranks x workers of a node at random, so after 12 epochs
on 8 GPUs x 4 workers each worker would hold a third of the 117k images' masks (1.1 GB, 36 GB a
node) and hit on a sixth of its samples. A cache worth having is one file shared by the node
(3.5 GB at S = 64), with a build step and invalidation, for at most a 1.2x faster sample.
"""

from collections.abc import Sequence

import numpy as np

from maskrcnn.data.coco import CocoDataset, ImageRecord
from maskrcnn.data.gt_masks import box_local_mask
from maskrcnn.data.transforms import (
    Size,
    choose_canvas,
    flip_boxes,
    load_image,
    pad_to_canvas,
    resize_boxes,
    resize_image,
    resized_size,
)


class DetectionDataset:
    """Samples of a CocoDataset at static shapes.

    Args:
        coco: the parsed annotation file.
        canvases: the (height, width) canvases images are padded to.
        short_side, max_long_side: resize rule (see transforms.resized_size).
        max_instances: G, ground-truth slots per image.
        gt_mask_size: S, side of the box-local masks.
        flip_prob: probability of a left-right flip (0 for evaluation).
        seed: base seed of the per-sample randomness.
    """

    def __init__(self, coco: CocoDataset, canvases: Sequence[Size], short_side: int,
                 max_long_side: int, max_instances: int, gt_mask_size: int,
                 flip_prob: float, seed: int):
        self.coco = coco
        self.canvases = [tuple(c) for c in canvases]
        self.short_side = short_side
        self.max_long_side = max_long_side
        self.max_instances = max_instances
        self.gt_mask_size = gt_mask_size
        self.flip_prob = flip_prob
        self.seed = seed
        # Canvas of every image, from the sizes in the json (no decoding).
        self.canvas_of = np.array(
            [choose_canvas(r.height, r.width, self.canvases) for r in coco.records], dtype=np.int64
        )

    def __len__(self) -> int:
        return len(self.coco.records)

    def targets(self, record: ImageRecord) -> tuple[np.ndarray, ...]:
        """The G largest instances, padded to G slots, and the count left out.

        Returns boxes float32[G, 4] (image pixels), classes int64[G], valid bool[G],
        masks uint8[G, S, S], dropped int.
        """
        g, s = self.max_instances, self.gt_mask_size
        keep = np.argsort(-record.areas, kind="stable")[:g]
        boxes = np.zeros((g, 4), np.float32)
        classes = np.zeros(g, np.int64)
        valid = np.zeros(g, bool)
        masks = np.zeros((g, s, s), np.uint8)
        for slot, t in enumerate(keep):
            boxes[slot] = record.boxes[t]
            classes[slot] = record.classes[t]
            valid[slot] = True
            masks[slot] = box_local_mask(record.segmentations[t], record.boxes[t],
                                         record.height, record.width, s)
        return boxes, classes, valid, masks, len(record.classes) - len(keep)

    def geometry(self, index: int, epoch: int) -> tuple[Size, Size, bool]:
        """A sample's canvas, resized image size and whether it is flipped (no decoding)."""
        record = self.coco.records[index]
        canvas = self.canvases[self.canvas_of[index]]
        size = resized_size(record.height, record.width, self.short_side, self.max_long_side,
                            canvas)
        rng = np.random.default_rng([self.seed, epoch, index])
        return canvas, size, bool(rng.random() < self.flip_prob)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, np.ndarray]:
        index, epoch = key
        record = self.coco.records[index]
        canvas, size, flip = self.geometry(index, epoch)
        image = load_image(record.path, self.coco.json_path, record.height, record.width)
        image = resize_image(image, size)
        boxes, classes, valid, masks, dropped = self.targets(record)
        boxes = resize_boxes(boxes, (record.height, record.width), size)
        if flip:
            boxes = flip_boxes(boxes, size[1])
            masks = masks[:, :, ::-1]
        boxes[~valid] = 0.0
        return {
            "images": pad_to_canvas(image, canvas, flip),
            "image_sizes": np.array(size, np.int64),
            "orig_sizes": np.array([record.height, record.width], np.int64),
            "image_ids": np.array(record.image_id, np.int64),
            "flipped": np.array(flip),
            "gt_boxes": boxes.astype(np.float32),
            "gt_classes": classes,
            "gt_valid": valid,
            "gt_masks": np.ascontiguousarray(masks),
            "num_dropped": np.array(dropped, np.int64),
        }
