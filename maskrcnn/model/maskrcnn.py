"""Mask R-CNN: the whole flow in one forward, and `build_model`, which turns a config into it.

Shape legend: N images, H x W the canvas, G ground-truth slots, S box-local mask side,
P proposals per image, D detections per image, M mask side, K foreground classes.
"""

import torch
from torch import nn
from torch.profiler import record_function

from maskrcnn.config import Config, config_pb2
from maskrcnn.model.anchors import AnchorCache
from maskrcnn.model.backbone import Backbone
from maskrcnn.model.roi_heads import RoIHeads
from maskrcnn.model.rpn import RPN
from maskrcnn.model.sampling import (
    Keys,
    global_batch_keys,
    global_counts,
    local_counts,
    uniform_keys,
)
from maskrcnn.runtime import Runtime

# The RoI heads pool from P2..P5; P6 only feeds the RPN (as in the FPN paper).
POOLED_LEVELS = 4


class MaskRCNN(nn.Module):
    """Backbone + FPN, RPN and RoI heads on batches of static shape.

    Args:
        backbone: images -> FPN features P2..P6.
        anchors: anchors for each canvas.
        rpn, roi_heads: the two stages.
        pixel_mean, pixel_std: RGB statistics on the 0-255 scale.
        runtime: which ground-truth slots the anchors are matched to (its `slots`: on a CPU,
            those some image uses only).
    """

    def __init__(self, backbone: nn.Module, anchors: AnchorCache, rpn: RPN, roi_heads: RoIHeads,
                 pixel_mean: list[float], pixel_std: list[float], runtime: Runtime):
        super().__init__()
        self.runtime = runtime
        self.backbone = backbone
        self.anchors = anchors
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).reshape(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).reshape(1, 3, 1, 1), False)

    def normalize(self, images: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """uint8[N, 3, H, W] -> float[N, 3, H, W] normalised, exactly 0 in the padding (as if
        each image had been normalised and then padded with zeros)."""
        x = (images.float() - self.pixel_mean) / self.pixel_std
        h, w = images.shape[-2:]
        rows = torch.arange(h, device=images.device)[None, :] < image_sizes[:, :1]  # (N, H)
        cols = torch.arange(w, device=images.device)[None, :] < image_sizes[:, 1:]  # (N, W)
        inside = rows[:, None, :, None] & cols[:, None, None, :]  # (N, 1, H, W)
        return x * inside

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor,
                gt_boxes: torch.Tensor | None = None, gt_classes: torch.Tensor | None = None,
                gt_valid: torch.Tensor | None = None,
                gt_masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training: the five losses. Evaluation: the detections (see RoIHeads.detect).

        images uint8[N, 3, H, W]; image_sizes int64[N, 2]; gt_boxes float[N, G, 4] (canvas
        pixels); gt_classes int64[N, G]; gt_valid bool[N, G]; gt_masks uint8[N, G, S, S].
        """
        # Profiler scopes (no-ops unless profiling; maskrcnn/bench/breakdown.py sums them).
        with record_function("backbone+fpn"):
            features = self.backbone(self.normalize(images, image_sizes))
        with record_function("rpn+proposals"):
            anchors = self.anchors((images.shape[-2], images.shape[-1]))
            proposals, _, proposals_valid, objectness, deltas = self.rpn(features, anchors,
                                                                         image_sizes)
        pooled = features[:POOLED_LEVELS]
        if not self.training:
            with record_function("roi_heads"):
                return self.roi_heads.detect(pooled, proposals, proposals_valid, image_sizes)
        with record_function("rpn_losses"):
            # On a CPU, anchors are matched to the ground-truth slots used in some image only
            # (Runtime.slots). The RoI heads keep all G: their sampling keys, one per candidate
            # (proposals and ground-truth slots), must not depend on the batch's contents.
            used = self.runtime.slots(gt_valid)
            losses = self.rpn.losses(objectness, deltas, anchors, gt_boxes[:, used],
                                     gt_valid[:, used])
        with record_function("roi_heads"):
            losses.update(self.roi_heads.losses(pooled, proposals, proposals_valid, gt_boxes,
                                                gt_classes, gt_valid, gt_masks))
        return losses


def build_model(config: Config, runtime: Runtime | None = None,
                keys: Keys | None = None) -> MaskRCNN:
    """The model a config describes, its weights random (a new training run then loads
    model.backbone.weights_path or --init_from into it, train.py; eval and predict load a
    checkpoint's, so they never need the ImageNet file), computing as `runtime` says
    (default: a CPU's choices, one process). With several processes its sampling keys are
    rows of the global batch's and its loss normalisers are summed over the ranks; `keys`
    replaces the keys (tests)."""
    runtime = runtime or Runtime.for_device("cpu")
    parallel = runtime.world_size > 1
    if keys is None:
        keys = global_batch_keys(runtime.rank, runtime.world_size) if parallel else uniform_keys
    normalizers = global_counts if parallel else local_counts
    m = config.model
    rpn, roi = m.rpn, m.roi_heads
    strides = list(m.anchors.strides)
    return MaskRCNN(
        backbone=Backbone(depth=m.backbone.depth, frozen_stages=m.backbone.frozen_stages,
                          fpn_channels=m.fpn_channels,
                          norm=config_pb2.Norm.Name(m.backbone.norm).lower(),
                          fold_frozen_bn=runtime.fold_frozen_bn),
        anchors=AnchorCache([(c.height, c.width) for c in config.data.canvas],
                            list(m.anchors.sizes), list(m.anchors.aspect_ratios), strides),
        rpn=RPN(channels=m.fpn_channels, anchors_per_location=len(m.anchors.aspect_ratios),
                batch_size_per_image=rpn.batch_size_per_image,
                positive_fraction=rpn.positive_fraction,
                fg_iou_threshold=rpn.fg_iou_threshold, bg_iou_threshold=rpn.bg_iou_threshold,
                pre_nms_topk=(rpn.pre_nms_topk_train, rpn.pre_nms_topk_test),
                post_nms_topk=(rpn.post_nms_topk_train, rpn.post_nms_topk_test),
                nms_threshold=rpn.nms_threshold, min_box_size=rpn.min_box_size,
                runtime=runtime, keys=keys, normalizers=normalizers),
        roi_heads=RoIHeads(
            channels=m.fpn_channels, strides=strides[:POOLED_LEVELS],
            num_classes=m.num_classes, box_head_dim=roi.box_head_dim,
            batch_size_per_image=roi.batch_size_per_image,
            positive_fraction=roi.positive_fraction, fg_iou_threshold=roi.fg_iou_threshold,
            bbox_reg_weights=tuple(roi.bbox_reg_weights),
            pooler_resolution=roi.pooler_resolution,
            mask_pooler_resolution=roi.mask_pooler_resolution,
            mask_resolution=roi.mask_resolution,
            mask_head_channels=roi.mask_head_channels, max_fg_masks=roi.max_fg_masks_per_image,
            score_threshold=roi.test_score_threshold, nms_threshold=roi.test_nms_threshold,
            detections_per_image=roi.detections_per_image, aligned=roi.roi_align_aligned,
            box_head_convs=roi.box_head_convs, head_group_norm=roi.head_group_norm,
            class_agnostic_boxes=roi.class_agnostic_boxes,
            class_agnostic_masks=roi.class_agnostic_masks, runtime=runtime, keys=keys,
            normalizers=normalizers),
        pixel_mean=list(m.pixel_mean),
        pixel_std=list(m.pixel_std),
        runtime=runtime,
    )
