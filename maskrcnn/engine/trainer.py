"""The training loop: steps without host synchronisation, logs, checkpoints, evaluation.

One step is: move the batch to the device, then the TrainStep (engine/step.py: forward under
autocast, backward, clipping, SGD step, LR schedule step), built from the config alone and
handed the batches here. Loss values stay on the device and are summed there; the host reads
them once per log interval, which is also when a non-finite loss is noticed (it stops the run
naming the loss term and the first bad step; checkpoints are only written after the same check,
so the last one on disk is always a good one).

Data parallelism (world_size > 1, in a process group from engine/distributed.py): the model is
wrapped in DistributedDataParallel, each rank reads its M-slice of every global batch, and the
step does the maths of one process holding the whole global batch: sampling keys are drawn for
the global batch and sliced (sampling.global_batch_keys), loss normalisers are counts over the
global batch (distributed.global_counts), and DDP averages the gradients. Logged losses are
averaged over the ranks and the non-finite check sees every rank's, so all ranks stop together.

Faults (the commands turn each into one line and an exit status, cli.py):
- SIGTERM or SIGINT (preemption, Ctrl-C) while training: the current step finishes, rank 0
  writes a checkpoint of it and prints one line ("received SIGTERM: stopped after step 37,
  checkpoint written to ...; continue with --resume"), and every rank raises TrainingStopped,
  whose exit status is 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as a shell
  reports a process a signal ended. With several processes they first agree on the step
  (Trainer._stop_signal). A second signal does not cut the stop short (StopSignals); the
  DataLoader workers ignore both (workers_ignore_stop_signals).
- A checkpoint that cannot be written (a full disk): CheckpointError on every rank, the
  checkpoints before it intact (checkpoint.save_atomic).
- --resume skips checkpoints that cannot be read (checkpoint.load_latest).
- SIGTERM or SIGINT during an evaluation (mid-run or final) stops it before its next batch:
  no results file, the checkpoint of the step on disk, one line, TrainingStopped.
- A rank that fails on its own (a corrupt image, an out-of-memory error, a failed kernel; not
  the errors every rank raises together) makes every rank stop at once (Trainer._fail): it
  publishes its cause and leaves the process group, the others' next collective fails, and
  rank 0 writes the checkpoint of the last completed step (no collective: the failed rank is
  gone) and prints the job's one line, "rank 1 failed: <cause>; stopping all ranks; the 37
  steps done are in PATH; continue with --resume" (distributed.end_failed_job).
"""

import functools
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from maskrcnn.config import Config, to_text
from maskrcnn.data.coco import DatasetError
from maskrcnn.data.loader import (
    build_dataset,
    build_eval_loader,
    build_train_loader,
    read_coco,
    resolve_data_paths,
)
from maskrcnn.engine import checkpoint as ckpt
from maskrcnn.engine import distributed
from maskrcnn.engine.evaluate import EvaluationStopped, evaluate
from maskrcnn.engine.events import EventWriter
from maskrcnn.engine.solver import make_schedule
from maskrcnn.engine.step import LOSS_KEYS, TrainStep, unwrap
from maskrcnn.runtime import Runtime

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite."""


class TrainingStopped(Exception):
    """Training stopped on a signal, after writing a checkpoint and (rank 0) printing a line.

    exit_code: 128 + the signal's number (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signal_number: int):
        super().__init__(f"stopped on {signal.Signals(signal_number).name}")
        self.exit_code = 128 + signal_number


class StopSignals:
    """While inside (a context manager), SIGTERM and SIGINT are recorded instead of acted on;
    the handlers from before are put back on leaving, also on an error.

    received: the number of the signal received, 0 before any; SIGTERM when both were (as
    across ranks, Trainer._stop_signal: Python runs the handlers of signals that arrived
    together in number order, so "the first" is not always known). A repeat changes nothing
    else: stopping finishes the step and writes the checkpoint, which a second signal must
    not cut short (torchrun passes the terminal's Ctrl-C on to workers that got it already,
    and sends SIGTERM to the other workers when one ends); SIGKILL stops at once, and even
    then the checkpoints written before are intact (the write is atomic). DataLoader workers
    ignore both (workers_ignore_stop_signals). Outside the main thread, where Python cannot
    set handlers, nothing is installed and nothing is received.
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


def user_message(error: Exception) -> str:
    """The user's message of an error. An error raised in a DataLoader worker arrives wrapped
    with the worker's traceback; its last line is the original "module.Class: message"."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by tensors, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def load_model_state(model: torch.nn.Module, state: dict, source) -> None:
    """Loads a checkpoint's model weights, or stops with one line naming the checkpoint."""
    try:
        unwrap(model).load_state_dict(state)
    except RuntimeError as error:
        raise ckpt.CheckpointError(f"checkpoint {source} does not fit this config's model: "
                                   f"{str(error).splitlines()[1].strip()}") from None


def fit_world_size(config: Config, world_size: int) -> tuple[Config, str | None]:
    """The config with run.num_gpus set to the number of processes actually training, and a
    note for the log when that changed it.

    The processes started define the global batch (world_size x run.images_per_gpu) and so
    the LR (solver.base_lr_per_image x global batch); epochs count images, so the schedule
    still covers the same data, in more or fewer steps. warmup_steps stays in steps.
    """
    if config.run.num_gpus == world_size:
        return config, None
    fitted = Config()
    fitted.CopyFrom(config)
    fitted.run.num_gpus = world_size
    batch = world_size * config.run.images_per_gpu
    return fitted, (f"note: the config's run.num_gpus is {config.run.num_gpus} but "
                    f"{world_size} process(es) are training: global batch {world_size} x "
                    f"{config.run.images_per_gpu} = {batch} images, LR "
                    f"{config.solver.base_lr_per_image:g} x {batch} = "
                    f"{config.solver.base_lr_per_image * batch:g}")


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]  # the final evaluation's, empty without a val split
    checkpoint: Path | None


class Trainer:
    """Everything one training process holds. Rank 0 logs, writes events and checkpoints."""

    def __init__(self, config: Config, device: torch.device, *, rank: int = 0,
                 world_size: int = 1, log=None, runtime: Runtime | None = None):
        self.device = device
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self._log = log or (lambda text: tqdm.write(text, file=sys.stdout))
        config, note = fit_world_size(config, world_size)
        self.config = config
        if note:
            self.log(note)
        self.output_dir = Path(config.run.output_dir)
        torch.manual_seed(config.run.seed)

        paths = resolve_data_paths(config)
        num_classes = config.model.num_classes
        self.train_coco = read_coco(paths.train_json, paths.train_images, train=True,
                                    num_classes=num_classes)
        self.val_json = paths.val_json
        self.val_coco = (read_coco(paths.val_json, paths.val_images, train=False,
                                   num_classes=num_classes) if paths.val_json else None)
        dataset = build_dataset(config, self.train_coco, train=True)
        self.loader, self.sampler = build_train_loader(config, dataset, rank=rank,
                                                       world_size=world_size)
        workers_ignore_stop_signals(self.loader)
        self.schedule = make_schedule(config, len(dataset), self.sampler.steps_per_epoch)

        self.runtime = (runtime if runtime is not None
                        else Runtime.for_config(config, device, rank, world_size))
        self.train_step = TrainStep(config, device, self.schedule, self.runtime)
        self.step = 0

    def log(self, text: str) -> None:
        if self.is_main:
            self._log(text)

    # ---------------------------------------------------------------- checkpoints

    def state(self) -> dict:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr": self.train_step.lr.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.schedule.epoch_of(self.step),
            # What a run with another number of processes needs to find its place (resume).
            "world_size": self.world_size,
            "global_batch": self.schedule.global_batch,
            "steps_per_epoch": self.schedule.steps_per_epoch,
            "rng": ckpt.rng_states(),
            "config": to_text(self.config),
            "category_ids": list(self.train_coco.category_ids),
            "class_names": list(self.train_coco.class_names),
        }

    def save_checkpoint(self, stop_signal: int = 0) -> Path | None:
        """Rank 0 writes the checkpoint of this step (and returns its path; None on the other
        ranks). Every rank returns once it is written, or raises the CheckpointError of a
        failed write, so that all stop together with its line (rather than the others failing
        at their next collective, naming only a lost peer).

        stop_signal: the signal the run stops on after this checkpoint; its line replaces
        "checkpoint written to", and is out (flushed) before any other rank can end.
        """
        self._check_parameters_finite()  # on every rank, so that all stop together
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
        return path

    def resume(self) -> Path | None:
        """Continues from the newest readable checkpoint in the output dir and returns its
        path; None (and nothing changes) when there is no checkpoint. Every rank calls this;
        rank 0 reads the file and sends it to the others, so only its node needs the output
        dir. Unreadable newer checkpoints are skipped with a line each; when none can be
        read, every rank raises that CheckpointError (checkpoint.load_latest).

        With the global batch the checkpoint was written at, the run continues exactly. With
        another one (another number of processes), it continues at the same epoch and, within
        it, after as many whole global batches as the images the checkpoint had seen in that
        epoch fill; the LR follows this run's schedule from there (base LR for this global
        batch), and model, momentum, loss scaler and RNG states carry over.
        """
        found: tuple[Path, dict] | str | None = None
        if self.is_main:
            try:
                found = ckpt.load_latest(self.output_dir, self.log)
            except ckpt.CheckpointError as error:
                found = str(error)
        found = distributed.broadcast_from_main(found, "sending the checkpoint from rank 0")
        if isinstance(found, str):
            raise ckpt.CheckpointError(found)
        if found is None:
            return None
        path, state = found
        schedule = self.schedule
        try:
            unwrap(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            same_batch = state["global_batch"] == schedule.global_batch
            if same_batch:
                self.step = state["step"]
            else:
                self.step = schedule.equivalent_step(state["step"], state["global_batch"],
                                                     state["steps_per_epoch"])
            # The LR follows this run's schedule from its step (its base LR for this batch).
            self.train_step.lr.set_step(self.step)
            saved_world = state["world_size"]
        except (KeyError, RuntimeError, ValueError) as error:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this config: "
                                       f"{str(error).splitlines()[0]}") from None
        ckpt.set_rng_states(state["rng"])
        if state["config"] != to_text(fit_world_size(self.config, saved_world)[0]):
            self.log(f"warning: the config differs from the one {path} was written with")
        if not same_batch:
            self.log(f"{path} was written at step {state['step']} of global batch "
                     f"{state['global_batch']} ({saved_world} process(es)); this run has "
                     f"global batch {schedule.global_batch}: continuing at step {self.step}, "
                     f"LR {self.train_step.lr.current():.3g}")
        self.log(f"resumed from {path} at step {self.step} (epoch "
                 f"{schedule.epoch_of(self.step)})")
        return path

    def _check_parameters_finite(self) -> None:
        for name, parameter in unwrap(self.model).named_parameters():
            if not torch.isfinite(parameter).all():
                raise NonFiniteLossError(f"parameter {name} is not finite at step {self.step}; "
                                         "no checkpoint written")

    # ---------------------------------------------------------------- steps

    # The step's parts, for checkpoints, evaluation and logging.
    @property
    def model(self) -> torch.nn.Module:
        return self.train_step.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.train_step.optimizer

    @property
    def scaler(self) -> torch.amp.GradScaler:
        return self.train_step.scaler

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return self.train_step.autocast_dtype

    def evaluate(self, stop=None) -> dict[str, float]:
        """Scores the model on the val split ({} without one); stop: as evaluate()'s."""
        if self.val_coco is None:
            return {}
        dataset = build_dataset(self.config, self.val_coco, train=False)
        loader = workers_ignore_stop_signals(build_eval_loader(
            self.config, dataset, rank=self.rank, world_size=self.world_size))
        return evaluate(unwrap(self.model), loader, self.val_json,
                        self.val_coco.category_ids, self.output_dir, self.device,
                        self.autocast_dtype, coco_eval=self.config.run.coco_eval,
                        log=self.log, stop=stop)

    def train(self, exit_after_step: int = 0, exit_rank: int = -1) -> TrainResult:
        """Trains to the end of the schedule from self.step (0, or where resume left off), then
        evaluates; resumed at the end of the schedule (a run stopped after its last step), it
        only evaluates.

        While it trains, SIGTERM or SIGINT stops the run after the current step (with several
        processes, after the first step where they agree, _stop_signal): the checkpoint of that
        step, one line, then TrainingStopped on every rank. During an evaluation (mid-run or
        final) a signal stops it before its next batch, with no results written: the
        checkpoint of the step, one line, TrainingStopped. Another failure of a rank ends
        every rank at once, the steps done kept in a checkpoint (_fail).

        exit_after_step: test hook; the process ends abruptly (os._exit(17), as if killed)
        right after that step and any checkpoint due at it; only rank exit_rank does if it
        is not -1.
        """
        config, schedule = self.config, self.schedule
        period = config.run.log_period_steps
        events = EventWriter(self.output_dir / "events") if self.is_main else None
        self.log(f"training {schedule.total_steps} steps of {schedule.global_batch} images "
                 f"({config.solver.epochs} epochs of {schedule.steps_per_epoch} steps), "
                 f"base LR {schedule.base_lr:g}, on {self.device}"
                 + (f" in each of {self.world_size} processes" if self.world_size > 1 else ""))
        sums = torch.zeros(len(LOSS_KEYS), device=self.device)
        first_bad = torch.full((len(LOSS_KEYS),), -1, dtype=torch.int64, device=self.device)
        interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0
        last_checkpoint = None
        # The bar only on a terminal; log lines (with their own ETA) go everywhere.
        progress = tqdm(total=schedule.total_steps, initial=self.step, unit="step",
                        disable=not (self.is_main and sys.stderr.isatty()), dynamic_ncols=True,
                        file=sys.stderr)
        batches = None
        try:
            with StopSignals() as signals:
                while self.step < schedule.total_steps:
                    epoch = schedule.epoch_of(self.step)
                    self.sampler.set_epoch(epoch, self.step - epoch * schedule.steps_per_epoch)
                    batches = iter(self.loader)
                    while True:
                        wait_start = time.perf_counter()
                        batch = next(batches, None)
                        data_wait += time.perf_counter() - wait_start
                        if batch is None:
                            break
                        losses = self.train_step(self.train_step.to_device(batch))
                        sums += losses
                        bad = ~torch.isfinite(losses) & (first_bad < 0)
                        first_bad = torch.where(bad, self.step, first_bad)
                        self.step += 1
                        interval_steps += 1
                        progress.update(1)
                        end_of_epoch = self.step % schedule.steps_per_epoch == 0
                        done_epochs = self.step // schedule.steps_per_epoch
                        last = self.step == schedule.total_steps
                        logging = self.step % period == 0 or last
                        evaluating = not last and bool(  # mid-run; the final one below
                            end_of_epoch and config.run.eval_period_epochs
                            and done_epochs % config.run.eval_period_epochs == 0)
                        if logging:
                            self._report(sums, first_bad, interval_steps,
                                         time.perf_counter() - interval_start, data_wait, events)
                            sums.zero_()
                            interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0
                        stop = self._stop_signal(signals.received, logging or evaluating)
                        if (stop or last or (config.run.checkpoint_period_steps and self.step
                                             % config.run.checkpoint_period_steps == 0)
                                or (end_of_epoch and config.run.checkpoint_period_epochs
                                    and done_epochs % config.run.checkpoint_period_epochs == 0)):
                            self._raise_if_bad(first_bad)
                            last_checkpoint = self.save_checkpoint(stop) or last_checkpoint
                        if stop:
                            raise TrainingStopped(stop)
                        if evaluating:
                            self._evaluate(events, signals)
                            interval_start = time.perf_counter()  # not training time
                        if self.step == exit_after_step and exit_rank in (-1, self.rank):
                            sys.stdout.flush()
                            os._exit(17)
                        if last:
                            break
                batches = None
                self._end_workers()
                metrics = self._evaluate(events, signals)
        except EvaluationStopped as stopped:
            raise self._evaluation_stopped(stopped, first_bad) from None
        except (TrainingStopped, NonFiniteLossError, ckpt.CheckpointError):
            raise  # every rank raises these together
        except Exception as error:  # any failure of this rank or of a peer
            raise self._fail(error, first_bad) from error
        finally:
            batches = None
            self._end_workers()
            progress.close()
            if events is not None:
                events.close()
        return TrainResult(self.step, metrics, last_checkpoint)

    def _save_alone(self, first_bad: torch.Tensor) -> Path | None:
        """Rank 0 writes the checkpoint of this step without any collective (the other ranks
        may be gone) and returns its path, or the path if it is on disk already; None on the
        other ranks, before the first step, or when a loss or parameter is not finite or the
        write fails (the checkpoints before stay). Only where the model holds this step's
        weights: between steps, or after a failed collective on the CPU."""
        if not self.is_main or self.step == 0:
            return None
        path = ckpt.checkpoint_path(self.output_dir, self.step)
        if path.exists():
            return path
        if bool((first_bad >= 0).any()):
            return None
        try:
            self._check_parameters_finite()
            ckpt.save_atomic(self.state(), path)
        except (NonFiniteLossError, ckpt.CheckpointError):
            return None
        self.log(f"checkpoint written to {path}")
        return path

    def _fail(self, error: Exception, first_bad: torch.Tensor) -> Exception:
        """The error that ends this rank after `error`, once the steps done are kept.

        Its own failure (not a failed collective) is published for the other ranks
        (distributed.publish_failure). The checkpoint of this step is written by rank 0 when
        the model is known to hold it: after a bad image (met between steps) and, on the CPU,
        after a failed collective (every collective of a step precedes its update; on a GPU
        the queued update may already have run, so the last checkpoint on disk stays).
        Rank 0's message names the rank that failed first and its cause.
        """
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
            self._raise_if_bad(first_bad)
            path = self._save_alone(first_bad)
            return DatasetError(message if path is None else
                                f"{message}; the {self.step} steps done are in {path}: fix or "
                                "remove the file, then continue with --resume")
        if not collective_failed:
            distributed.publish_failure(message)
        path = None
        if isinstance(error, DatasetError) or (collective_failed and self.device.type == "cpu"):
            path = self._save_alone(first_bad)
        failed = distributed.first_failure()
        if failed is not None:
            message = f"rank {failed[0]} failed: {failed[1]}; stopping all ranks"
        elif not collective_failed:
            message = f"rank {self.rank}: {message}"
        if path is not None:
            message += f"; the {self.step} steps done are in {path}; continue with --resume"
        return (DatasetError if isinstance(error, DatasetError)
                else distributed.DistributedError)(message)

    def _evaluation_stopped(self, stopped: EvaluationStopped,
                            first_bad: torch.Tensor) -> TrainingStopped:
        """After a signal during an evaluation: rank 0 keeps the checkpoint of this step and
        prints one line; every rank then ends with TrainingStopped."""
        name = signal.Signals(stopped.signal_number).name
        with StopSignals():  # a second signal must not cut the checkpoint short
            path = self._save_alone(first_bad)
        self.log(f"received {name} during the evaluation at step {self.step}: stopped it, no "
                 "results written"
                 + (f"; checkpoint of step {self.step} in {path}; continue with --resume"
                    if path is not None else ""))
        sys.stdout.flush()
        return TrainingStopped(stopped.signal_number)

    def _end_workers(self) -> None:
        """Ends the training loader's workers (call once no iterator of it is referenced).
        They ignore SIGTERM, so they must not outlive training: at interpreter exit
        multiprocessing ends its child processes with SIGTERM and then waits for them, and a
        script that still holds its Trainer, or an error's traceback that holds the loader's
        iterator, would hang there. With persistent workers torch keeps them in the loader's
        `_iterator`; its _shutdown_workers (what its __del__ calls) ends them through their
        queues, whoever still refers to it. The next train() starts new ones."""
        iterator, self.loader._iterator = self.loader._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def _evaluate(self, events: EventWriter | None,
                  signals: StopSignals | None = None) -> dict[str, float]:
        metrics = self.evaluate(stop=None if signals is None else lambda: signals.received)
        if events is not None and metrics:
            events.scalars(self.step, metrics)
        return metrics

    def _stop_signal(self, received: int, agreeing: bool) -> int:
        """The number of the signal the run stops on after this step, or 0 to go on.

        received: this process's StopSignals.received. One process stops after the step in
        which the signal came: the check reads a Python attribute, free. Several must stop
        after the same step, whichever of them got a signal and in which step (torchrun passes
        a SIGTERM on to every worker, but each gets it where it is; a `kill` may reach one),
        so they agree with an all_reduce(MAX) of their signal numbers. Its answer decides what
        the host does next, a host read that on a GPU waits for the queued work, so they
        agree only at steps where the host reads anyway (agreeing): log steps, just after the
        all_reduce and read of the logged losses (every run.log_period_steps, default 20, and
        the last step), and mid-run evaluation steps, whose evaluation a stop then skips. Not
        every step, and not piggybacked on the step's own collectives: those stay on the
        device, and reading theirs would be the same host read per step. A signal thus stops
        several processes at most log_period_steps steps after it reached any of them.
        """
        if self.world_size == 1:
            return received
        if not agreeing:
            return 0
        flag = torch.tensor([received], dtype=torch.int64, device=self.device)
        distributed.all_reduce_(flag, torch.distributed.ReduceOp.MAX,
                                "all_reduce of the stop request")
        return int(flag.item())  # a host read only at log or evaluation steps (see above)

    def _raise_if_bad(self, first_bad: torch.Tensor) -> None:
        """Stops at the first non-finite loss of any rank (all ranks stop together)."""
        if self.world_size > 1:
            never = torch.iinfo(torch.int64).max
            first_bad = torch.where(first_bad < 0, never, first_bad)
            distributed.all_reduce_(first_bad, torch.distributed.ReduceOp.MIN,
                                    "all_reduce of the non-finite loss check")
            first_bad = torch.where(first_bad == never, -1, first_bad)
        bad = [(step, key) for key, step in zip(LOSS_KEYS, first_bad.tolist(), strict=True)
               if step >= 0]
        if bad:
            step, key = min(bad)  # the first to go wrong; the others follow from it
            raise NonFiniteLossError(
                f"{key} became non-finite at step {step + 1}; stopping (the last "
                f"checkpoint on disk, if any, was written before it)")

    def _report(self, sums: torch.Tensor, first_bad: torch.Tensor, steps: int, seconds: float,
                data_wait: float, events: EventWriter | None) -> None:
        """One log line from the interval's sums (the one host read of the interval), averaged
        over the ranks: with global-batch normalisers, the loss of the global batch."""
        self._raise_if_bad(first_bad)
        sums = sums.clone()
        distributed.all_reduce_(sums, torch.distributed.ReduceOp.SUM,
                                "all_reduce of the logged losses")
        means = (sums / (steps * self.world_size)).tolist()
        lr = self.train_step.lr.current()
        images_per_s = steps * self.schedule.global_batch / max(seconds, 1e-9)
        memory = peak_memory_mib(self.device)
        values = dict(zip(LOSS_KEYS, means, strict=True))
        eta = (self.schedule.total_steps - self.step) * seconds / steps
        self.log(f"step {self.step}/{self.schedule.total_steps} "
                 f"epoch {self.step / self.schedule.steps_per_epoch:.2f} "
                 + " ".join(f"{k[5:]} {v:.4f}" for k, v in values.items())
                 + f" total {sum(means):.4f} lr {lr:.3g} {images_per_s:.2f} img/s "
                 f"data-wait {data_wait / max(seconds, 1e-9):.0%} peak-mem {memory:.0f} MiB "
                 f"eta {int(eta // 60)}m{int(eta % 60):02d}s")
        if events is not None:
            events.scalars(self.step, {**{f"loss/{k}": v for k, v in values.items()},
                                       "loss/total": sum(means), "lr": lr,
                                       "speed/images_per_s": images_per_s,
                                       "speed/data_wait": data_wait / max(seconds, 1e-9),
                                       "memory/peak_mib": memory})
