"""Choices that depend on where the model runs, made once at start-up and passed to the
modules (no module-level switches, and no "auto" below this point: each module receives the
Runtime, or the one method it runs, chosen here).

A CPU and a GPU run the same model with these differences of method, never of maths:
- trim_slots: on a CPU, host reads are free, so the forward skips the padded slots that no image
  of the batch uses (`Runtime.slots`); a GPU keeps every static size.
- nms: how `batched_nms_fixed` runs (ops/nms.py): torchvision's C++ kernel per cell on a CPU,
  the Triton kernel (or its PyTorch reference) with no host synchronisation on a GPU.
- roi_align: how ROIAlign runs (ops/roi_align.py): the embedding_bag gather on a CPU, the
  Triton kernels (channels-last reads, atomic backward) on a GPU where Triton is installed.
- match: how the RPN matches anchors to ground truth (model/sampling.py): in tiles of
  PyTorch ops on a CPU, the Triton kernels (no IoU matrix at all) on a GPU with Triton.
- cuda_graph: whether the training step is replayed as one CUDA graph (engine/graph.py).
The config chooses each op's kernel (run.kernels: AUTO, TORCH or TRITON) and the graph
(run.cuda_graph); `Runtime.for_config` resolves them for the device, and `describe` says in one
line what each op runs. The methods' names are checked here, once (the ops take the name they
are given). The Runtime also holds the process's rank and world size, from which `build_model`
chooses how the model draws sampling keys and normalises its losses.
Tests run the GPU's code path on the CPU by building with `Runtime.gpu_path()`.

Trimming. The model pads per-image sets to static sizes (ground-truth slots G, RoIs R, mask
slots F) so that a GPU step has one shape and no host synchronisation. On a CPU there is no
queue of device work that a host read would drain, so the forward cuts those sets to the slots
that are used in some image of the batch: ground-truth slots in anchor matching, RoI slots
(fewer candidates than RoIs per image, as with a random-weight RPN) in training, detection
slots in the mask head at inference; and the mask head in training runs on the foreground
slots only, gathered across the images. Padded slots are invalid (ground truth, detections) or
background (mask slots), so they add 0 to every loss and gradient and get zero masks: the maths
is the same either way (tests run both). A compiled step keeps the static sizes on any device.
"""

import dataclasses
import importlib.util
import os

import torch

from maskrcnn.config import Config, ConfigError, config_pb2

# The methods of each op whose kernel the config chooses; the module of each says how they
# compute the same result.
NMS_METHODS = ("triton", "torch", "per_cell", "shifted")  # ops/nms.py: batched_nms_fixed
ROI_ALIGN_METHODS = ("gather", "triton")  # ops/roi_align.py: multilevel_roi_align
MATCH_METHODS = ("tiled", "triton")  # model/sampling.py: match
# Each op's name in messages, and its methods.
_METHODS = {"nms": ("NMS", NMS_METHODS), "roi_align": ("ROIAlign", ROI_ALIGN_METHODS),
            "match": ("matching", MATCH_METHODS)}
# The ops whose kernel the config chooses (run.kernels), in the order the log lists them.
KERNEL_OPS = ("nms", "roi_align", "match")


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How the model computes on its device.

    Attributes:
        trim_slots: skip padded slots where reading a count on the host is free (CPU).
        nms: the NMS method, one of NMS_METHODS.
        roi_align: the ROIAlign method, one of ROI_ALIGN_METHODS.
        match: the RPN's anchor-matching method, one of MATCH_METHODS.
        fold_frozen_bn: run each conv and its frozen batch norm as one conv (the same maths
            with other float rounding; the parity test with torchvision turns it off).
        rank, world_size: this process in data-parallel training. With world_size > 1 the
            model draws its sampling keys as rows of the global batch and sums its loss
            normalisers over the ranks (model/sampling.py).
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
        for op in KERNEL_OPS:  # the one check of the methods' names
            name, methods = _METHODS[op]
            if getattr(self, op) not in methods:
                raise ValueError(f"unknown {name} method {getattr(self, op)!r}; expected one "
                                 f"of {', '.join(methods)}")

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

    def slots(self, used: torch.Tensor) -> slice | torch.Tensor:
        """The slots of a padded set that the forward computes (see Trimming, above), as an
        index of the set's slot dimension: `x[:, index]` for a per-image set, `x[index]` for a
        set flattened over the images.

        Args:
            used: bool[N, S] the slots each image uses, or bool[S] those of a flattened set.

        Returns:
            slice(None), every slot, where sizes stay static (no trimming, or while torch.compile
            traces). Trimming, with a host read: for bool[N, S] the slots up to the last one any
            image uses, slice(0, U); for bool[S] the used slots, int64[U]. U >= 1, so no set is
            empty: where none is used, slot 0 (a flattened set's is then of weight 0, so that the
            heads still run and every parameter gets a gradient).
        """
        if not self.trim_slots or torch.compiler.is_compiling():
            return slice(None)
        if used.dim() == 1:
            index = used.nonzero().squeeze(1)  # a host read: only trim_slots (a CPU) gets here
            return index if index.numel() else torch.zeros(1, dtype=torch.int64,
                                                           device=used.device)
        position = torch.arange(1, used.shape[1] + 1, device=used.device)
        return slice(0, max(1, int((used.any(0) * position).max())) if used.shape[1] else 1)

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
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def resolve_device(name: str) -> torch.device:
    """The device a --device flag names: cpu, cuda, cuda:K, or auto (the GPU when there is one,
    else the CPU). Raises ConfigError, naming the flag, for anything else or a GPU that is not
    there.

    On a GPU this also turns on cuDNN's autotuning (torch.backends.cudnn.benchmark): every
    batch has one of the config's few canvas shapes, so each convolution's tuned algorithm is
    chosen once and reused.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device={name}: must be cpu, cuda, cuda:K or auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device={name}: no CUDA device is available")
        torch.backends.cudnn.benchmark = True
    return device
