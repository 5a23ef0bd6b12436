"""Our training and inference steps on one fixed batch.

The training step is `Trainer.train_step` itself (forward under autocast, backward, optional
clipping, SGD step, LR schedule step), so the benchmark times exactly what training runs.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from maskrcnn.config import Config
from maskrcnn.config.config_pb2 import FP16
from maskrcnn.data.batch import Batch
from maskrcnn.engine.solver import Schedule, build_lr_scheduler, build_optimizer, make_schedule
from maskrcnn.engine.trainer import Trainer, autocast_dtype, compile_step, model_inputs
from maskrcnn.model.maskrcnn import build_model
from maskrcnn.model.trim import trimming, used_slots
from maskrcnn.ops.paste_masks import paste_masks
from maskrcnn.runtime import Runtime


def bench_schedule(config: Config) -> Schedule:
    """The config's LR schedule, with one step counted as an epoch (there is no dataset): the
    benchmark runs within the warmup, so the LR is what a run's first steps use."""
    return make_schedule(config, config.run.num_gpus * config.run.images_per_gpu, 1)


class BenchTrainer(Trainer):
    """A Trainer without data: the model, optimizer, LR schedule and loss scaler that
    Trainer.__init__ builds, and nothing else (no dataset, loaders, evaluation). Only the
    inherited `train_step` is meant to be called. `runtime` defaults to the device's choices
    (tests pass the GPU's to run its code path on a CPU)."""

    def __init__(self, config: Config, device: torch.device, runtime: Runtime | None = None):
        # Trainer.__init__ (not called) reads the dataset first; the rest is the same.
        self.config = config
        self.device = device
        torch.manual_seed(config.run.seed)
        self.schedule = bench_schedule(config)
        self.runtime = runtime or Runtime.for_device(device)
        self.model = build_model(config, self.runtime).to(device)
        if config.run.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, config, self.schedule)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, self.schedule)
        self.autocast_dtype = autocast_dtype(config)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.run.precision == FP16)
        self.forward = compile_step(self.model) if config.run.compile else self.model
        self.step = 0

    @contextmanager
    def eager(self) -> Iterator[None]:
        """train_step runs the model uncompiled inside (FLOP counting and profiling see eager
        ops; the maths is the same)."""
        compiled, self.forward = self.forward, self.model
        try:
            yield
        finally:
            self.forward = compiled


def inference_step(trainer: BenchTrainer, batch: Batch) -> Callable[[], dict[str, torch.Tensor]]:
    """Our inference on the batch as a function: detections, then their masks pasted at full
    canvas resolution (torchvision's inference returns full-image masks too). Call with the
    model in eval mode."""
    h, w = batch.images.shape[-2:]

    def step() -> dict[str, torch.Tensor]:
        inputs = model_inputs(batch, trainer.config.run.channels_last)[:2]
        with torch.no_grad():
            with torch.autocast(trainer.device.type, dtype=trainer.autocast_dtype,
                                enabled=trainer.autocast_dtype is not None):
                out = trainer.forward(*inputs)
            # On a CPU, only the slots with a detection in some image (as the mask head).
            valid = out["valid"]
            d = used_slots(valid) if trimming(trainer.runtime.trim_slots) else valid.shape[1]
            out["masks"] = paste_masks(out["masks"][:, :d].float(), out["boxes"][:, :d].float(),
                                       h, w)
        return out

    return step
