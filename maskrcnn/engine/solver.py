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


class LearningRate:
    """The schedule's LR as a device tensor, computed on the device from a step counter there.

    A CUDA graph records tensors, not Python floats: an LR passed as a float would be frozen
    at its value on the captured step. Here the counter and the LR are device tensors that the
    step itself reads and advances (`value`, `advance`), so an eager, a compiled and a replayed
    step all follow the schedule. `value` gives exactly base_lr x Schedule.lr_factor(step)
    in float64 (tests/engine/test_solver.py): the decay factors 0.1^k are computed in Python
    and looked up, and the warmup does Python's float64 operations in the same order.

    Attributes:
        step: int64[] on the device, the next step to run (0-based).
    """

    def __init__(self, schedule: Schedule, device: torch.device, step: int = 0):
        self.schedule = schedule
        self.step = torch.tensor(step, dtype=torch.int64, device=device)
        self._decay_steps = torch.tensor(schedule.decay_steps, dtype=torch.int64, device=device)
        # 0.1 ** k for k decays passed, as Schedule.lr_factor computes it.
        self._decay_factors = torch.tensor([0.1 ** k for k in range(len(schedule.decay_steps)
                                                                     + 1)],
                                           dtype=torch.float64, device=device)

    def value(self) -> torch.Tensor:
        """float64[] on the device: the LR of the step `step`, without a host read."""
        s = self.schedule
        passed = (self.step >= self._decay_steps).sum().reshape(1)
        # index_select, not [passed]: indexing with a 0-dim tensor reads it on the host.
        factor = self._decay_factors.index_select(0, passed).reshape(())
        if s.warmup_steps > 0:
            alpha = self.step.to(torch.float64) / s.warmup_steps
            warm = factor * (s.warmup_start_factor * (1 - alpha) + alpha)
            factor = torch.where(self.step < s.warmup_steps, warm, factor)
        return s.base_lr * factor

    def advance(self) -> None:
        self.step.add_(1)

    def current(self) -> float:
        """The LR of the next step as a Python float (a host read: for logs only)."""
        return float(self.value())

    def state_dict(self) -> dict:
        """The position in the schedule; the base LR is recorded for reading, not restored
        (a run follows its own config's schedule)."""
        return {"step": int(self.step), "base_lr": self.schedule.base_lr}

    def load_state_dict(self, state: dict) -> None:
        self.set_step(state["step"])

    def set_step(self, step: int) -> None:
        self.step.fill_(step)


def _fused_on(params: list[torch.Tensor]) -> bool:
    """Whether SGD.step uses torch's fused kernel for these parameters: on the CPU only, and
    not while torch.compile traces the step (the fused op has no fake kernel to trace; the
    compiled foreach ops fuse anyway)."""
    return bool(params) and params[0].device.type == "cpu" and not torch.compiler.is_compiling()


class SGD(torch.optim.SGD):
    """torch.optim.SGD's maths with momentum (buf = momentum x buf + grad + wd x param;
    param -= lr x buf), its state and checkpoint format, with a step that a CUDA graph can
    record and torch.compile(fullgraph=True) can trace: the LR is `lr.value()`, a device
    tensor; the momentum buffers exist (zeros) from the start, so no step differs from the
    others (a zero buffer gives buf = grad, torch's first step); gradients are zeroed in
    place, never set to None, so they keep their memory between steps and graph replays.
    torch's own step graph-breaks on purpose (torch/optim/optimizer.py, _use_grad).
    """

    def __init__(self, param_groups: list[dict], lr: LearningRate, momentum: float):
        super().__init__(param_groups, lr=lr.schedule.base_lr, momentum=momentum)
        self.lr = lr
        self._fill_momentum_buffers()

    def _fill_momentum_buffers(self) -> None:
        for group in self.param_groups:
            for parameter in group["params"]:
                if "momentum_buffer" not in self.state[parameter]:
                    self.state[parameter]["momentum_buffer"] = torch.zeros_like(
                        parameter, memory_format=torch.preserve_format)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._fill_momentum_buffers()  # a checkpoint of step 0 has none

    @torch.no_grad()
    def step(self, closure=None) -> None:  # closure: GradScaler.step's signature
        if closure is not None:
            raise ValueError("SGD.step takes no closure")
        neg_lr = -self.lr.value()
        for group in self.param_groups:
            # As torch's SGD, parameters without a gradient are left alone (the model's
            # trainable ones all have one: tests/engine/test_solver.py).
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            if _fused_on(params):
                # One fused pass per tensor: the foreach ops below read and write every
                # parameter several times, 28 ms of a 258 ms `shapes` step on a 2-core CPU
                # against 9 fused (BENCHMARKS.md). Same maths; CUDA keeps the foreach path
                # that its graph capture and torch.compile are tested with.
                torch._fused_sgd_(params, grads, bufs, weight_decay=group["weight_decay"],
                                  momentum=group["momentum"], lr=-neg_lr, dampening=0.0,
                                  nesterov=False, maximize=False, is_first_step=False)
                continue
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, torch._foreach_mul(bufs, neg_lr))

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zeroes the gradients in place (set_to_none is not supported: see the class)."""
        if set_to_none:
            raise ValueError("SGD keeps its gradients: zero_grad(set_to_none=False) only")
        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        # The name torch's zero_grad profiles under (the benchmark's breakdown finds it).
        with torch.autograd.profiler.record_function("Optimizer.zero_grad#SGD.zero_grad"):
            if grads:
                torch._foreach_zero_(grads)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights of convs and linear layers only, not on norm parameters or
    biases (every parameter with fewer than 2 dimensions); frozen parameters left out."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: Config, schedule: Schedule,
                    device: torch.device, step: int = 0) -> SGD:
    """SGD with momentum on the model's trainable parameters (see parameter_groups), its LR
    following `schedule` from `step` on, as a tensor on `device`."""
    return SGD(parameter_groups(model, config.solver.weight_decay),
               LearningRate(schedule, device, step), config.solver.momentum)


def apply_gradients(parameters: list[torch.nn.Parameter], optimizer: SGD,
                    scaler: torch.amp.GradScaler | None, grad_clip_norm: float) -> None:
    """The end of a training step, after backward: optional clipping of the (unscaled)
    gradients to a global L2 norm, the SGD step (through the loss scaler for fp16), the
    gradients zeroed, the LR's step advanced.

    With fp16 (`scaler` given), GradScaler.step reads whether gradients overflowed: one host
    sync per step, inherent to dynamic loss scaling, so fp16 steps run eager only. Without a
    scaler (fp32, bf16) nothing here reads the device.
    """
    if grad_clip_norm > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad()
    optimizer.lr.advance()
