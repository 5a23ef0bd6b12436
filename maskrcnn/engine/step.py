"""The training step as an object built without data: model, optimizer, LR schedule, loss
scaler, precision, data-parallel wrapper, compilation and CUDA graphs, from a config, a device,
a schedule and a Runtime. The trainer (engine/trainer.py) drives it with batches from its
loaders; the benchmark and the GPU checks build the very same object on synthetic batches.

One step (`step_function`): forward under autocast, the five losses stacked, backward
(scaled for fp16), optional clipping by global norm, the SGD update with the LR read from a
device tensor, the gradients zeroed in place, the LR's step counter advanced (engine/solver.py:
apply_gradients). Losses stay on the device. With fp32 or bf16 nothing in it reads the host,
so the whole function traces with torch.compile(fullgraph=True) and records as one CUDA
graph (run.cuda_graph, engine/graph.py); the eager call stays the fallback and the
reference. fp16's loss scaler reads its overflow flag on the host each step: fp16 runs eager.
"""

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel

from maskrcnn.config import Config
from maskrcnn.config.config_pb2 import BF16, FP16
from maskrcnn.data.batch import Batch
from maskrcnn.engine import distributed
from maskrcnn.engine.graph import WARMUP_STEPS, WARMUP_STEPS_DDP, GraphedStep, side_stream
from maskrcnn.engine.solver import Schedule, apply_gradients, build_optimizer
from maskrcnn.model.maskrcnn import MaskRCNN, build_model
from maskrcnn.runtime import Runtime

LOSS_KEYS = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask")


def compile_step(forward: torch.nn.Module, backend: str | Callable = "inductor") -> torch.nn.Module:
    """torch.compile of the model's forward (losses included; AOTAutograd compiles the
    backward), with static shapes (dynamic=False): every batch has one of the config's few
    canvases, so each canvas gets its own graph, compiled once, and none is traced with
    symbolic sizes (tests/engine/test_compile_step.py). Random ops (the sampling keys) run as
    eager ATen ops rather than inside generated kernels (inductor's fallback_random): the
    compiled step then draws the same keys as the eager one, and Triton 3.6 on an H200 failed
    to compile the fused kernel that generated the keys inside a reduction (PassManager::run
    failed, torch 2.11, 2026-11-26). `backend` is for tests."""
    import torch._inductor.config  # noqa: PLC0415 (loaded with the compiler, only when used)

    torch._inductor.config.fallback_random = True
    return torch.compile(forward, backend=backend, dynamic=False)


def autocast_dtype(config: Config) -> torch.dtype | None:
    return {BF16: torch.bfloat16, FP16: torch.float16}.get(config.run.precision)


def unwrap(model: torch.nn.Module) -> MaskRCNN:
    """The MaskRCNN inside torch.compile / DistributedDataParallel wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            return model
        model = inner


def model_inputs(batch: Batch, channels_last: bool) -> tuple[torch.Tensor, ...]:
    images = batch.images
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return (images, batch.image_sizes, batch.gt_boxes, batch.gt_classes, batch.gt_valid,
            batch.gt_masks)


class TrainStep:
    """One optimisation step and what it needs; `step(batch)` returns the five losses
    float32[5] (in LOSS_KEYS order, on the device).

    Args:
        config: the run's config (model, solver, run.precision / channels_last / compile /
            cuda_graph).
        device: where the step runs; the batch must already be there (see `to_device`).
        schedule: the LR schedule (engine/solver.py: make_schedule).
        runtime: the device's choices (each op's method, the CUDA graph) and the process's
            rank and world size (default: the config's on the device, one process). With
            world_size > 1 the model is wrapped in DistributedDataParallel (a process group
            must exist).
        log: prints the line of a CUDA-graph capture that failed (the step then runs eager).

    Attributes:
        model: the MaskRCNN; forward: what the step calls (the model, or its DDP and
        compiled wrappers); optimizer (its LR: `lr`), scaler, autocast_dtype, runtime;
        graphed: the CUDA-graph replayer (engine/graph.py), or None for eager steps.
    """

    def __init__(self, config: Config, device: torch.device, schedule: Schedule,
                 runtime: Runtime | None = None, log: Callable[[str], None] = print):
        self.config, self.device, self.schedule = config, device, schedule
        self.runtime = runtime = runtime or Runtime.for_config(config, device)
        self.model = build_model(config, runtime).to(device)
        if config.run.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if runtime.world_size > 1 and device.type == "cuda":
            # backbone.norm BATCH_NORM: statistics over the global batch, as one process would
            # compute them (SyncBatchNorm needs a GPU; on the CPU each rank uses its own).
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, config, schedule, device)
        self.lr = self.optimizer.lr
        self.autocast_dtype = autocast_dtype(config)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.run.precision == FP16)
        # What the step scales its loss with: the scaler for fp16 only (Dynamo does not trace
        # GradScaler, not even a disabled one).
        self._loss_scaler = self.scaler if self.scaler.is_enabled() else None
        graphed = runtime.cuda_graph
        self.forward = self.model
        if runtime.world_size > 1:
            # Every trainable parameter gets a gradient in every step, also without ground
            # truth (tests/engine/test_distributed.py), so DDP need not look for unused ones
            # (static_graph would add nothing then, and does not suit torch.compile's
            # DDPOptimizer). Buffers (frozen BN, anchors) never change: not broadcast per step.
            # A DDP whose backward is captured must be built on a side stream (PyTorch's notes).
            with distributed.collective("DDP setup (broadcast of rank 0's parameters)"), \
                    warnings.catch_warnings(), side_stream(device) if graphed else nullcontext():
                # torch 2.13 renamed broadcast_buffers (forward_sync_buffers), which the GPU
                # image's torch 2.11 lacks; both mean what is asked here.
                warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated")
                self.forward = DistributedDataParallel(
                    self.model, device_ids=[device.index] if device.type == "cuda" else None,
                    broadcast_buffers=False, gradient_as_bucket_view=True)
        if config.run.compile:  # after DDP, so that DDPOptimizer splits at its buckets
            self.forward = compile_step(self.forward)
        self.graphed = (GraphedStep(self.step_function, device, WARMUP_STEPS_DDP
                                    if runtime.world_size > 1 else WARMUP_STEPS, log=log,
                                    agree=self._any_rank_failed)
                        if graphed else None)
        self._copy_stream = None  # created on the first GPU batch (to_device)

    def _any_rank_failed(self, failed: bool) -> bool:
        """Whether a CUDA-graph capture failed on any rank (one all_reduce per capture)."""
        flag = torch.tensor([int(failed)], device=self.device)
        distributed.all_reduce_(flag, torch.distributed.ReduceOp.MAX,
                                "all_reduce of the CUDA-graph capture's outcome")
        return bool(flag.item())  # a host read once per captured canvas, outside any graph

    def step_function(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The whole step on the model's inputs (see model_inputs): forward, backward,
        clipping, SGD update, LR step. Returns the losses float32[5]."""
        # No autocast weight cache in a graphed step (PyTorch's CUDA-graph notes ask for it
        # off: cached casts are tensors that outlive the ops that made them).
        with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype is not None,
                            cache_enabled=self.graphed is None):
            losses = self.forward(*inputs)
        stacked = torch.stack([losses[k].float() for k in LOSS_KEYS])
        scaler = self._loss_scaler
        total = stacked.sum()
        (total if scaler is None else scaler.scale(total)).backward()
        apply_gradients(self.parameters, self.optimizer, scaler,
                        self.config.solver.grad_clip_norm)
        return stacked.detach()

    def __call__(self, batch: Batch) -> torch.Tensor:
        inputs = model_inputs(batch, self.config.run.channels_last)
        with distributed.collective("training step (all_reduce of the loss normalisers, "
                                    "DDP's of the gradients)"):
            if self.graphed is not None:
                return self.graphed(*inputs)
            return self.step_function(*inputs)

    def to_device(self, batch: Batch) -> Batch:
        """The batch on the step's device. On a GPU the copy runs on a side stream: it
        overlaps the previous step, which the GPU may still be running (its launch, or its
        graph's replay, returned at once), and the current stream waits for it."""
        if self.device.type != "cuda":
            return batch.to(self.device)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        # The copy's memory comes from the copy stream's own blocks, so it cannot overwrite
        # what the running step reads; record_stream keeps it until this stream is done.
        with torch.cuda.stream(self._copy_stream):
            moved = batch.to(self.device)
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self._copy_stream)
        moved.record_stream(current)
        return moved

    @contextmanager
    def eager(self) -> Iterator[None]:
        """Inside, the step runs the model uncompiled and ungraphed (FLOP counting and
        profiling see eager ops; the maths is the same)."""
        compiled, graphed = self.forward, self.graphed
        self.forward, self.graphed = self.model, None
        try:
            yield
        finally:
            self.forward, self.graphed = compiled, graphed
