"""ResNet body with frozen batch norm, and the Backbone (body + FPN) the detector runs on.

Shape legend: N images, H x W the canvas; stage k of the body (C2..C5) has stride 2**k.

Module names mirror torchvision's (`body.layer1.0.conv1`, `fpn.inner_blocks.0`), so torchvision
checkpoints map onto ours by renaming only (see `convert_torchvision_backbone`).
"""

import os
import pickle
import re
from pathlib import Path

import torch
import torchvision
from torch import nn

from maskrcnn.config.errors import ConfigError
from maskrcnn.config.validate import GN_GROUPS, RANDOM_WEIGHTS
from maskrcnn.model.fpn import FPN
from maskrcnn.model.frozen_bn import FoldedConv2d, FrozenBatchNorm2d

_RESNETS = {
    18: torchvision.models.resnet18,
    34: torchvision.models.resnet34,
    50: torchvision.models.resnet50,
    101: torchvision.models.resnet101,
}
# What a frozen stage count freezes: 1 = stem, 2 = stem + res2, ... 5 = everything.
_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
# Optional in an ImageNet checkpoint: BatchNorm2d's step counter, which the fold does not use.
_OPTIONAL_BN_KEY = "num_batches_tracked"
# torchvision's ImageNet files, ResNet{depth}_Weights.IMAGENET1K_V1 (what its detection models
# start from), by depth: the name under which torch hub caches the file downloaded from
# IMAGENET_URL + name. We never download it.
IMAGENET_FILES = {18: "resnet18-f37072fd.pth", 34: "resnet34-b627a593.pth",
                  50: "resnet50-0676ba61.pth", 101: "resnet101-63fe2227.pth"}
IMAGENET_URL = "https://download.pytorch.org/models/"


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GN_GROUPS, channels)


# Normalisation layers by name (model.backbone.norm in lower case).
NORMS = {"frozen_bn": FrozenBatchNorm2d, "group_norm": _group_norm, "batch_norm": nn.BatchNorm2d}


class ResNetBody(nn.Module):
    """torchvision's ResNet without avgpool and fc, batch norm frozen (or group norm).

    Args:
        depth: 18, 34, 50 or 101.
        frozen_stages: 0 = none, 1 = stem (conv1, bn1), 2 = stem + layer1 (res2), ... 5 = all;
            frozen parameters get requires_grad False.
        norm: "frozen_bn" (FrozenBatchNorm2d, for ImageNet weights), or for training from
            scratch (frozen batch norm at its initial identity leaves a deep body
            unnormalised) "group_norm" (trained GroupNorm, independent of the batch) or
            "batch_norm" (trained BatchNorm2d with batch statistics).
        fold_frozen_bn: with "frozen_bn", run each conv and its norm as one FoldedConv2d (the
            same maths with other float rounding; the parity test with torchvision, whose
            scores are sensitive at that level, turns it off; tests/model/test_backbone.py
            compares the two).

    Attributes:
        depth: as given (read_imagenet checks a file against it).
        out_channels: channels of C2..C5.
    """

    def __init__(self, depth: int, frozen_stages: int, norm: str = "frozen_bn",
                 fold_frozen_bn: bool = True):
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(f"ResNet depth must be one of {sorted(_RESNETS)}, got {depth}")
        if not 0 <= frozen_stages <= len(_STAGES):
            raise ValueError(f"frozen_stages must be in 0..{len(_STAGES)}, got {frozen_stages}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
        self.depth = depth
        scratch = norm != "frozen_bn"
        # From scratch, each residual block's last norm starts at zero so every block starts as
        # the identity (Goyal et al. 2017): a deep random body then trains stably at high LR.
        resnet = _RESNETS[depth](weights=None, norm_layer=NORMS[norm], zero_init_residual=scratch)
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        width = 1 if depth < 50 else 4  # BasicBlock vs Bottleneck expansion
        self.out_channels = [64 * width, 128 * width, 256 * width, 512 * width]
        for stage in _STAGES[:frozen_stages]:
            for name in stage:
                for p in getattr(self, name).parameters():
                    p.requires_grad_(False)
        if norm == "frozen_bn" and fold_frozen_bn:
            for parent, conv, bn in self._conv_norm_pairs():
                setattr(parent, conv, FoldedConv2d(getattr(parent, conv), getattr(parent, bn)))

    def _conv_norm_pairs(self) -> list[tuple[nn.Module, str, str]]:
        """(parent, conv name, norm name) of every conv followed by a norm: the stem, each
        block's convs (2 in a BasicBlock, 3 in a Bottleneck) and its downsample."""
        pairs = [(self, "conv1", "bn1")]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3)
                          if hasattr(block, f"conv{i}")]
                if block.downsample is not None:
                    pairs.append((block.downsample, "0", "1"))
        return pairs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """float[N, 3, H, W] -> [C2, C3, C4, C5], Ck float[N, out_channels[k-2], H/2**k, W/2**k]
        (sizes rounded up)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]

    def _imagenet_format(self) -> tuple[dict[str, torch.Size], set[str]]:
        """(key -> shape, optional keys) of a torchvision ImageNet state dict for this body, fc
        excluded: batch norms as (weight, bias, running_mean, running_var), not our folded
        (scale, bias), plus their optional num_batches_tracked."""
        shapes, optional = {}, set()
        for name, module in self.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(module, FrozenBatchNorm2d):
                for key in ("weight", "bias", "running_mean", "running_var"):
                    shapes[prefix + key] = module.scale.shape
                optional.add(prefix + _OPTIONAL_BN_KEY)
            else:
                for key, t in module.named_parameters(recurse=False):
                    shapes[prefix + key] = t.shape
        return shapes, optional


def read_imagenet(path: str, depth: int) -> dict[str, torch.Tensor]:
    """The state dict of a torchvision ImageNet checkpoint for a frozen-BN ResNet body of this
    depth (saved with torch.save), fc.* left out, checked against the body.

    A missing, unreadable or corrupt file, a missing or unexpected key or a shape that does
    not fit raises ConfigError, one line naming the file and the first mismatch (key and both
    shapes).
    """
    if not os.path.isfile(path):
        hint = (f" (for random weights write exactly {RANDOM_WEIGHTS!r})"
                if path.strip().lower() in (RANDOM_WEIGHTS, "none", "scratch") else "")
        raise ConfigError(f"backbone weights {path}: no such file{hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
        raise ConfigError(f"backbone weights {path}: not a torch state dict file "
                          f"({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"backbone weights {path}: expected a state dict, got "
                          f"{type(state).__name__}")
    with torch.device("meta"):  # only the names and shapes matter: no memory, no init cost
        shapes, optional = ResNetBody(depth, 0)._imagenet_format()
    which = f"torchvision's ResNet-{depth} file is {IMAGENET_FILES[depth]}"
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    for key, value in state.items():
        if key in optional:
            continue
        if key not in shapes:
            raise ConfigError(f"backbone weights {path}: unexpected key {key!r} for a "
                              f"ResNet-{depth} body ({which})")
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"backbone weights {path}: key {key!r} is a "
                              f"{type(value).__name__}, not a tensor")
        if value.shape != shapes[key]:
            raise ConfigError(f"backbone weights {path}: key {key!r} has shape "
                              f"{tuple(value.shape)}, a ResNet-{depth} body expects "
                              f"{tuple(shapes[key])} ({which})")
    for key in shapes:
        if key not in state:
            raise ConfigError(f"backbone weights {path}: missing key {key!r} of a "
                              f"ResNet-{depth} body ({which})")
    return state


def cached_imagenet(depth: int, hub_dir: Path) -> Path | None:
    """torchvision's ImageNet file for this depth where torch hub keeps its downloads
    (hub_dir/checkpoints, e.g. torch.hub.get_dir()), or None: IMAGENET_FILES' name first,
    else the first other resnet{depth}-*.pth (e.g. IMAGENET1K_V2's) in name order."""
    folder = Path(hub_dir) / "checkpoints"
    preferred = folder / IMAGENET_FILES[depth]
    if preferred.is_file():
        return preferred
    return next((p for p in sorted(folder.glob(f"resnet{depth}-*.pth")) if p.is_file()), None)


def missing_imagenet_message(depth: int, hub_dir: Path) -> str:
    """The one line that says why a frozen-BN body needs ImageNet weights and how to get
    them (or ask for random weights)."""
    name = IMAGENET_FILES[depth]
    return (f"model.backbone.weights_path is empty: a frozen-batch-norm ResNet-{depth} from "
            "random weights cannot reach the recipe's AP. Pass --backbone_weights=PATH to "
            f"torchvision's ResNet{depth}_Weights.IMAGENET1K_V1 file {name} ({IMAGENET_URL}"
            f"{name}; nothing is downloaded: fetch it yourself, or put it in "
            f"{Path(hub_dir) / 'checkpoints'} where torchvision caches it), or "
            f"--backbone_weights={RANDOM_WEIGHTS} to train from random weights anyway")


class Backbone(nn.Module):
    """ResNet body + FPN: normalised images -> P2..P6.

    Args:
        depth: ResNet depth, 18, 34, 50 or 101.
        frozen_stages: see ResNetBody.
        fpn_channels: channels of every FPN level.
        norm, fold_frozen_bn: see ResNetBody.

    Weights are random; a new training run loads ImageNet ones into body (read_imagenet).

    Attributes:
        strides: strides of P2..P6.
        out_channels: fpn_channels.
    """

    def __init__(self, depth: int, frozen_stages: int, fpn_channels: int,
                 norm: str = "frozen_bn", fold_frozen_bn: bool = True):
        super().__init__()
        self.body = ResNetBody(depth, frozen_stages, norm, fold_frozen_bn)
        self.fpn = FPN(self.body.out_channels, fpn_channels)
        self.strides = [4, 8, 16, 32, 64]
        self.out_channels = fpn_channels

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """float[N, 3, H, W] normalised images -> [P2, P3, P4, P5, P6], Pk
        float[N, fpn_channels, H/2**k, W/2**k] (sizes rounded up)."""
        return self.fpn(self.body(images))


# torchvision >= 0.13 wraps each FPN conv in Conv2dNormActivation ("inner_blocks.0.0.weight");
# older versions, and the published COCO checkpoints, have the bare conv ("inner_blocks.0.weight").
_TV_FPN_KEY = re.compile(r"(inner_blocks|layer_blocks)\.(\d+)\.(?:0\.)?(weight|bias)")


def convert_torchvision_backbone(tv_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our Backbone's state dict entries from a torchvision maskrcnn_resnet50_fpn state dict.

    backbone.body.X -> body.X (batch norms stay in torchvision's weight, bias, running_mean,
    running_var form: FrozenBatchNorm2d folds them on load); backbone.fpn.{inner,layer}_blocks.
    i[.0].{weight,bias} -> fpn.{inner,layer}_blocks.i.{weight,bias}; all other keys (RPN, RoI
    heads) are left out. Load the result with load_state_dict(strict=True).
    """
    out = {}
    for key, value in tv_state.items():
        if key.startswith("backbone.body."):
            out["body." + key.removeprefix("backbone.body.")] = value
        elif key.startswith("backbone.fpn."):
            match = _TV_FPN_KEY.fullmatch(key.removeprefix("backbone.fpn."))
            if match is None:
                raise ValueError(f"unknown torchvision FPN key {key!r}")
            blocks, level, leaf = match.groups()
            out[f"fpn.{blocks}.{level}.{leaf}"] = value
    return out
