"""What the training loop does besides the step: one small hook per concern.

The loop (engine/trainer.py: Trainer.train) calls every hook's `before_train`, then after each
step every hook's `after_step` in turn, then `after_train` once the schedule is done; `close`
comes last, also after an error. A hook reads what it needs from the trainer (`step`, the
steps done; `step_losses`, the last step's float32[5] on the device; `schedule`, `device`,
`world_size`, `is_main`, `log`...) and acts on it:

- LossSums: sums the losses on the device and notes the first non-finite step of each (no
  host read); `check` stops the run (NonFiniteLossError) on every rank together.
- LogLines: every run.log_period_steps steps and at the last, one log line and its events.
- ProgressBar: the tqdm bar, on a terminal only.
- StopOnSignal: SIGTERM or SIGINT stops the run after the current step, with a checkpoint.
- Checkpoints: a checkpoint every so many steps or epochs, and at the last step.
- Evaluation: the mid-run evaluations, and the final one (the run's metrics); each result
  goes to the events (`publish`) as it is ready, so that it could come from the background.
- AbruptExit: tests only; the process ends as if killed after a given step.

Hooks that read the host anyway at a step say so (`agrees_on_stop`): several processes agree
on a stop signal only there (StopOnSignal).
"""

import functools
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from maskrcnn.engine import distributed
from maskrcnn.engine.events import EventWriter
from maskrcnn.engine.step import LOSS_KEYS

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite."""


class TrainingStopped(Exception):
    """Training stopped on a signal, after writing a checkpoint and (rank 0) printing a line.

    exit_code: 128 + the signal's number (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signal_number: int):
        super().__init__(f"stopped on {signal.Signals(signal_number).name}")
        self.exit_code = 128 + signal_number


class Hook:
    """A part of the loop; each method does nothing unless a hook overrides it."""

    def before_train(self, trainer) -> None:
        """Before the first step (also when a resumed run has no step left)."""

    def after_step(self, trainer) -> None:
        """After each step, trainer.step counting it."""

    def agrees_on_stop(self, trainer) -> bool:
        """Whether this hook reads the host after this step (see StopOnSignal)."""
        return False

    def after_train(self, trainer) -> None:
        """After the last step, the training loader's workers ended."""

    def close(self) -> None:
        """Last, also after an error, before the error is handled."""


def is_last(trainer) -> bool:
    return trainer.step == trainer.schedule.total_steps


def due(trainer, every_steps: int = 0, every_epochs: int = 0) -> bool:
    """Whether trainer.step completes a period of every_steps steps or every_epochs epochs
    (0: none)."""
    per_epoch = trainer.schedule.steps_per_epoch
    return bool((every_steps and trainer.step % every_steps == 0)
                or (every_epochs and trainer.step % (every_epochs * per_epoch) == 0))


# ---------------------------------------------------------------- losses


class LossSums(Hook):
    """The steps' losses summed on the device, and the first step (1-based) at which each
    went non-finite (-1: none), both float/int64[5] in LOSS_KEYS order. No host read: the
    host reads them only in `check` and `take_means`."""

    def __init__(self, device: torch.device, world_size: int):
        self.world_size = world_size
        self.sums = torch.zeros(len(LOSS_KEYS), device=device)
        self.first_bad = torch.full((len(LOSS_KEYS),), -1, dtype=torch.int64, device=device)

    def before_train(self, trainer) -> None:
        self.sums.zero_()
        self.first_bad.fill_(-1)

    def after_step(self, trainer) -> None:
        losses = trainer.step_losses
        self.sums += losses
        bad = ~torch.isfinite(losses) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, trainer.step, self.first_bad)

    def any_bad(self) -> bool:
        """Whether a loss of this rank went non-finite (a host read; no collective)."""
        return bool((self.first_bad >= 0).any())

    def check(self) -> None:
        """Stops at the first non-finite loss of any rank (all ranks call this together)."""
        first_bad = self.first_bad
        if self.world_size > 1:
            never = torch.iinfo(torch.int64).max
            first_bad = torch.where(first_bad < 0, never, first_bad)
            distributed.all_reduce_(first_bad, torch.distributed.ReduceOp.MIN,
                                    "all_reduce of the non-finite loss check")
            first_bad = torch.where(first_bad == never, -1, first_bad)
        # A host read only at log steps and checkpoints, where the step's work is read anyway.
        bad = [(step, key) for key, step in zip(LOSS_KEYS, first_bad.tolist(), strict=True)
               if step >= 0]
        if bad:
            step, key = min(bad)  # the first to go wrong; the others follow from it
            raise NonFiniteLossError(
                f"{key} became non-finite at step {step}; stopping (the last "
                f"checkpoint on disk, if any, was written before it)")

    def take_means(self, steps: int) -> list[float]:
        """The mean of each loss over the last `steps` steps and the ranks (with global-batch
        normalisers, the loss of the global batch), after `check`; the sums start again."""
        self.check()
        sums = self.sums.clone()
        distributed.all_reduce_(sums, torch.distributed.ReduceOp.SUM,
                                "all_reduce of the logged losses")
        self.sums.zero_()
        return (sums / (steps * self.world_size)).tolist()  # the one read per log interval


# ---------------------------------------------------------------- log lines and events


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class LogLines(Hook):
    """Every `period` steps and at the last: one line (losses averaged over the interval and
    the ranks, LR, speed, share of time waiting for data, peak memory, ETA) and the same
    values as events (rank 0: <output_dir>/events). The interval's time leaves out the
    trainer's paused_s (mid-run evaluations)."""

    def __init__(self, period: int):
        self.period = period
        self.events: EventWriter | None = None

    def before_train(self, trainer) -> None:
        schedule = trainer.schedule
        trainer.log(f"training {schedule.total_steps} steps of {schedule.global_batch} images "
                    f"({schedule.total_steps // schedule.steps_per_epoch} epochs of "
                    f"{schedule.steps_per_epoch} steps), base LR {schedule.base_lr:g}, "
                    f"on {trainer.device}" + (f" in each of {trainer.world_size} processes"
                                              if trainer.world_size > 1 else ""))
        if trainer.is_main:
            self.events = EventWriter(trainer.output_dir / "events")
        self._start(trainer)

    def _start(self, trainer) -> None:
        self._mark = (time.perf_counter(), trainer.step, trainer.data_wait_s, trainer.paused_s)

    def agrees_on_stop(self, trainer) -> bool:
        return self._logs_at(trainer)

    def _logs_at(self, trainer) -> bool:
        return trainer.step % self.period == 0 or is_last(trainer)

    def after_step(self, trainer) -> None:
        if not self._logs_at(trainer):
            return
        start, start_step, start_wait, start_paused = self._mark
        steps = trainer.step - start_step
        seconds = max(time.perf_counter() - start - (trainer.paused_s - start_paused), 1e-9)
        data_wait = (trainer.data_wait_s - start_wait) / seconds
        means = trainer.losses.take_means(steps)
        schedule = trainer.schedule
        lr = trainer.train_step.lr.current()
        images_per_s = steps * schedule.global_batch / seconds
        memory = peak_memory_mib(trainer.device)
        values = dict(zip(LOSS_KEYS, means, strict=True))
        eta = (schedule.total_steps - trainer.step) * seconds / steps
        trainer.log(f"step {trainer.step}/{schedule.total_steps} "
                    f"epoch {trainer.step / schedule.steps_per_epoch:.2f} "
                    + " ".join(f"{k[5:]} {v:.4f}" for k, v in values.items())
                    + f" total {sum(means):.4f} lr {lr:.3g} {images_per_s:.2f} img/s "
                    f"data-wait {data_wait:.0%} peak-mem {memory:.0f} MiB "
                    f"eta {int(eta // 60)}m{int(eta % 60):02d}s")
        self.publish(trainer.step, {**{f"loss/{k}": v for k, v in values.items()},
                                    "loss/total": sum(means), "lr": lr,
                                    "speed/images_per_s": images_per_s,
                                    "speed/data_wait": data_wait, "memory/peak_mib": memory})
        self._start(trainer)

    def publish(self, step: int, values: dict[str, float]) -> None:
        """Scalars of a step in the events (rank 0; nothing elsewhere)."""
        if self.events is not None:
            self.events.scalars(step, values)

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


class ProgressBar(Hook):
    """A tqdm bar of the steps, on rank 0 when stderr is a terminal; log lines (with their
    own ETA) go everywhere."""

    def __init__(self):
        self.bar: tqdm | None = None

    def before_train(self, trainer) -> None:
        self.bar = tqdm(total=trainer.schedule.total_steps, initial=trainer.step, unit="step",
                        disable=not (trainer.is_main and sys.stderr.isatty()),
                        dynamic_ncols=True, file=sys.stderr)

    def after_step(self, trainer) -> None:
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- stop signals


class StopSignals:
    """While inside (a context manager), SIGTERM and SIGINT are recorded instead of acted on;
    the handlers from before are put back on leaving, also on an error.

    received: the number of the signal received, 0 before any; SIGTERM when both were (as
    across ranks, StopOnSignal: Python runs the handlers of signals that arrived together in
    number order, so "the first" is not always known). A repeat changes nothing else:
    stopping finishes the step and writes the checkpoint, which a second signal must not cut
    short (torchrun passes the terminal's Ctrl-C on to workers that got it already, and sends
    SIGTERM to the other workers when one ends); SIGKILL stops at once, and even then the
    checkpoints written before are intact (the write is atomic). DataLoader workers ignore
    both (workers_ignore_stop_signals). Outside the main thread, where Python cannot set
    handlers, nothing is installed and nothing is received.
    """

    def __init__(self):
        self.received = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._record)
        return self

    def _record(self, number: int, frame) -> None:
        self.received = max(self.received, number)

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            # None: a handler set outside Python, which cannot be put back; the default then.
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()


def _worker_ignoring_stop_signals(worker_id: int, init=None) -> None:
    """A DataLoader worker's start: it ignores SIGTERM and SIGINT, which are the training
    process's to act on, and ends with that process (it watches its parent). Signals reach
    the workers too: torchrun sends SIGTERM to each rank's whole process group, SLURM to every
    process of the job step, the terminal Ctrl-C's SIGINT to its foreground group; a worker
    ended by one would fail the steps the ranks still take before they agree to stop."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    if init is not None:
        init(worker_id)


def workers_ignore_stop_signals(loader: DataLoader) -> DataLoader:
    """loader, its workers started by _worker_ignoring_stop_signals (then by its own
    worker_init_fn, if any). Set before its first iterator, which starts the workers."""
    loader.worker_init_fn = functools.partial(_worker_ignoring_stop_signals,
                                              init=loader.worker_init_fn)
    return loader


def end_workers(loader: DataLoader) -> None:
    """Ends the loader's workers (call once no iterator of it is in use). Workers that
    ignore SIGTERM must not outlive their use: at interpreter exit multiprocessing ends its
    child processes with SIGTERM and then waits for them, and a script that still holds the
    loader, or an error's traceback that holds its iterator, would hang there. With
    persistent workers torch keeps them in the loader's `_iterator`; its _shutdown_workers
    (what its __del__ calls) ends them through their queues, whoever still refers to it. The
    next iterator starts new ones."""
    iterator, loader._iterator = loader._iterator, None
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


class StopOnSignal(Hook):
    """SIGTERM or SIGINT while training (StopSignals) stops the run after the step: the
    checkpoint of that step, whose line names the signal ("received SIGTERM: stopped after
    step 37, checkpoint written to ...; continue with --resume"), then TrainingStopped on
    every rank.

    One process stops after the step in which the signal came: the check reads a Python
    attribute, free. Several must stop after the same step, whichever of them got a signal
    and in which step (torchrun passes a SIGTERM on to every worker, but each gets it where
    it is; a `kill` may reach one), so they agree with an all_reduce(MAX) of their signal
    numbers. Its answer decides what the host does next, a host read that on a GPU waits for
    the queued work, so they agree only at steps where a hook reads the host anyway
    (agrees_on_stop): log steps, just after the all_reduce and read of the logged losses, and
    mid-run evaluation steps, whose evaluation a stop then skips. Not every step, and not
    piggybacked on the step's own collectives: those stay on the device, and reading theirs
    would be the same host read per step. A signal thus stops several processes at most
    run.log_period_steps steps after it reached any of them.
    """

    def __init__(self):
        self.signals = StopSignals()

    def received(self) -> int:
        """This process's signal, 0 before any (what an evaluation checks between batches)."""
        return self.signals.received

    def before_train(self, trainer) -> None:
        self.signals.__enter__()

    def after_step(self, trainer) -> None:
        stop = self.signals.received
        if trainer.world_size > 1:
            if not any(hook.agrees_on_stop(trainer) for hook in trainer.hooks):
                return
            flag = torch.tensor([stop], dtype=torch.int64, device=trainer.device)
            distributed.all_reduce_(flag, torch.distributed.ReduceOp.MAX,
                                    "all_reduce of the stop request")
            stop = int(flag.item())  # a host read only where a hook reads anyway (see above)
        if stop:
            trainer.save_checkpoint(stop)
            raise TrainingStopped(stop)

    def close(self) -> None:
        self.signals.__exit__()


# ---------------------------------------------------------------- checkpoints, evaluation


class Checkpoints(Hook):
    """The checkpoint of every `every_steps`-th step, of the last step of every
    `every_epochs`-th epoch (0: none) and of the last step (Trainer.save_checkpoint)."""

    def __init__(self, every_steps: int, every_epochs: int):
        self.every_steps, self.every_epochs = every_steps, every_epochs

    def after_step(self, trainer) -> None:
        if is_last(trainer) or due(trainer, self.every_steps, self.every_epochs):
            trainer.save_checkpoint()


class Evaluation(Hook):
    """The trainer's evaluator (engine/evaluate.py: Evaluator) after every `every_epochs`-th
    epoch but the last (0: none), and once after training: the run's metrics
    (trainer.metrics). Each result goes to `publish(step, metrics)` (the events) when it is
    ready. A signal stops an evaluation before its next batch (stop: the number of a signal
    received, 0 for none; EvaluationStopped); the time of a mid-run one is added to
    trainer.paused_s (not training time)."""

    def __init__(self, every_epochs: int, publish: Callable[[int, dict[str, float]], None],
                 stop: Callable[[], int] | None = None):
        self.every_epochs, self.publish, self.stop = every_epochs, publish, stop

    def agrees_on_stop(self, trainer) -> bool:
        return self._mid_run_at(trainer)

    def _mid_run_at(self, trainer) -> bool:
        return not is_last(trainer) and due(trainer, every_epochs=self.every_epochs)

    def after_step(self, trainer) -> None:
        if self._mid_run_at(trainer):
            start = time.perf_counter()
            self._evaluate(trainer)
            trainer.paused_s += time.perf_counter() - start

    def after_train(self, trainer) -> None:
        trainer.metrics = self._evaluate(trainer)

    def _evaluate(self, trainer) -> dict[str, float]:
        metrics = trainer.evaluator(stop=self.stop)
        if metrics:
            self.publish(trainer.step, metrics)
        return metrics


class AbruptExit(Hook):
    """Tests only: the process ends abruptly (os._exit(17), as if killed) right after step
    `step` and whatever the hooks before this one did at it; only rank `rank` does, unless
    it is -1."""

    def __init__(self, step: int, rank: int = -1):
        self.step, self.rank = step, rank

    def after_step(self, trainer) -> None:
        if trainer.step == self.step and self.rank in (-1, trainer.rank):
            sys.stdout.flush()
            os._exit(17)
