"""The optimiser and learning-rate schedule of a config.

Epochs are counted in images, as in the ancestor: an epoch is solver.images_per_epoch images
(0 = the training set's size), so a schedule means the same thing at any global batch.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from maskrcnn.config import Config


@dataclass(frozen=True)
class Schedule:
    """Step counts of a run. A step is one global batch (N x M images)."""

    global_batch: int
    images_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    base_lr: float  # base_lr_per_image x global batch
    warmup_steps: int
    warmup_start_factor: float
    decay_steps: tuple[int, ...]  # LR x 0.1 from each of these steps on

    def lr_factor(self, step: int) -> float:
        """Multiplier of base_lr at a step (0-based): linear warmup, then x0.1 per decay."""
        factor = 0.1 ** sum(step >= s for s in self.decay_steps)
        if step < self.warmup_steps:
            alpha = step / self.warmup_steps
            factor *= self.warmup_start_factor * (1 - alpha) + alpha
        return factor

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def equivalent_step(self, step: int, global_batch: int, steps_per_epoch: int) -> int:
        """This schedule's step at the point where a run with another global batch (and so
        steps_per_epoch) stood at `step`: the same epoch and, within it, as many whole global
        batches of this schedule as the images that run had seen in the epoch fill."""
        epoch, into = divmod(step, steps_per_epoch)
        return epoch * self.steps_per_epoch + min(into * global_batch // self.global_batch,
                                                  self.steps_per_epoch)


def make_schedule(config: Config, train_images: int, steps_per_epoch: int) -> Schedule:
    """The schedule of a run whose sampler gives steps_per_epoch steps per epoch."""
    solver = config.solver
    global_batch = config.run.num_gpus * config.run.images_per_gpu
    images_per_epoch = solver.images_per_epoch or train_images
    return Schedule(
        global_batch=global_batch,
        images_per_epoch=images_per_epoch,
        steps_per_epoch=steps_per_epoch,
        total_steps=solver.epochs * steps_per_epoch,
        base_lr=solver.base_lr_per_image * global_batch,
        warmup_steps=solver.warmup_steps,
        warmup_start_factor=solver.warmup_start_factor,
        decay_steps=tuple(math.ceil(e * images_per_epoch / global_batch)
                          for e in solver.lr_decay_epochs),
    )


def build_optimizer(model: nn.Module, config: Config, schedule: Schedule) -> torch.optim.SGD:
    """SGD with momentum; weight decay on weights of convs and linear layers only, not on
    norm parameters or biases (every parameter with fewer than 2 dimensions)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    solver = config.solver
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": solver.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=schedule.base_lr, momentum=solver.momentum,
    )


def build_lr_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule,
                       step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule, positioned at `step` (the next step to run) with this schedule's
    base LR, whatever the optimizer's param groups held before (e.g. from a checkpoint
    written with another global batch)."""
    for group in optimizer.param_groups:
        group["initial_lr"] = schedule.base_lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.lr_factor, last_epoch=step - 1)


def apply_gradients(parameters, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
                    grad_clip_norm: float) -> None:
    """The end of a training step, after backward: optional clipping of the (unscaled)
    gradients to a global L2 norm, the SGD step through the loss scaler, the LR step.

    With fp16, GradScaler.step reads whether gradients overflowed (one host sync per step,
    inherent to dynamic loss scaling); fp32 and bf16 never synchronise here.
    """
    if grad_clip_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    lr_scheduler.step()
