"""Our training and inference steps on one fixed batch.

The training step is the trainer's own `TrainStep` (engine/step.py: forward under autocast,
backward, optional clipping, SGD step, LR schedule step), built by `bench_step` with the same
constructor, so the benchmark and the GPU checks time exactly what training runs.
"""

from collections.abc import Callable

import torch

from maskrcnn.config import Config
from maskrcnn.data.batch import Batch
from maskrcnn.engine.solver import Schedule, make_schedule
from maskrcnn.engine.step import TrainStep, model_inputs
from maskrcnn.ops.paste_masks import paste_masks
from maskrcnn.runtime import Runtime


def bench_schedule(config: Config) -> Schedule:
    """The config's LR schedule, with one step counted as an epoch (there is no dataset): the
    benchmark runs within the warmup, so the LR is what a run's first steps use."""
    return make_schedule(config, config.run.num_gpus * config.run.images_per_gpu, 1)


def bench_step(config: Config, device: torch.device,
               runtime: Runtime | None = None) -> TrainStep:
    """The training step of `config` on `device` without a dataset (see bench_schedule);
    `runtime` defaults to the device's choices (tests pass the GPU's to run its code path on
    a CPU)."""
    torch.manual_seed(config.run.seed)
    return TrainStep(config, device, bench_schedule(config), runtime)


def inference_step(trainer: TrainStep, batch: Batch) -> Callable[[], dict[str, torch.Tensor]]:
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
            used = trainer.runtime.slots(out["valid"])
            out["masks"] = paste_masks(out["masks"][:, used].float(),
                                       out["boxes"][:, used].float(), h, w)
        return out

    return step
