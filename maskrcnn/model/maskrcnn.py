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
from maskrcnn.model.trim import trims, used_slots

# The RoI heads pool from P2..P5; P6 only feeds the RPN (as in the FPN paper).
POOLED_LEVELS = 4


class MaskRCNN(nn.Module):
    """Backbone + FPN, RPN and RoI heads on batches of static shape.

    Args:
        backbone: images -> FPN features P2..P6.
        anchors: anchors for each canvas.
        rpn, roi_heads: the two stages.
        pixel_mean, pixel_std: RGB statistics on the 0-255 scale.
    """

    def __init__(self, backbone: nn.Module, anchors: AnchorCache, rpn: RPN, roi_heads: RoIHeads,
                 pixel_mean: list[float], pixel_std: list[float]):
        super().__init__()
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
            # (trim.py). The RoI heads keep all G: their sampling keys, one per candidate
            # (proposals and ground-truth slots), must not depend on the batch's contents.
            g = used_slots(gt_valid) if trims(gt_valid) else gt_valid.shape[1]
            losses = self.rpn.losses(objectness, deltas, anchors, gt_boxes[:, :g],
                                     gt_valid[:, :g])
        with record_function("roi_heads"):
            losses.update(self.roi_heads.losses(pooled, proposals, proposals_valid, gt_boxes,
                                                gt_classes, gt_valid, gt_masks))
        return losses


def build_model(config: Config) -> MaskRCNN:
    """The model a config describes (weights random, or ImageNet backbone weights from
    model.backbone.weights_path)."""
    m = config.model
    rpn, roi = m.rpn, m.roi_heads
    strides = list(m.anchors.strides)
    return MaskRCNN(
        backbone=Backbone(m.backbone.depth, m.backbone.frozen_stages, m.fpn_channels,
                          m.backbone.weights_path,
                          norm=config_pb2.Norm.Name(m.backbone.norm).lower()),
        anchors=AnchorCache([(c.height, c.width) for c in config.data.canvas],
                            list(m.anchors.sizes), list(m.anchors.aspect_ratios), strides),
        rpn=RPN(m.fpn_channels, len(m.anchors.aspect_ratios), rpn.batch_size_per_image,
                rpn.positive_fraction, rpn.fg_iou_threshold, rpn.bg_iou_threshold,
                (rpn.pre_nms_topk_train, rpn.pre_nms_topk_test),
                (rpn.post_nms_topk_train, rpn.post_nms_topk_test), rpn.nms_threshold,
                rpn.min_box_size),
        roi_heads=RoIHeads(
            m.fpn_channels, strides[:POOLED_LEVELS], m.num_classes, roi.box_head_dim,
            roi.batch_size_per_image, roi.positive_fraction, roi.fg_iou_threshold,
            tuple(roi.bbox_reg_weights), roi.pooler_resolution, roi.mask_pooler_resolution,
            roi.mask_head_channels, roi.max_fg_masks_per_image, roi.test_score_threshold,
            roi.test_nms_threshold, roi.detections_per_image, roi.roi_align_aligned,
            roi.box_head_convs, roi.head_group_norm, roi.class_agnostic_boxes,
            roi.class_agnostic_masks),
        pixel_mean=list(m.pixel_mean),
        pixel_std=list(m.pixel_std),
    )
