"""torchvision `maskrcnn_resnet50_fpn` checkpoints -> our MaskRCNN's state dict.

The two models have the same layers; only some names differ (torchvision wraps convs in
Conv2dNormActivation, so its keys carry extra ".0" levels, and splits the heads into a
head and a predictor). Every torchvision key has exactly one of ours:

    backbone.body.*                                 -> backbone.body.*  (BN left unfolded)
    backbone.fpn.{inner,layer}_blocks.i[.0].*       -> backbone.fpn.{inner,layer}_blocks.i.*
    rpn.head.conv[.0.0].*                           -> rpn.head.conv.*
    rpn.head.{cls_logits,bbox_pred}.*               -> rpn.head.{cls_logits,bbox_pred}.*
    roi_heads.box_head.{fc6,fc7}.*                  -> roi_heads.box_head.{fc6,fc7}.*
    roi_heads.box_predictor.{cls_score,bbox_pred}.* -> roi_heads.box_head.{cls_score,bbox_pred}.*
    roi_heads.mask_head.{i}.0.* (or mask_fcn{i+1}.*) -> roi_heads.mask_head.convs.{2i}.*
    roi_heads.mask_predictor.conv5_mask.*           -> roi_heads.mask_head.deconv.*
    roi_heads.mask_predictor.mask_fcn_logits.*      -> roi_heads.mask_head.logits.*

The bracketed/parenthesised forms are the older names of torchvision < 0.13, which the
published COCO checkpoint (maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth) still uses; both load.

Batch norms stay in torchvision's (weight, bias, running_mean, running_var) form; our
FrozenBatchNorm2d folds them when the dict is loaded. num_batches_tracked is dropped.

torchvision counts the background in num_classes: its COCO weights have 91 outputs (class
index = COCO category id, 1..90 with gaps), so they load into a model with num_classes 90.
"""

import re
from collections.abc import Sequence

import torch

from maskrcnn.model.backbone import ResNetBody, convert_torchvision_backbone
from maskrcnn.model.frozen_bn import FrozenBatchNorm2d

_LEAVES = ("weight", "bias")
_FPN_LEVELS = 4
_MASK_CONVS = 4
# Layers whose output size depends on the number of classes (torchvision's num_classes = ours
# + 1 for the background): a model with other classes starts them afresh (--init_from).
CLASS_LAYERS = ("roi_heads.box_head.cls_score.", "roi_heads.box_head.bbox_pred.",
                "roi_heads.mask_head.logits.")

# RPN and RoI heads: (pattern of a torchvision key, our key with its groups filled in).
_HEAD_RULES = (
    (re.compile(r"rpn\.head\.conv(?:\.0\.0)?\.(weight|bias)"), "rpn.head.conv.{0}"),
    (re.compile(r"rpn\.head\.(cls_logits|bbox_pred)\.(weight|bias)"), "rpn.head.{0}.{1}"),
    (re.compile(r"roi_heads\.box_head\.(fc6|fc7)\.(weight|bias)"), "roi_heads.box_head.{0}.{1}"),
    (re.compile(r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)"),
     "roi_heads.box_head.{0}.{1}"),
    (re.compile(r"roi_heads\.mask_predictor\.conv5_mask\.(weight|bias)"),
     "roi_heads.mask_head.deconv.{0}"),
    (re.compile(r"roi_heads\.mask_predictor\.mask_fcn_logits\.(weight|bias)"),
     "roi_heads.mask_head.logits.{0}"),
)
# The mask head's 3x3 convs: "i.0" (torchvision >= 0.13) or "mask_fcn{i+1}" (older).
_MASK_CONV = re.compile(r"roi_heads\.mask_head\.(?:(\d+)\.0|mask_fcn(\d+))\.(weight|bias)")


def _rename_head(key: str) -> str | None:
    """Our name for a torchvision RPN / RoI-head key, None if it is not one we know."""
    match = _MASK_CONV.fullmatch(key)
    if match is not None:
        new, old, leaf = match.groups()
        index = int(new) if new is not None else int(old) - 1
        if not 0 <= index < _MASK_CONVS:
            return None
        # Our convs are a Sequential of (conv, relu) pairs: conv i sits at position 2i.
        return f"roi_heads.mask_head.convs.{2 * index}.{leaf}"
    for pattern, template in _HEAD_RULES:
        match = pattern.fullmatch(key)
        if match is not None:
            return template.format(*match.groups())
    return None


def _expected_keys() -> tuple[set[str], set[str]]:
    """(required, optional) keys of a converted ResNet-50 FPN Mask R-CNN state dict."""
    with torch.device("meta"):  # only the names matter: no memory, no init cost
        shapes, optional = ResNetBody(50, 0)._imagenet_format()
    required = {f"backbone.body.{k}" for k in shapes}
    optional = {f"backbone.body.{k}" for k in optional}
    for blocks in ("inner_blocks", "layer_blocks"):
        required |= {f"backbone.fpn.{blocks}.{i}.{leaf}"
                     for i in range(_FPN_LEVELS) for leaf in _LEAVES}
    heads = ["rpn.head.conv", "rpn.head.cls_logits", "rpn.head.bbox_pred",
             "roi_heads.box_head.fc6", "roi_heads.box_head.fc7",
             "roi_heads.box_head.cls_score", "roi_heads.box_head.bbox_pred",
             "roi_heads.mask_head.deconv", "roi_heads.mask_head.logits",
             *(f"roi_heads.mask_head.convs.{2 * i}" for i in range(_MASK_CONVS))]
    required |= {f"{module}.{leaf}" for module in heads for leaf in _LEAVES}
    return required, optional


def convert_torchvision_maskrcnn(
        state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our MaskRCNN's state dict from a torchvision maskrcnn_resnet50_fpn one (see the module
    docstring for the mapping). Tensors are shared, not copied.

    Raises ValueError naming the key for a key we do not know, one that two torchvision
    names map onto (old and new format mixed), or a missing one.
    """
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}  # our key -> the torchvision key it came from

    def put(ours: str, theirs: str, value: torch.Tensor) -> None:
        if ours in out:
            raise ValueError(f"torchvision keys {source[ours]!r} and {theirs!r} both map to "
                             f"{ours!r}")
        out[ours], source[ours] = value, theirs

    for key, value in state_dict.items():
        if key.startswith("backbone."):
            # One key at a time, so that each of ours knows its source.
            try:
                renamed = convert_torchvision_backbone({key: value})  # {} if not body / FPN
            except ValueError:  # an FPN key of unknown form
                renamed = {}
            ours = f"backbone.{next(iter(renamed))}" if renamed else None
        else:
            ours = _rename_head(key)
        if ours is None:
            raise ValueError(f"unexpected key {key!r} in a torchvision maskrcnn_resnet50_fpn "
                             "state dict")
        put(ours, key, value)

    required, optional = _expected_keys()
    for key in out:
        if key not in required and key not in optional:
            raise ValueError(f"unexpected key {source[key]!r} in a torchvision "
                             "maskrcnn_resnet50_fpn state dict")
    for key in sorted(required - out.keys()):
        raise ValueError(f"missing key: no torchvision entry for our {key!r} in the "
                         "maskrcnn_resnet50_fpn state dict")
    return {k: v for k, v in out.items() if k not in optional}


def _converted_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """Shapes of a converted state dict as `model` expects them: each FrozenBatchNorm2d's
    (scale, bias) as torchvision's (weight, bias, running_mean, running_var)."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, FrozenBatchNorm2d):
            size = shapes.pop(f"{name}.scale")
            for leaf in ("weight", "running_mean", "running_var"):
                shapes[f"{name}.{leaf}"] = size
    return shapes


def load_torchvision_maskrcnn(model: torch.nn.Module, state_dict: dict[str, torch.Tensor],
                              classes: Sequence[int] | None = None) -> None:
    """Loads a torchvision maskrcnn_resnet50_fpn state dict into our MaskRCNN (strict).

    The model must have the same architecture: ResNet-50 with frozen batch norm, 256 FPN
    channels, box head 1024, mask head 256 channels, and num_classes = torchvision's
    num_classes - 1 (90 for its COCO weights), or len(classes) if `classes` is given (see
    `select_classes`). A key or shape that does not fit raises ValueError naming it.
    """
    converted = convert_torchvision_maskrcnn(state_dict)
    if classes is not None:
        converted = select_classes(converted, classes)
    expected = _converted_shapes(model)
    for key, value in converted.items():
        if key not in expected:
            hint = (" (torchvision's batch norms need a frozen-batch-norm body)"
                    if key.startswith("backbone.body.") else "")
            raise ValueError(f"converted key {key!r} is not in the model{hint}")
        if value.shape != expected[key]:
            hint = (" (the model's num_classes must be torchvision's minus 1)"
                    if key.startswith(CLASS_LAYERS) else "")
            raise ValueError(f"{key!r}: checkpoint shape {tuple(value.shape)}, model expects "
                             f"{tuple(expected[key])}{hint}")
    for key in sorted(expected.keys() - converted.keys()):
        raise ValueError(f"model key {key!r} has no entry in the converted state dict")
    model.load_state_dict(converted, strict=True)


def select_classes(converted: dict[str, torch.Tensor],
                   classes: Sequence[int]) -> dict[str, torch.Tensor]:
    """A converted state dict cut down to the background and `classes` (torchvision class
    indices, 1-based), in that order: class k of the result is torchvision's classes[k - 1].

    For torchvision's COCO weights, classes = the 80 used category ids in ascending order gives
    a num_classes 80 model whose classes are those of our COCO loader (category_ids[k - 1]).
    Softmax then runs over the kept classes only, so scores rise by the probability the
    dropped ones had (COCO's 10 unused ids: never a training target, so very little).
    """
    total = converted["roi_heads.box_head.cls_score.weight"].shape[0]  # K + 1
    classes = list(classes)
    if len(set(classes)) != len(classes) or not all(1 <= c < total for c in classes):
        raise ValueError(f"classes must be distinct indices in 1..{total - 1}, got {classes}")
    rows = torch.tensor([0, *classes])
    box_rows = (rows[:, None] * 4 + torch.arange(4)).flatten()  # 4 deltas per class
    out = dict(converted)
    for layer, index in (("roi_heads.box_head.cls_score", rows),
                         ("roi_heads.box_head.bbox_pred", box_rows),
                         ("roi_heads.mask_head.logits", rows)):
        for leaf in ("weight", "bias"):
            out[f"{layer}.{leaf}"] = converted[f"{layer}.{leaf}"][index]
    return out
