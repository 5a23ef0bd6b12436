"""RoI heads: RoI sampling, the box head, the mask head, their losses and inference.

Shape legend: N images, P proposals per image, G ground-truth slots, R sampled RoIs per image,
F foreground mask slots per image (the first F of the R), K foreground classes (class 0 is the
background), D detections per image, C FPN channels, M mask side.
"""

import torch
from torch import nn
from torch.nn import functional as F

from maskrcnn.config.validate import GN_GROUPS
from maskrcnn.data.gt_masks import mask_targets
from maskrcnn.model.sampling import (
    Keys,
    Normalizers,
    local_counts,
    match,
    sample,
    uniform_keys,
)
from maskrcnn.ops.boxes import clip_boxes, decode_boxes, encode_boxes
from maskrcnn.ops.nms import batched_nms_fixed
from maskrcnn.ops.roi_align import multilevel_roi_align
from maskrcnn.runtime import Runtime

# Smooth-L1 transition point of the box-head loss, as torchvision.
BOX_SMOOTH_L1_BETA = 1.0 / 9
# Detections narrower than this (pixels) are dropped at inference, as torchvision.
MIN_DETECTION_SIZE = 1e-2
# Class-specific candidates per image entering the final NMS: the best this many by score.
# torchvision keeps every candidate above the score threshold (a data-dependent count); with
# 100 detections kept, candidates ranked beyond 50x that almost never survive NMS.
MAX_NMS_CANDIDATES = 5000
# How RoI candidates are matched to ground truth on every device: P + G candidates per image
# are few, and the runtime's `match` is the RPN's (over the anchors, where the kernels pay).
ROI_MATCH_METHOD = "tiled"


def _flat_rois(boxes: torch.Tensor) -> torch.Tensor:
    """float[N, X, 4] -> float[N*X, 5] (image index, x1, y1, x2, y2) for ROIAlign."""
    n, x, _ = boxes.shape
    index = torch.arange(n, device=boxes.device, dtype=boxes.dtype).repeat_interleave(x)
    return torch.cat([index[:, None], boxes.reshape(-1, 4)], dim=1)


def _conv_block(in_channels: int, out_channels: int, group_norm: bool) -> list[nn.Module]:
    """A head's 3x3 conv and ReLU, with GroupNorm between them (and no conv bias) if asked."""
    if not group_norm:
        return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True)]
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(GN_GROUPS, out_channels), nn.ReLU(inplace=True)]


def _own_class(classes: torch.Tensor, outputs: int) -> torch.Tensor:
    """Which of a head's per-class outputs belongs to each RoI: its class, or 0 when the head
    has one class-agnostic output."""
    return classes if outputs > 1 else torch.zeros_like(classes)


def box_losses(logits: torch.Tensor, deltas: torch.Tensor, classes: torch.Tensor,
               targets: torch.Tensor, valid: torch.Tensor,
               is_fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The box head's losses over R sampled RoIs per image, summed, not yet normalised
    (`RoIHeads.losses` divides both by the sampled count).

    Args:
        logits: float[N, R, K+1] class scores.
        deltas: float[N, R, K+1, 4] class-specific box deltas, or float[N, R, 1, 4] with one
            class-agnostic output.
        classes: int64[N, R] each RoI's class, 0 for background.
        targets: float[N, R, 4] each RoI's matched ground truth encoded relative to the RoI;
            only the foreground's are read (the others may be NaN or infinite).
        valid: bool[N, R] sampled (False in padded slots); is_fg: bool[N, R] foreground.

    Returns:
        cls: float[] the cross entropy summed over valid RoIs; box: float[] the smooth L1
        (beta BOX_SMOOTH_L1_BETA) of each foreground RoI's own-class deltas, summed over the
        four coordinates and the foreground RoIs.
    """
    cls = F.cross_entropy(logits.flatten(0, 1), classes.flatten(), reduction="none")  # (N*R,)
    # Only foreground RoIs have box targets. The others' encodings may be NaN or infinite
    # (a padded RoI or padded ground truth has zero width); their loss is multiplied by
    # 0 below, and 0 x NaN would still be NaN, so their targets are set to 0 here.
    targets = torch.where(is_fg.unsqueeze(-1), targets, 0.0)
    # (N, R, K+1, 4) -> (N, R, 4): the deltas of each RoI's own class.
    own = deltas.gather(2, _own_class(classes, deltas.shape[2])[:, :, None, None]
                        .expand(-1, -1, 1, 4))[:, :, 0]
    box = F.smooth_l1_loss(own, targets, beta=BOX_SMOOTH_L1_BETA, reduction="none").sum(-1)
    return (cls * valid.float().flatten()).sum(), (box * is_fg).sum()


def mask_loss(mask_logits: torch.Tensor, classes: torch.Tensor, targets: torch.Tensor,
              weight: torch.Tensor) -> torch.Tensor:
    """The mask head's loss over X mask slots, summed, not yet normalised (`RoIHeads.losses`
    divides it by the weights' sum).

    Args:
        mask_logits: float[X, K+1, M, M], or float[X, 1, M, M] with one class-agnostic output.
        classes: int64[X] each slot's class.
        targets: float[X, M, M] in [0, 1], each slot's ground-truth mask in the slot's box.
        weight: float[X] each slot's weight (1 foreground, 0 background or padding); slots of
            weight 0 must still have finite logits and targets.

    Returns:
        float[]: the per-pixel BCE of each slot's own-class mask, averaged over the M x M
        pixels, weighted and summed over the slots (computed in float32).
    """
    size = mask_logits.shape[-1]
    # (X, K+1, M, M) -> (X, M, M): the mask of each slot's own class.
    own_mask = mask_logits.float().gather(
        1, _own_class(classes, mask_logits.shape[1])[:, None, None, None]
        .expand(-1, 1, size, size))[:, 0]
    bce = F.binary_cross_entropy_with_logits(own_mask, targets, reduction="none").mean((1, 2))
    return (bce * weight).sum()


class BoxHead(nn.Module):
    """Optional 3x3 convs, then two fully connected layers on pooled RoI features, then class
    scores and class-specific box deltas (the background class included, as torchvision)."""

    def __init__(self, channels: int, resolution: int, hidden: int, num_classes: int,
                 convs: int = 0, group_norm: bool = False, class_agnostic: bool = False):
        super().__init__()
        layers = []
        for _ in range(convs):
            layers += _conv_block(channels, channels, group_norm)
        self.convs = nn.Sequential(*layers)
        for module in self.convs.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0.0)
        self.fc6 = nn.Linear(channels * resolution * resolution, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.cls_score = nn.Linear(hidden, num_classes + 1)
        self.bbox_pred = nn.Linear(hidden, 4 if class_agnostic else (num_classes + 1) * 4)

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pooled float[X, C, S, S] -> class logits float[X, K+1], deltas float[X, K+1, 4]
        (float[X, 1, 4] if class-agnostic)."""
        x = F.relu(self.fc7(F.relu(self.fc6(self.convs(pooled).flatten(1)))))
        return self.cls_score(x), self.bbox_pred(x).reshape(x.shape[0], -1, 4)


class MaskHead(nn.Module):
    """Four 3x3 convs, a 2x transposed conv and a 1x1 conv to per-class mask logits."""

    def __init__(self, channels: int, hidden: int, num_classes: int, group_norm: bool = False,
                 class_agnostic: bool = False):
        super().__init__()
        convs = []
        for index in range(4):
            convs += _conv_block(channels if index == 0 else hidden, hidden, group_norm)
        self.convs = nn.Sequential(*convs)
        self.deconv = nn.ConvTranspose2d(hidden, hidden, 2, stride=2)
        self.logits = nn.Conv2d(hidden, 1 if class_agnostic else num_classes + 1, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0.0)
        if class_agnostic:
            # Kaiming's fan-out init of a 1-channel conv draws weights of std sqrt(2): initial
            # logits in the tens, a mask loss of ~1.9 instead of ~0.7. Small weights instead,
            # as Detectron2 initialises its mask predictor.
            nn.init.normal_(self.logits.weight, std=0.001)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled float[X, C, S, S] -> mask logits float[X, K+1, 2S, 2S] (float[X, 1, 2S, 2S]
        if class-agnostic)."""
        return self.logits(F.relu(self.deconv(self.convs(pooled))))


class RoIHeads(nn.Module):
    """Box and mask heads with their sampling, losses and inference.

    Args:
        channels: FPN channels C; strides: strides of the pooled levels (P2..P5).
        num_classes: K; box_head_dim: hidden size of the box head.
        batch_size_per_image, positive_fraction, fg_iou_threshold: RoI sampling.
        bbox_reg_weights: (wx, wy, ww, wh) of the box deltas.
        pooler_resolution, mask_pooler_resolution: ROIAlign output sides.
        mask_resolution: M, the mask head's output side (2 x mask_pooler_resolution, as the
            config's validation holds), at which mask targets are made.
        mask_head_channels: hidden channels of the mask head; max_fg_masks: F.
        score_threshold, nms_threshold, detections_per_image: inference.
        aligned: ROIAlign half-pixel alignment (torchvision's Mask R-CNN uses False).
        box_head_convs: 3x3 convs of the box head before its fc layers.
        head_group_norm: GroupNorm after every 3x3 conv of the box and mask heads.
        class_agnostic_boxes, class_agnostic_masks: one box regression / one mask per RoI
            instead of one per class.
        runtime: which slots the heads compute (its `slots`), how the detection NMS (its
            `nms`) and ROIAlign (its `roi_align`) run.
        keys, normalizers: as RPN's.
    """

    def __init__(self, channels: int, strides: list[int], num_classes: int, box_head_dim: int,
                 batch_size_per_image: int, positive_fraction: float, fg_iou_threshold: float,
                 bbox_reg_weights: tuple[float, float, float, float], pooler_resolution: int,
                 mask_pooler_resolution: int, mask_resolution: int, mask_head_channels: int,
                 max_fg_masks: int, score_threshold: float, nms_threshold: float,
                 detections_per_image: int, runtime: Runtime, aligned: bool = True,
                 box_head_convs: int = 0, head_group_norm: bool = False,
                 class_agnostic_boxes: bool = False, class_agnostic_masks: bool = False,
                 keys: Keys = uniform_keys, normalizers: Normalizers = local_counts):
        super().__init__()
        self.runtime = runtime
        self.strides = list(strides)
        self.num_classes = num_classes
        self.box_head = BoxHead(channels, pooler_resolution, box_head_dim, num_classes,
                                box_head_convs, head_group_norm, class_agnostic_boxes)
        self.mask_head = MaskHead(channels, mask_head_channels, num_classes, head_group_norm,
                                  class_agnostic_masks)
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.fg_iou_threshold = fg_iou_threshold
        self.bbox_reg_weights = tuple(bbox_reg_weights)
        self.pooler_resolution = pooler_resolution
        self.mask_pooler_resolution = mask_pooler_resolution
        self.mask_resolution = mask_resolution
        self.max_fg_masks = max_fg_masks
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.detections_per_image = detections_per_image
        self.aligned = aligned
        self.keys = keys  # tests pass deterministic keys
        self.normalizers = normalizers  # data-parallel training sums counts over ranks

    def _pool(self, features: list[torch.Tensor], rois: torch.Tensor,
              resolution: int) -> torch.Tensor:
        """rois float[X, 5] (image index, x1, y1, x2, y2) -> pooled float[X, C, S, S] from
        their FPN levels."""
        return multilevel_roi_align(features[:len(self.strides)], rois, resolution,
                                    self.strides, 2, self.aligned, self.runtime.roi_align)

    def sample_rois(self, proposals: torch.Tensor, proposals_valid: torch.Tensor,
                    gt_boxes: torch.Tensor, gt_classes: torch.Tensor,
                    gt_valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """R RoIs per image from proposals plus the ground-truth boxes, foreground first.

        Returns rois float[N, R, 4], classes int64[N, R] (0 for background), matched
        int64[N, R] ground-truth slot, is_fg bool[N, R], valid bool[N, R].
        """
        candidates = torch.cat([proposals.detach().float(), gt_boxes.float()], dim=1)
        candidates_valid = torch.cat([proposals_valid, gt_valid], dim=1)
        matched, labels = match(candidates, candidates_valid, gt_boxes, gt_valid,
                                self.fg_iou_threshold, self.fg_iou_threshold,
                                allow_low_quality=False, method=ROI_MATCH_METHOD)
        index, is_fg, valid = sample(labels, self.batch_size_per_image, self.positive_fraction,
                                     self.keys)
        matched = matched.gather(1, index)
        return {
            "rois": candidates.gather(1, index.unsqueeze(-1).expand(-1, -1, 4)),
            "classes": torch.where(is_fg, gt_classes.gather(1, matched), 0),
            "matched": matched,
            "is_fg": is_fg,
            "valid": valid,
        }

    def _mask_slots(self, sampled: dict[str, torch.Tensor]) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mask head's X slots from `sample_rois`' output. Foreground RoIs come first, so
        the first F slots of each image hold every mask-head sample: X = N*F, flattened; on a
        CPU, only the foreground ones (Runtime.slots).

        Returns rois float[X, 5] (image index, x1, y1, x2, y2), classes int64[X], matched
        int64[X] ground-truth slot, is_fg bool[X].
        """
        f = min(self.max_fg_masks, sampled["classes"].shape[1])
        rois = _flat_rois(sampled["rois"][:, :f].float())  # (N*F, 5)
        classes, matched, fg = (sampled[key][:, :f].reshape(-1)  # (N*F,)
                                for key in ("classes", "matched", "is_fg"))
        index = self.runtime.slots(fg)
        return rois[index], classes[index], matched[index], fg[index]

    def losses(self, features: list[torch.Tensor], proposals: torch.Tensor,
               proposals_valid: torch.Tensor, gt_boxes: torch.Tensor, gt_classes: torch.Tensor,
               gt_valid: torch.Tensor, gt_masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """loss_cls (cross entropy over sampled RoIs), loss_box (smooth L1 of the true class's
        deltas over foreground RoIs, divided by the sampled count) and loss_mask (per-pixel
        BCE of the true class's mask, averaged over the foreground mask slots). Counts are
        the batch's (the global batch's under data parallelism: see `normalizers`)."""
        s = self.sample_rois(proposals, proposals_valid, gt_boxes, gt_classes, gt_valid)
        # On a CPU, only the RoI slots sampled in some image (Runtime.slots).
        used = self.runtime.slots(s["valid"])
        s = {key: value[:, used] for key, value in s.items()}
        n, r = s["classes"].shape
        logits, deltas = self.box_head(self._pool(features, _flat_rois(s["rois"].float()),
                                                  self.pooler_resolution))
        # (N*R, K+1) -> (N, R, K+1); (N*R, K+1, 4) -> (N, R, K+1, 4)
        logits, deltas = logits.float().reshape(n, r, -1), deltas.float().reshape(n, r, -1, 4)
        matched_boxes = gt_boxes.float().gather(1, s["matched"].unsqueeze(-1).expand(-1, -1, 4))
        box_targets = encode_boxes(matched_boxes, s["rois"], self.bbox_reg_weights)
        cls, box = box_losses(logits, deltas, s["classes"], box_targets, s["valid"], s["is_fg"])

        rois, classes, matched, fg = self._mask_slots(s)
        mask_logits = self.mask_head(self._pool(features, rois, self.mask_pooler_resolution))
        mask_target = mask_targets(gt_masks, gt_boxes, rois[:, 1:], rois[:, 0].long(), matched,
                                   self.mask_resolution)
        fg_weight = fg.float()
        mask = mask_loss(mask_logits, classes, mask_target, fg_weight)
        # One normaliser call for both counts: data-parallel training sums them over the ranks
        # in one all-reduce.
        count, mask_count = self.normalizers(torch.stack([s["valid"].float().sum(),
                                                          fg_weight.sum()]))
        return {"loss_cls": cls / count, "loss_box": box / count, "loss_mask": mask / mask_count}

    @torch.no_grad()
    def detect(self, features: list[torch.Tensor], proposals: torch.Tensor,
               proposals_valid: torch.Tensor, image_sizes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Detections per image: boxes float[N, D, 4] (canvas pixels), scores float[N, D],
        classes int64[N, D] in 1..K, valid bool[N, D], mask probabilities float[N, D, M, M]
        of each detection's class; sorted by score, padded with score 0 and valid False."""
        n, p, _ = proposals.shape
        k = self.num_classes
        logits, deltas = self.box_head(self._pool(features, _flat_rois(proposals.float()),
                                                  self.pooler_resolution))
        scores = F.softmax(logits.float(), dim=-1).reshape(n, p, k + 1)[:, :, 1:]  # (N, P, K)
        deltas = deltas.float().reshape(n, p, -1, 4)
        deltas = deltas[:, :, 1:] if deltas.shape[2] > 1 else deltas.expand(-1, -1, k, -1)
        boxes = decode_boxes(deltas, proposals.float().unsqueeze(2).expand(-1, -1, k, -1),
                             self.bbox_reg_weights)
        boxes = clip_boxes(boxes.reshape(n, p * k, 4), image_sizes)  # (N, P*K, 4)
        scores = scores.reshape(n, p * k)
        classes = torch.arange(1, k + 1, device=scores.device).repeat(p).expand(n, -1)
        wide = (boxes[..., 2] - boxes[..., 0] >= MIN_DETECTION_SIZE) & (
            boxes[..., 3] - boxes[..., 1] >= MIN_DETECTION_SIZE)
        valid = (scores > self.score_threshold) & wide & proposals_valid.repeat_interleave(k, 1)
        # Keep the best candidates only (see MAX_NMS_CANDIDATES), then class-wise NMS.
        top = torch.topk(torch.where(valid, scores, -1.0), min(MAX_NMS_CANDIDATES, p * k), dim=1)
        boxes = boxes.gather(1, top.indices.unsqueeze(-1).expand(-1, -1, 4))
        classes = classes.gather(1, top.indices)
        keep_index, keep = batched_nms_fixed(boxes, top.values, top.values >= 0, classes,
                                             self.nms_threshold, self.detections_per_image,
                                             self.runtime.nms)
        det_boxes = boxes.gather(1, keep_index.unsqueeze(-1).expand(-1, -1, 4)) * keep[..., None]
        det_scores = top.values.gather(1, keep_index) * keep
        det_classes = torch.where(keep, classes.gather(1, keep_index), 0)

        # Kept detections come first; on a CPU the mask head skips the slots empty in every
        # image (Runtime.slots): U of the D. Masks of empty slots are 0 either way.
        d = det_boxes.shape[1]
        used = self.runtime.slots(keep)
        used_boxes, used_classes = det_boxes[:, used], det_classes[:, used]
        used_keep = keep[:, used]
        u = used_keep.shape[1]
        mask_logits = self.mask_head(self._pool(features, _flat_rois(used_boxes),
                                                self.mask_pooler_resolution))
        size = mask_logits.shape[-1]
        # (N*U, K+1, M, M) -> (N, U, M, M): each detection's class (0 for padding).
        masks = mask_logits.float().gather(
            1, _own_class(used_classes.reshape(-1), mask_logits.shape[1])
            [:, None, None, None].expand(-1, 1, size, size))
        masks = masks.sigmoid().reshape(n, u, size, size) * used_keep[:, :, None, None]
        return {
            "boxes": det_boxes,
            "scores": det_scores,
            "classes": det_classes,
            "valid": keep,
            "masks": F.pad(masks, (0, 0, 0, 0, 0, d - u)),  # (N, D, M, M)
        }
