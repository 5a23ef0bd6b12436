"""Region proposal network: head, anchor targets, losses and proposals.

Shape legend: N images, L levels, C channels, B anchors per location, A_l = H_l*W_l*B anchors
on level l, A = sum of A_l, G ground-truth slots, S sampled anchors per image,
P proposals per image.
"""

import torch
from torch import nn
from torch.nn import functional as F

from maskrcnn.model.sampling import Keys, Normalizers, local_counts, match, sample, uniform_keys
from maskrcnn.ops.boxes import encode_boxes
from maskrcnn.ops.proposals import RPN_BOX_WEIGHTS, generate_proposals
from maskrcnn.runtime import Runtime

# Smooth-L1 transition point of the RPN box loss, as torchvision.
RPN_SMOOTH_L1_BETA = 1.0 / 9


def rpn_losses(logits: torch.Tensor, deltas: torch.Tensor, targets: torch.Tensor,
               is_fg: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The RPN's losses over S sampled anchors per image, summed, not yet normalised
    (`RPN.losses` divides both by the sampled count).

    Args:
        logits: float[N, S] objectness; deltas: float[N, S, 4] predicted box deltas.
        targets: float[N, S, 4] encoded box targets, finite everywhere (a padded or
            background sample's loss is multiplied by 0, and 0 x NaN would still be NaN).
        is_fg: bool[N, S] foreground (objectness target 1); valid: bool[N, S] sampled
            (False in padded slots).

    Returns:
        cls: float[] the BCE of the objectness summed over valid samples; box: float[] the
        smooth L1 (beta RPN_SMOOTH_L1_BETA) summed over the four coordinates and the
        foreground samples.
    """
    cls = F.binary_cross_entropy_with_logits(logits, is_fg.float(), reduction="none")
    box = F.smooth_l1_loss(deltas, targets, beta=RPN_SMOOTH_L1_BETA, reduction="none").sum(-1)
    return (cls * valid).sum(), (box * is_fg).sum()


class RPNHead(nn.Module):
    """A 3x3 conv shared by all levels, then per-location objectness and box deltas."""

    def __init__(self, channels: int, anchors_per_location: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(channels, anchors_per_location, 1)
        self.bbox_pred = nn.Conv2d(channels, anchors_per_location * 4, 1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0.0)

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor],
                                                            list[torch.Tensor]]:
        """features: per level float[N, C, H_l, W_l] -> per level objectness float[N, A_l]
        and deltas float[N, A_l, 4], in the anchors' order (location-major, then anchor)."""
        objectness, deltas = [], []
        for feature in features:
            t = F.relu(self.conv(feature))
            n, _, h, w = t.shape
            # (N, B, H, W) -> (N, H, W, B) -> (N, H*W*B)
            objectness.append(self.cls_logits(t).permute(0, 2, 3, 1).reshape(n, -1))
            # (N, B*4, H, W) -> (N, B, 4, H, W) -> (N, H, W, B, 4) -> (N, H*W*B, 4)
            d = self.bbox_pred(t).reshape(n, -1, 4, h, w).permute(0, 3, 4, 1, 2)
            deltas.append(d.reshape(n, -1, 4))
        return objectness, deltas


class RPN(nn.Module):
    """Proposals from FPN features, and the RPN losses when training.

    Args:
        channels: FPN channels C.
        anchors_per_location: B.
        batch_size_per_image, positive_fraction: anchor sampling for the losses.
        fg_iou_threshold, bg_iou_threshold: anchor labels (IoU with ground truth).
        pre_nms_topk, post_nms_topk: (train, test) pairs: per level before NMS, per image after.
        nms_threshold: IoU of proposal NMS; min_box_size: smaller proposals are dropped.
        runtime: how the proposals' NMS (its `nms`) and the anchor matching (its `match`) run.
        keys: random sampling keys (model/sampling.py); normalizers: the loss normalisers
            from the counts (local, or summed over the ranks in data-parallel training).
    """

    def __init__(self, channels: int, anchors_per_location: int, batch_size_per_image: int,
                 positive_fraction: float, fg_iou_threshold: float, bg_iou_threshold: float,
                 pre_nms_topk: tuple[int, int], post_nms_topk: tuple[int, int],
                 nms_threshold: float, min_box_size: float, runtime: Runtime,
                 keys: Keys = uniform_keys, normalizers: Normalizers = local_counts):
        super().__init__()
        self.runtime = runtime
        self.head = RPNHead(channels, anchors_per_location)
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.fg_iou_threshold = fg_iou_threshold
        self.bg_iou_threshold = bg_iou_threshold
        self.pre_nms_topk = pre_nms_topk
        self.post_nms_topk = post_nms_topk
        self.nms_threshold = nms_threshold
        self.min_box_size = min_box_size
        self.keys = keys  # tests pass deterministic keys
        self.normalizers = normalizers  # data-parallel training sums counts over ranks

    def forward(self, features: list[torch.Tensor], anchors: list[torch.Tensor],
                image_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                    list[torch.Tensor], list[torch.Tensor]]:
        """Proposals for each image.

        Returns boxes float[N, P, 4], scores float[N, P] (logits), valid bool[N, P], and the
        head's per-level objectness and deltas (for `losses`).
        """
        objectness, deltas = self.head(features)
        mode = 0 if self.training else 1
        boxes, scores, valid = generate_proposals(
            [o.detach().float() for o in objectness], [d.detach().float() for d in deltas],
            anchors, image_sizes, self.pre_nms_topk[mode], self.post_nms_topk[mode],
            self.nms_threshold, self.min_box_size, self.runtime.nms,
        )
        return boxes, scores, valid, objectness, deltas

    def losses(self, objectness: list[torch.Tensor], deltas: list[torch.Tensor],
               anchors: list[torch.Tensor], gt_boxes: torch.Tensor,
               gt_valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """loss_rpn_cls (BCE over sampled anchors) and loss_rpn_box (smooth L1 over positive
        anchors), both divided by the number of sampled anchors in the batch (the global
        batch under data parallelism: see `normalizers`)."""
        all_anchors = torch.cat(anchors)  # (A, 4)
        logits = torch.cat(objectness, dim=1).float()  # (N, A)
        pred = torch.cat(deltas, dim=1).float()  # (N, A, 4)
        anchor_valid = torch.ones(all_anchors.shape[0], dtype=torch.bool,
                                  device=all_anchors.device)
        matched, labels = match(all_anchors, anchor_valid, gt_boxes, gt_valid,
                                self.fg_iou_threshold, self.bg_iou_threshold,
                                allow_low_quality=True, method=self.runtime.match)
        index, is_fg, valid = sample(labels, self.batch_size_per_image, self.positive_fraction,
                                     self.keys)
        # Gather the S sampled anchors of each image: (N, A, ...) -> (N, S, ...).
        sampled_logits = logits.gather(1, index)
        sampled_pred = pred.gather(1, index.unsqueeze(-1).expand(-1, -1, 4))
        sampled_anchors = all_anchors[index]  # (N, S, 4)
        sampled_gt = gt_boxes.float().gather(1, matched.gather(1, index).unsqueeze(-1)
                                             .expand(-1, -1, 4))
        # Non-foreground samples regress onto themselves (target 0): padded ground truth would
        # give log(0) and a NaN gradient even where the loss is masked out.
        sampled_gt = torch.where(is_fg.unsqueeze(-1), sampled_gt, sampled_anchors)
        targets = encode_boxes(sampled_gt, sampled_anchors, RPN_BOX_WEIGHTS)
        cls, box = rpn_losses(sampled_logits, sampled_pred, targets, is_fg, valid)
        count = self.normalizers(valid.sum(dtype=torch.float32).reshape(1))[0]
        return {"loss_rpn_cls": cls / count, "loss_rpn_box": box / count}
