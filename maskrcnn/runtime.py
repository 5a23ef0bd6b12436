"""Choices that depend on where the model runs, made once at start-up and passed to the
builders (no module-level switches).

A CPU and a GPU run the same model with two differences of method, never of maths:
- trim_slots: on a CPU, host reads are free, so the forward skips the padded slots that no image
  of the batch uses (model/trim.py); a GPU keeps every static size.
- nms: how `batched_nms_fixed` runs (ops/nms.py): torchvision's C++ kernel per cell on a CPU,
  the Triton kernel (or its PyTorch reference) with no host synchronisation on a GPU.
It also holds the process's rank and world size, from which `build_model` chooses how the
model draws sampling keys and normalises its losses.
Tests run the GPU's code path on the CPU by building with `Runtime.gpu_path()`.
"""

import dataclasses

import torch

from maskrcnn.ops.nms import METHODS, default_method


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How the model computes on its device.

    Attributes:
        trim_slots: skip padded slots where reading a count on the host is free (CPU).
        nms: the NMS method, one of ops.nms.METHODS.
        fold_frozen_bn: run each conv and its frozen batch norm as one conv (the same maths
            with other float rounding; the parity test with torchvision turns it off).
        rank, world_size: this process in data-parallel training. With world_size > 1 the
            model draws its sampling keys as rows of the global batch and sums its loss
            normalisers over the ranks (model/sampling.py, engine/distributed.py).
    """

    trim_slots: bool
    nms: str
    fold_frozen_bn: bool = True
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if self.nms not in METHODS:
            raise ValueError(f"unknown NMS method {self.nms!r}; expected one of "
                             f"{', '.join(METHODS)}")

    @classmethod
    def for_device(cls, device: torch.device | str, rank: int = 0,
                   world_size: int = 1) -> "Runtime":
        """The fastest choices on `device`, for process `rank` of `world_size`."""
        device = torch.device(device)
        return cls(trim_slots=device.type == "cpu", nms=default_method(device), rank=rank,
                   world_size=world_size)

    @classmethod
    def gpu_path(cls, nms: str = "torch") -> "Runtime":
        """A GPU's choices on any device: static sizes, NMS without host synchronisation
        ("torch", or "triton", which a CPU runs under TRITON_INTERPRET=1)."""
        return cls(trim_slots=False, nms=nms)

    def replace(self, **changes) -> "Runtime":
        return dataclasses.replace(self, **changes)
