"""The training loop: the TrainStep over the batches, then each hook in turn (engine/hooks.py).

One step moves the batch to the device and runs the TrainStep (engine/step.py); its losses stay
on the device (hooks.LossSums). Everything else is a hook's: log lines and events, the progress
bar, stop signals, checkpoints, evaluation. The Trainer holds what they share: the step count,
the checkpoints (state, save_checkpoint, resume) and what a failure does. It is given its
parts, built once by the command (train.py: build_trainer), and builds none of them. With
several processes (engine/distributed.py) each rank runs this loop on its slice of every global
batch, and every check that stops the run is agreed by all ranks, so that they stop together.

Faults (the commands turn each into one line and an exit status, cli.py): SIGTERM or SIGINT
while training stops after the step with its checkpoint (hooks.StopOnSignal), during an
evaluation before its next batch (_evaluation_stopped); a non-finite loss stops the run before
any checkpoint of it, so the last one on disk is a good one; a checkpoint that cannot be written
stops every rank (CheckpointError); a rank that fails on its own (a corrupt image, an
out-of-memory error) stops every rank at once, rank 0 keeping the steps done (_fail).
"""

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from maskrcnn.data.batch import Batch
from maskrcnn.data.coco import CocoDataset, DatasetError
from maskrcnn.data.loader import user_message
from maskrcnn.engine import checkpoint as ckpt
from maskrcnn.engine import distributed
from maskrcnn.engine.evaluate import EvaluationStopped, Evaluator
from maskrcnn.engine.hooks import (
    STOP_SIGNALS,
    Hook,
    LossSums,
    NonFiniteLossError,
    StopSignals,
    TrainingStopped,
    end_workers,
)
from maskrcnn.engine.step import TrainStep, unwrap


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]  # the final evaluation's, empty without a val split
    checkpoint: Path | None


class Trainer:
    """One training process's loop. Rank 0 logs and writes checkpoints.

    step: the TrainStep (its config, device, schedule, and runtime: rank, world size);
    loader: this rank's training loader (its batch_sampler: `sampler`); hooks: what runs after
    each step, in order, after the trainer's own LossSums (`losses`); train_coco: the training
    set (its classes go into every checkpoint); evaluator: the val split's, or None; log:
    prints a line (rank 0 only; default: beside the progress bar). The hooks read step (steps
    done), step_losses (the last step's float32[5]), data_wait_s (seconds spent waiting for
    batches), paused_s (seconds of mid-run evaluations), and set metrics (the final ones).
    """

    def __init__(self, step: TrainStep, loader: DataLoader, hooks: Sequence[Hook], *,
                 train_coco: CocoDataset, evaluator: Evaluator | None = None,
                 log: Callable[[str], None] | None = None):
        self.train_step, self.loader, self.sampler = step, loader, loader.batch_sampler
        self.config, self.device, self.schedule = step.config, step.device, step.schedule
        self.rank, self.world_size = step.runtime.rank, step.runtime.world_size
        self.is_main = self.rank == 0
        self.output_dir = Path(self.config.run.output_dir)
        self.train_coco, self.evaluator = train_coco, evaluator
        self._log = log or (lambda text: tqdm.write(text, file=sys.stdout))
        self.losses = LossSums(self.device, self.world_size)
        self.hooks = [self.losses, *hooks]
        self.step = 0
        self.step_losses: torch.Tensor | None = None
        self.data_wait_s = self.paused_s = 0.0
        self.metrics: dict[str, float] = {}
        self.last_checkpoint: Path | None = None

    def log(self, text: str) -> None:
        if self.is_main:
            self._log(text)

    @property
    def model(self) -> torch.nn.Module:
        return self.train_step.model

    @property
    def val_coco(self) -> CocoDataset | None:
        return None if self.evaluator is None else self.evaluator.coco

    # ---------------------------------------------------------------- the loop

    def train(self) -> TrainResult:
        """Trains from self.step (0, or where resume left off) to the end of the schedule,
        then runs the hooks' after_train (the final evaluation: all a run resumed at its end
        does). TrainingStopped, NonFiniteLossError and CheckpointError, which every rank
        raises together, end the run as they are; any other error goes through _fail."""
        try:
            try:
                for hook in self.hooks:
                    hook.before_train(self)
                for batch in self._batches():
                    self.step_losses = self.train_step(self.train_step.to_device(batch))
                    self.step += 1
                    for hook in self.hooks:
                        hook.after_step(self)
                end_workers(self.loader)
                for hook in self.hooks:
                    hook.after_train(self)
            finally:
                end_workers(self.loader)  # they ignore SIGTERM: they must not outlive training
                for hook in reversed(self.hooks):
                    hook.close()
        except EvaluationStopped as stopped:
            raise self._evaluation_stopped(stopped) from None
        except (TrainingStopped, NonFiniteLossError, ckpt.CheckpointError):
            raise  # every rank raises these together
        except Exception as error:  # any failure of this rank or of a peer
            raise self._fail(error) from error
        return TrainResult(self.step, self.metrics, self.last_checkpoint)

    def _batches(self) -> Iterator[Batch]:
        """The batches from self.step to the end of the schedule, each epoch's from where
        self.step stands in it; the time spent waiting for each is added to data_wait_s."""
        schedule = self.schedule
        while self.step < schedule.total_steps:
            epoch = schedule.epoch_of(self.step)
            self.sampler.set_epoch(epoch, self.step - epoch * schedule.steps_per_epoch)
            batches = iter(self.loader)
            while self.step < schedule.total_steps:
                start = time.perf_counter()
                batch = next(batches, None)
                self.data_wait_s += time.perf_counter() - start
                if batch is None:
                    break
                yield batch

    # ---------------------------------------------------------------- checkpoints

    def state(self) -> dict:
        return ckpt.training_state(self.train_step, self.step, self.world_size,
                                   self.train_coco.category_ids, self.train_coco.class_names)

    def save_checkpoint(self, stop_signal: int = 0) -> Path | None:
        """Rank 0 writes the checkpoint of this step and returns its path (None on the other
        ranks), after checking every loss and parameter is finite. Every rank returns once it
        is written, or raises the CheckpointError of a failed write, so that all stop together
        with its line. stop_signal: the signal the run stops on after it; its line replaces
        "checkpoint written to", and is out (flushed) before any other rank can end."""
        self.losses.check()  # on every rank, so that all stop together
        self._check_parameters_finite()
        path, error = None, None
        if self.is_main:
            try:
                path = ckpt.save_atomic(self.state(),
                                        ckpt.checkpoint_path(self.output_dir, self.step))
            except ckpt.CheckpointError as failed:
                error = str(failed)
            else:
                self.log(f"received {signal.Signals(stop_signal).name}: stopped after step "
                         f"{self.step}, checkpoint written to {path}; continue with --resume"
                         if stop_signal else f"checkpoint written to {path}")
                sys.stdout.flush()
        if self.world_size > 1:
            error = distributed.broadcast_from_main(error, "waiting for rank 0 to write the "
                                                    "checkpoint")
        if error:
            raise ckpt.CheckpointError(error)
        self.last_checkpoint = path or self.last_checkpoint
        return path

    def resume(self) -> Path | None:
        """Continues from the newest readable checkpoint in the output dir and returns its
        path; None (and nothing changes) when there is none. Every rank calls this (see
        checkpoint.load_latest_on_rank_0 and restore_training_state: with another global
        batch the run continues at the same epoch, at the images the checkpoint had seen)."""
        found = ckpt.load_latest_on_rank_0(self.output_dir, self.log)
        if found is None:
            return None
        path, state = found
        self.step = ckpt.restore_training_state(self.train_step, state, path, self.log)
        self.log(f"resumed from {path} at step {self.step} (epoch "
                 f"{self.schedule.epoch_of(self.step)})")
        return path

    def _check_parameters_finite(self) -> None:
        for name, parameter in unwrap(self.model).named_parameters():
            if not torch.isfinite(parameter).all():
                raise NonFiniteLossError(f"parameter {name} is not finite at step {self.step}; "
                                         "no checkpoint written")

    # ---------------------------------------------------------------- failures

    def _save_alone(self) -> Path | None:
        """Rank 0 writes the checkpoint of this step with no collective (the other ranks may be
        gone) and returns its path (also one on disk already); None on the other ranks, before
        the first step, or when a loss or parameter is not finite or the write fails."""
        if not self.is_main or self.step == 0:
            return None
        path = ckpt.checkpoint_path(self.output_dir, self.step)
        if path.exists():
            return path
        if self.losses.any_bad():
            return None
        try:
            self._check_parameters_finite()
            ckpt.save_atomic(self.state(), path)
        except (NonFiniteLossError, ckpt.CheckpointError):
            return None
        self.log(f"checkpoint written to {path}")
        return path

    def _fail(self, error: Exception) -> Exception:
        """The error that ends this rank after `error`, once the steps done are kept.

        Its own failure (not a failed collective) is published for the other ranks
        (distributed.publish_failure). Rank 0 keeps this step's checkpoint where the model is
        known to hold it: after a bad image (met between steps) and, on the CPU, after a failed
        collective (every collective of a step precedes its update; on a GPU the queued update
        may have run). Its message names the rank that failed first and the cause."""
        if self.world_size > 1 and threading.current_thread() is threading.main_thread():
            # From here the process only ends. Under torchrun the first rank to end makes it
            # send SIGTERM to the others, which must not cut rank 0's checkpoint or line short.
            for number in STOP_SIGNALS:
                signal.signal(number, signal.SIG_IGN)
        collective_failed = isinstance(error, distributed.DistributedError)
        message = user_message(error)
        if not isinstance(error, (DatasetError, distributed.DistributedError)):
            message = f"{type(error).__name__}: {message}"
        if self.world_size == 1:
            if not isinstance(error, DatasetError):
                return error
            self.losses.check()
            path = self._save_alone()
            return DatasetError(message if path is None else
                                f"{message}; the {self.step} steps done are in {path}: fix or "
                                "remove the file, then continue with --resume")
        if not collective_failed:
            distributed.publish_failure(message)
        path = None
        if isinstance(error, DatasetError) or (collective_failed and self.device.type == "cpu"):
            path = self._save_alone()
        failed = distributed.first_failure()
        if failed is not None:
            message = f"rank {failed[0]} failed: {failed[1]}; stopping all ranks"
        elif not collective_failed:
            message = f"rank {self.rank}: {message}"
        if path is not None:
            message += f"; the {self.step} steps done are in {path}; continue with --resume"
        return (DatasetError if isinstance(error, DatasetError)
                else distributed.DistributedError)(message)

    def _evaluation_stopped(self, stopped: EvaluationStopped) -> TrainingStopped:
        """After a signal during an evaluation: rank 0 keeps the checkpoint of this step and
        prints one line; every rank then ends with TrainingStopped."""
        name = signal.Signals(stopped.signal_number).name
        with StopSignals():  # a second signal must not cut the checkpoint short
            path = self._save_alone()
        self.log(f"received {name} during the evaluation at step {self.step}: stopped it, no "
                 "results written"
                 + (f"; checkpoint of step {self.step} in {path}; continue with --resume"
                    if path is not None else ""))
        sys.stdout.flush()
        return TrainingStopped(stopped.signal_number)
