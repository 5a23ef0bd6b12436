"""The training step as an object built without data: model, optimizer, LR schedule, loss
scaler, precision, data-parallel wrapper and compilation, from a config, a device, a schedule
and a Runtime. The trainer (engine/trainer.py) drives it with batches from its loaders; the
benchmark and the GPU checks build the very same object on synthetic batches.

One step: the batch's images in channels_last if asked, forward under autocast, the five
losses stacked, backward (scaled for fp16), optional clipping by global norm, SGD step, LR
schedule step (engine/solver.py: apply_gradients). Losses stay on the device.
"""

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.nn.parallel import DistributedDataParallel

from maskrcnn.config import Config
from maskrcnn.config.config_pb2 import BF16, FP16
from maskrcnn.data.batch import Batch
from maskrcnn.engine import distributed
from maskrcnn.engine.solver import Schedule, apply_gradients, build_lr_scheduler, build_optimizer
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
        config: the run's config (model, solver, run.precision / channels_last / compile).
        device: where the step runs; the batch must already be there.
        schedule: the LR schedule (engine/solver.py: make_schedule).
        runtime: the device's choices and the process's rank and world size (default: the
            device's, one process). With world_size > 1 the model is wrapped in
            DistributedDataParallel (a process group must exist).

    Attributes:
        model: the MaskRCNN; forward: what the step calls (the model, or its DDP and
        compiled wrappers); optimizer, lr_scheduler, scaler, autocast_dtype, runtime.
    """

    def __init__(self, config: Config, device: torch.device, schedule: Schedule,
                 runtime: Runtime | None = None):
        self.config, self.device, self.schedule = config, device, schedule
        self.runtime = runtime = runtime or Runtime.for_device(device)
        self.model = build_model(config, runtime).to(device)
        if config.run.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if runtime.world_size > 1 and device.type == "cuda":
            # backbone.norm BATCH_NORM: statistics over the global batch, as one process would
            # compute them (SyncBatchNorm needs a GPU; on the CPU each rank uses its own).
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.optimizer = build_optimizer(self.model, config, schedule)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, schedule)
        self.autocast_dtype = autocast_dtype(config)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.run.precision == FP16)
        self.forward = self.model
        if runtime.world_size > 1:
            # Every trainable parameter gets a gradient in every step, also without ground
            # truth (tests/engine/test_distributed.py), so DDP need not look for unused ones
            # (static_graph would add nothing then, and does not suit torch.compile's
            # DDPOptimizer). Buffers (frozen BN, anchors) never change: not broadcast per step.
            with distributed.collective("DDP setup (broadcast of rank 0's parameters)"), \
                    warnings.catch_warnings():
                # torch 2.13 renamed broadcast_buffers (forward_sync_buffers), which the GPU
                # image's torch 2.11 lacks; both mean what is asked here.
                warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated")
                self.forward = DistributedDataParallel(
                    self.model, device_ids=[device.index] if device.type == "cuda" else None,
                    broadcast_buffers=False, gradient_as_bucket_view=True)
        if config.run.compile:  # after DDP, so that DDPOptimizer splits at its buckets
            self.forward = compile_step(self.forward)

    def __call__(self, batch: Batch) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype is not None), \
                distributed.collective("forward (all_reduce of the loss normalisers)"):
            losses = self.forward(*model_inputs(batch, self.config.run.channels_last))
        stacked = torch.stack([losses[k].float() for k in LOSS_KEYS])
        with distributed.collective("backward (DDP's all_reduce of the gradients)"):
            self.scaler.scale(stacked.sum()).backward()
        apply_gradients(self.model.parameters(), self.optimizer, self.scaler, self.lr_scheduler,
                        self.config.solver.grad_clip_norm)
        return stacked.detach()

    @contextmanager
    def eager(self) -> Iterator[None]:
        """Inside, the step runs the model uncompiled (FLOP counting and profiling see eager
        ops; the maths is the same)."""
        compiled, self.forward = self.forward, self.model
        try:
            yield
        finally:
            self.forward = compiled
