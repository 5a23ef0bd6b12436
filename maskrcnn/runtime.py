"""Choices that depend on where the model runs, made once at start-up and passed to the
builders (no module-level switches).

A CPU and a GPU run the same model with these differences of method, never of maths:
- trim_slots: on a CPU, host reads are free, so the forward skips the padded slots that no image
  of the batch uses (model/trim.py); a GPU keeps every static size.
- nms: how `batched_nms_fixed` runs (ops/nms.py): torchvision's C++ kernel per cell on a CPU,
  the Triton kernel (or its PyTorch reference) with no host synchronisation on a GPU.
- roi_align: how ROIAlign runs (ops/roi_align.py): the embedding_bag gather on a CPU, the
  Triton kernels (channels-last reads, atomic backward) on a GPU where Triton is installed.
- match: how the RPN matches anchors to ground truth (model/sampling.py): in tiles of
  PyTorch ops on a CPU, the Triton kernels (no IoU matrix at all) on a GPU with Triton.
- cuda_graph: whether the training step is replayed as one CUDA graph (engine/graph.py).
The config chooses each op's kernel (run.kernels: AUTO, TORCH or TRITON) and the graph
(run.cuda_graph); `Runtime.for_config` resolves them for the device, and `describe` says in one
line what each op runs. It also holds the process's rank and world size, from which
`build_model` chooses how the model draws sampling keys and normalises its losses.
Tests run the GPU's code path on the CPU by building with `Runtime.gpu_path()`.
"""

import dataclasses
import os

import torch

from maskrcnn.config import Config, ConfigError, config_pb2
from maskrcnn.model.sampling import MATCH_METHODS
from maskrcnn.ops.nms import METHODS, default_method
from maskrcnn.ops.roi_align import ROI_ALIGN_METHODS

# The ops whose kernel the config chooses (run.kernels), in the order the log lists them.
KERNEL_OPS = ("nms", "roi_align", "match")


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
        cuda_graph: replay the training step as a CUDA graph (only ever true on a GPU).
    """

    trim_slots: bool
    nms: str
    roi_align: str = "gather"
    match: str = "tiled"
    fold_frozen_bn: bool = True
    rank: int = 0
    world_size: int = 1
    cuda_graph: bool = False

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
    def for_device(cls, device: torch.device | str, rank: int = 0, world_size: int = 1,
                   kernels: config_pb2.KernelsConfig | None = None,
                   cuda_graph: bool = False) -> "Runtime":
        """The choices on `device` for process `rank` of `world_size`: each op's kernel as
        `kernels` (run.kernels) asks, AUTO being the device's fastest; the CUDA graph if asked
        and the device is a GPU. Raises ConfigError for TRITON where Triton cannot run."""
        device = torch.device(device)
        kernels = kernels or config_pb2.KernelsConfig()
        gpu = device.type == "cuda"
        triton = _triton_runs(device)
        methods = {}
        for op in KERNEL_OPS:
            choice = getattr(kernels, op)
            if choice == config_pb2.TRITON and not triton:
                raise ConfigError(f"run.kernels.{op}: TRITON needs a CUDA GPU with Triton "
                                  f"installed; this run is on {device}"
                                  + ("" if gpu else " (use AUTO or TORCH)"))
            use_triton = choice == config_pb2.TRITON or (choice == config_pb2.AUTO and gpu
                                                         and triton)
            methods[op] = "triton" if use_triton else _torch_method(op, device)
        return cls(trim_slots=not gpu, rank=rank, world_size=world_size,
                   cuda_graph=cuda_graph and gpu, **methods)

    @classmethod
    def for_config(cls, config: Config, device: torch.device | str, rank: int = 0,
                   world_size: int = 1) -> "Runtime":
        """The choices `config` (run.kernels, run.cuda_graph) makes on `device`."""
        return cls.for_device(device, rank, world_size, config.run.kernels,
                              config.run.cuda_graph)

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

    def torch_method(self, op: str) -> str:
        """The PyTorch method of `op` (one of KERNEL_OPS) on this runtime's kind of device:
        what a Triton kernel that fails falls back to."""
        return _torch_method(op, torch.device("cpu" if self.trim_slots else "cuda"))

    def describe(self) -> str:
        """One line: what each op runs, and whether the step is a CUDA graph."""
        return (", ".join(f"{op} {getattr(self, op)}" for op in KERNEL_OPS)
                + f", cuda graph {'on' if self.cuda_graph else 'off'}")


def _torch_method(op: str, device: torch.device) -> str:
    """Each op's PyTorch path on `device`: NMS per image and level with torchvision on a CPU
    (host reads are free there), the static loop without host synchronisation on a GPU."""
    if op == "nms":
        return "per_cell" if device.type == "cpu" else "torch"
    return {"roi_align": "gather", "match": "tiled"}[op]


def _triton_runs(device: torch.device) -> bool:
    """Whether our Triton kernels can run on `device`: a GPU with Triton installed, or any
    device under Triton's interpreter (TRITON_INTERPRET=1, tests only)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return device.type == "cuda" and default_method(device) == "triton"


def resolve_device(name: str) -> torch.device:
    """'auto' is the GPU when there is one, else the CPU.

    On a GPU this also turns on cuDNN's autotuning (torch.backends.cudnn.benchmark): every
    batch has one of the config's few canvas shapes, so each convolution's tuned algorithm is
    chosen once and reused.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device
