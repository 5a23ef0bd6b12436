"""Choices that depend on where the model runs, made once at start-up and passed to the
builders (no module-level switches).

A CPU and a GPU run the same model with two differences of method, never of maths:
- trim_slots: on a CPU, host reads are free, so the forward skips the padded slots that no image
  of the batch uses (model/trim.py); a GPU keeps every static size.
- nms: how `batched_nms_fixed` runs (ops/nms.py): torchvision's C++ kernel per cell on a CPU,
  the Triton kernel (or its PyTorch reference) with no host synchronisation on a GPU.
- roi_align: how ROIAlign runs (ops/roi_align.py): the embedding_bag gather on a CPU, the
  Triton kernels (channels-last reads, atomic backward) on a GPU where Triton is installed.
- match: how the RPN matches anchors to ground truth (model/sampling.py): in tiles of
  PyTorch ops on a CPU, the Triton kernels (no IoU matrix at all) on a GPU with Triton.
It also holds the process's rank and world size, from which `build_model` chooses how the
model draws sampling keys and normalises its losses.
Tests run the GPU's code path on the CPU by building with `Runtime.gpu_path()`.
"""

import dataclasses

import torch

from maskrcnn.model.sampling import MATCH_METHODS
from maskrcnn.ops.nms import METHODS, default_method
from maskrcnn.ops.roi_align import ROI_ALIGN_METHODS


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How the model computes on its device.

    Attributes:
        trim_slots: skip padded slots where reading a count on the host is free (CPU).
        nms: the NMS method, one of ops.nms.METHODS.
        roi_align: the ROIAlign method, one of ops.roi_align.ROI_ALIGN_METHODS.
        match: the RPN's anchor-matching method, one of model.sampling.MATCH_METHODS.
        fold_frozen_bn: run each conv and its frozen batch norm as one conv (the same maths
            with other float rounding; the parity test with torchvision turns it off).
        rank, world_size: this process in data-parallel training. With world_size > 1 the
            model draws its sampling keys as rows of the global batch and sums its loss
            normalisers over the ranks (model/sampling.py, engine/distributed.py).
    """

    trim_slots: bool
    nms: str
    roi_align: str = "gather"
    match: str = "tiled"
    fold_frozen_bn: bool = True
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if self.nms not in METHODS:
            raise ValueError(f"unknown NMS method {self.nms!r}; expected one of "
                             f"{', '.join(METHODS)}")
        if self.match not in MATCH_METHODS:
            raise ValueError(f"unknown matching method {self.match!r}; expected one of "
                             f"{', '.join(MATCH_METHODS)}")
        if self.roi_align not in ROI_ALIGN_METHODS:
            raise ValueError(f"unknown ROIAlign method {self.roi_align!r}; expected one of "
                             f"{', '.join(ROI_ALIGN_METHODS)}")

    @classmethod
    def for_device(cls, device: torch.device | str, rank: int = 0,
                   world_size: int = 1) -> "Runtime":
        """The fastest choices on `device`, for process `rank` of `world_size`."""
        device = torch.device(device)
        nms = default_method(device)
        triton = nms == "triton"  # a GPU with Triton installed
        return cls(trim_slots=device.type == "cpu", nms=nms,
                   roi_align="triton" if triton else "gather",
                   match="triton" if triton else "tiled", rank=rank, world_size=world_size)

    @classmethod
    def gpu_path(cls, nms: str = "torch", roi_align: str = "gather",
                 match: str = "tiled") -> "Runtime":
        """A GPU's choices on any device: static sizes, NMS without host synchronisation
        ("torch", or "triton", which a CPU runs under TRITON_INTERPRET=1), ROIAlign and
        anchor matching by `roi_align` and `match` ("triton" is slow interpreted: tests pass
        it at tiny sizes)."""
        return cls(trim_slots=False, nms=nms, roi_align=roi_align, match=match)

    def replace(self, **changes) -> "Runtime":
        return dataclasses.replace(self, **changes)
