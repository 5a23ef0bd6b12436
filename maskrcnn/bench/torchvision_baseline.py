"""torchvision's Mask R-CNN at settings equivalent to a config, and its training and inference
steps on the same images and targets as ours.

"Equivalent": the same ResNet depth, norm (frozen batch norm or GroupNorm) and frozen stages,
FPN channels, anchors, RPN and RoI-head sampling counts and thresholds, pre/post-NMS top-k,
pooler sides, box head width, mask head channels, detections per image, K + 1 classes, pixel
statistics; the same optimizer (SGD with our parameter groups, momentum, weight decay and LR
schedule), precision, loss scaling and gradient clipping. For depth 50 with frozen batch norm
and 2 frozen stages this is `maskrcnn_resnet50_fpn` with an ImageNet backbone (frozen batch
norm, 3 trainable layers); built from its parts here because the FPN width, heads and norm
follow the config. What cannot be matched is listed by `unmatched_settings`.
"""

from functools import partial

import torch
import torchvision
from torch import nn
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import (
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    TwoMLPHead,
)
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from maskrcnn.bench.step import bench_schedule
from maskrcnn.config import Config, config_pb2
from maskrcnn.config.config_pb2 import FP16
from maskrcnn.config.validate import GN_GROUPS
from maskrcnn.engine.solver import apply_gradients, build_optimizer
from maskrcnn.engine.step import autocast_dtype
from maskrcnn.model.roi_heads import MAX_NMS_CANDIDATES
from maskrcnn.runtime import Runtime

# What our backbone.frozen_stages = k freezes: the parameters under the first k of these
# (model/backbone.py); torchvision's trainable_layers = 5 - k is the same split.
FROZEN_STAGE_PREFIXES = (("conv1.", "bn1."), ("layer1.",), ("layer2.",), ("layer3.",),
                         ("layer4.",))
POOLED = ["0", "1", "2", "3"]  # torchvision's names of P2..P5 (P6 is "pool", RPN only)


def _backbone(config: Config) -> BackboneWithFPN:
    """ResNet body (random weights) + FPN P2..P6 with the config's depth, norm, frozen stages
    and FPN channels."""
    b = config.model.backbone
    if b.norm == config_pb2.GROUP_NORM:
        norm = partial(nn.GroupNorm, GN_GROUPS)
    else:
        norm = FrozenBatchNorm2d
    body = getattr(torchvision.models, f"resnet{b.depth}")(weights=None, norm_layer=norm)
    frozen = tuple(p for stage in FROZEN_STAGE_PREFIXES[:b.frozen_stages] for p in stage)
    for name, parameter in body.named_parameters():
        if name.startswith(frozen):
            parameter.requires_grad_(False)
    width = 64 if b.depth < 50 else 256  # C2 channels: BasicBlock vs Bottleneck
    return BackboneWithFPN(body, {f"layer{i + 1}": name for i, name in enumerate(POOLED)},
                           [width * 2**i for i in range(4)], config.model.fpn_channels)


class _ClassAgnostic(nn.Module):
    """A predictor with one class-agnostic output, repeated for each of the K + 1 classes so
    that torchvision's per-class losses and inference index it like theirs (repeating is a
    view: the parameters and FLOPs are those of the one output, as ours)."""

    def __init__(self, predictor: nn.Module, classes: int):
        super().__init__()
        self.predictor, self.classes = predictor, classes

    def forward(self, x: torch.Tensor):
        out = self.predictor(x)
        if isinstance(out, tuple):  # box predictor: (class scores, deltas[X, 4])
            return out[0], out[1].repeat(1, self.classes)
        return out.expand(-1, self.classes, -1, -1)  # mask logits[X, 1, M, M]


class _AgnosticBoxPredictor(nn.Module):
    """FastRCNNPredictor with one box regression (4 deltas) for all classes."""

    def __init__(self, in_channels: int, classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, classes)
        self.bbox_pred = nn.Linear(in_channels, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


def build_torchvision_model(config: Config) -> TorchvisionMaskRCNN:
    """torchvision's MaskRCNN at the config's settings, for images that fill its first canvas:
    min_size and max_size are the canvas's sides, so its transform resizes by exactly 1."""
    m = config.model
    rpn, roi = m.rpn, m.roi_heads
    c, k = m.fpn_channels, m.num_classes
    canvas = config.data.canvas[0]
    head_norm = partial(nn.GroupNorm, GN_GROUPS) if roi.head_group_norm else None
    anchors = AnchorGenerator(tuple((float(s),) for s in m.anchors.sizes),
                              (tuple(m.anchors.aspect_ratios),) * len(m.anchors.sizes))
    return TorchvisionMaskRCNN(
        _backbone(config), num_classes=None,
        min_size=min(canvas.height, canvas.width), max_size=max(canvas.height, canvas.width),
        image_mean=list(m.pixel_mean), image_std=list(m.pixel_std),
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(c, len(m.anchors.aspect_ratios)),
        rpn_pre_nms_top_n_train=rpn.pre_nms_topk_train,
        rpn_pre_nms_top_n_test=rpn.pre_nms_topk_test,
        rpn_post_nms_top_n_train=rpn.post_nms_topk_train,
        rpn_post_nms_top_n_test=rpn.post_nms_topk_test,
        rpn_nms_thresh=rpn.nms_threshold,
        rpn_fg_iou_thresh=rpn.fg_iou_threshold, rpn_bg_iou_thresh=rpn.bg_iou_threshold,
        rpn_batch_size_per_image=rpn.batch_size_per_image,
        rpn_positive_fraction=rpn.positive_fraction,
        box_roi_pool=MultiScaleRoIAlign(POOLED, roi.pooler_resolution, sampling_ratio=2),
        # With box_head_convs, torchvision's conv+fc head: the same 3x3 convs + ReLU, then
        # the same two fc layers.
        box_head=(FastRCNNConvFCHead((c, roi.pooler_resolution, roi.pooler_resolution),
                                     [c] * roi.box_head_convs, [roi.box_head_dim] * 2,
                                     norm_layer=head_norm)
                  if roi.box_head_convs else
                  TwoMLPHead(c * roi.pooler_resolution**2, roi.box_head_dim)),
        box_predictor=(_ClassAgnostic(_AgnosticBoxPredictor(roi.box_head_dim, k + 1), k + 1)
                       if roi.class_agnostic_boxes else
                       FastRCNNPredictor(roi.box_head_dim, k + 1)),
        box_score_thresh=roi.test_score_threshold, box_nms_thresh=roi.test_nms_threshold,
        box_detections_per_img=roi.detections_per_image,
        # Ours labels RoIs below the foreground threshold background: one threshold for both.
        box_fg_iou_thresh=roi.fg_iou_threshold, box_bg_iou_thresh=roi.fg_iou_threshold,
        box_batch_size_per_image=roi.batch_size_per_image,
        box_positive_fraction=roi.positive_fraction,
        bbox_reg_weights=tuple(roi.bbox_reg_weights),
        mask_roi_pool=MultiScaleRoIAlign(POOLED, roi.mask_pooler_resolution, sampling_ratio=2),
        mask_head=MaskRCNNHeads(c, [roi.mask_head_channels] * 4, 1, norm_layer=head_norm),
        mask_predictor=(_ClassAgnostic(MaskRCNNPredictor(roi.mask_head_channels,
                                                          roi.mask_head_channels, 1), k + 1)
                        if roi.class_agnostic_masks else
                        MaskRCNNPredictor(roi.mask_head_channels, roi.mask_head_channels, k + 1)),
    )


def unmatched_settings(config: Config, device: torch.device) -> list[str]:
    """What differs between the two sides of the comparison, one sentence each."""
    m, run = config.model, config.run
    roi = m.roi_heads
    notes = []
    if roi.roi_align_aligned:
        notes.append("ROIAlign: torchvision's MultiScaleRoIAlign is not aligned; ours is "
                     "(model.roi_heads.roi_align_aligned). Same cost.")
    if m.rpn.min_box_size != 1e-3:
        notes.append(f"RPN minimum proposal side: torchvision's is fixed at 1e-3 px, ours "
                     f"{m.rpn.min_box_size:g} px (model.rpn.min_box_size).")
    most_fg = int(roi.batch_size_per_image * roi.positive_fraction)
    slots = min(roi.max_fg_masks_per_image, roi.batch_size_per_image)
    trimmed = Runtime.for_device(device).trim_slots
    notes.append(f"Mask head in training: torchvision's runs on the foreground RoIs only "
                 f"(data-dependent, at most {most_fg} per image; with random weights few "
                 f"proposals overlap the ground truth, far fewer than in real training: see "
                 f"the mask-head RoIs per image); "
                 + (f"on this device ours also runs on the foreground RoIs only (of its "
                    f"{slots} slots per image; Runtime.slots)." if trimmed else
                    f"ours always runs on {slots} slots per image, padded ones included, and "
                    f"counts their FLOPs."))
    notes.append("Inputs: torchvision takes the same images as a list of float32 images "
                 "(converted once, before timing) and full-image masks; inside its step its "
                 "transform normalises, resizes by exactly 1 (one interpolation per image and "
                 "mask) and batches them. Ours takes the uint8 batch and box-local masks.")
    notes.append(f"Inference: torchvision runs its mask head and pastes masks only for the "
                 f"detections above the score threshold, a data-dependent count (random weights "
                 f"give near-uniform class scores, 1 / (K + 1) = {1 / (m.num_classes + 1):.3f} "
                 f"against a threshold of {roi.test_score_threshold:g}: see the detection "
                 f"counts); ours caps the candidates of its final NMS at {MAX_NMS_CANDIDATES} "
                 f"per image and "
                 + ("on this device computes and pastes masks for the first slots of "
                    f"{roi.detections_per_image} per image that hold a detection in some image "
                    "(at least one)." if trimmed else
                    f"always computes and pastes {roi.detections_per_image} per image."))
    if m.backbone.norm == config_pb2.FROZEN_BN:
        notes.append("Frozen batch norm: torchvision's recomputes its scale from four buffers "
                     "at every call and applies it to the conv's output; ours is folded once "
                     "to a scale and bias, and those into the weights and bias of the conv "
                     "before it (implementation, not setting).")
    ours_only = [f"run.{name}" for name in ("channels_last", "compile", "cuda_graph")
                 if getattr(run, name) and (name != "cuda_graph" or device.type == "cuda")]
    if ours_only:
        notes.append(f"{' and '.join(ours_only)} apply to ours only.")
    return notes


class TorchvisionBaseline:
    """torchvision's model with our optimizer, schedule and precision, on fixed inputs.

    Args:
        images, targets: torchvision's inputs (see synthetic.torchvision_inputs), on device.
    """

    def __init__(self, config: Config, device: torch.device, images: list[torch.Tensor],
                 targets: list[dict[str, torch.Tensor]]):
        torch.manual_seed(config.run.seed)
        self.config, self.device = config, device
        self.model = build_torchvision_model(config).to(device).train()
        self.images, self.targets = images, targets
        schedule = bench_schedule(config)
        self.optimizer = build_optimizer(self.model, config, schedule, device)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.autocast_dtype = autocast_dtype(config)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.run.precision == FP16)
        self._check_scale_one()
        self.mask_rois = 0  # RoIs of the batch in the mask head's last call (data-dependent)
        self.model.roi_heads.mask_head.register_forward_hook(self._count_mask_rois)

    def _count_mask_rois(self, module, args, out) -> None:
        self.mask_rois = args[0].shape[0]

    def _check_scale_one(self) -> None:
        """Raises if torchvision's transform would resize or pad these images (the comparison
        would then not be on the same input)."""
        with torch.no_grad():
            image_list, targets = self.model.transform(self.images, self.targets)
        sizes = [tuple(image.shape[-2:]) for image in self.images]
        same_boxes = all(torch.equal(a["boxes"], b["boxes"])
                         for a, b in zip(targets, self.targets, strict=True))
        if (image_list.image_sizes != sizes or not same_boxes
                or any(tuple(image_list.tensors.shape[-2:]) != size for size in sizes)):
            raise RuntimeError(f"torchvision's transform changes the {sizes[0]} images (to "
                               f"{tuple(image_list.tensors.shape[-2:])}); the canvas sides "
                               f"must be multiples of 32")

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.autocast_dtype,
                              enabled=self.autocast_dtype is not None)

    def train_step(self) -> torch.Tensor:
        """One optimisation step, as Trainer.train_step; returns the summed loss (on device)."""
        with self._autocast():
            losses = self.model(self.images, self.targets)
        total = torch.stack([loss.float() for loss in losses.values()]).sum()
        scaler = self.scaler if self.scaler.is_enabled() else None
        (total if scaler is None else scaler.scale(total)).backward()
        apply_gradients(self.parameters, self.optimizer, scaler, self.config.solver.grad_clip_norm)
        return total.detach()

    def inference_step(self) -> list[dict[str, torch.Tensor]]:
        """Detections with full-image masks (call with the model in eval mode)."""
        with torch.no_grad(), self._autocast():
            return self.model(self.images)
