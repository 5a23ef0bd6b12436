"""Feature pyramid network (Lin et al. 2017), as torchvision builds it.

Shape legend: N images, L = 4 input levels C2..C5 (strides 4..32), F output channels;
outputs P2..P6 (strides 4..64).
"""

import torch
import torch.nn.functional as F
from torch import nn


class FPN(nn.Module):
    """Lateral 1x1 convs, a nearest-neighbour top-down path, 3x3 output convs, and P6 from P5
    (torchvision's LastLevelMaxPool: a 1x1 max pool with stride 2, i.e. P5[::2, ::2]).

    Module names, init and forward match torchvision's FeaturePyramidNetwork; only its
    Conv2dNormActivation wrappers are dropped (see convert_torchvision_backbone).

    Args:
        in_channels: channels of C2..C5.
        out_channels: F.
    """

    def __init__(self, in_channels: list[int], out_channels: int):
        super().__init__()
        self.inner_blocks = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.layer_blocks = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.constant_(m.bias, 0)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """[C2..C5], Ck float[N, in_channels[k-2], H_k, W_k] -> [P2..P6], Pk float[N, F, H_k, W_k]
        with P6 of size ceil(H_5 / 2) x ceil(W_5 / 2)."""
        last_inner = self.inner_blocks[-1](features[-1])
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[idx](features[idx])
            # Nearest upsampling to the lateral's size, which need not be exactly twice the
            # coarser level's (odd sizes round up on the way down).
            top_down = F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
            last_inner = lateral + top_down
            results.insert(0, self.layer_blocks[idx](last_inner))
        results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2))
        return results
