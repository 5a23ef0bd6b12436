"""Each hook of the training loop alone, driven by a stub trainer (no model, no data)."""

import io
import math
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from maskrcnn.engine import hooks
from maskrcnn.engine.hooks import (
    STOP_SIGNALS,
    AbruptExit,
    Checkpoints,
    Evaluation,
    LogLines,
    LossSums,
    NonFiniteLossError,
    ProgressBar,
    StopOnSignal,
    TrainingStopped,
)
from tests.engine.event_files import read_scalars

CPU = torch.device("cpu")


class StubTrainer:
    """What the hooks read of a Trainer: 3 epochs of 2 steps of 4 images, one process."""

    def __init__(self, output_dir: Path, *hook_list, total_steps: int = 6,
                 evaluator=None):
        self.schedule = SimpleNamespace(total_steps=total_steps, steps_per_epoch=2,
                                        global_batch=4, base_lr=0.02)
        self.device, self.rank, self.world_size, self.is_main = CPU, 0, 1, True
        self.output_dir = output_dir
        self.train_step = SimpleNamespace(lr=SimpleNamespace(current=lambda: 0.02))
        self.losses = LossSums(CPU, 1)
        self.hooks = [self.losses, *hook_list]
        self.evaluator = evaluator
        self.step, self.step_losses = 0, None
        self.data_wait_s = self.paused_s = 0.0
        self.metrics = {}
        self.lines, self.saved = [], []

    def log(self, text: str) -> None:
        self.lines.append(text)

    def save_checkpoint(self, stop_signal: int = 0) -> None:
        self.saved.append((self.step, stop_signal))

    def start(self) -> "StubTrainer":
        for hook in self.hooks:
            hook.before_train(self)
        return self

    def run(self, steps: int, losses=lambda step: [0.5, 1.0, 1.5, 2.0, 2.5]) -> None:
        """`steps` steps with these losses (of the 0-based step), each then after_step."""
        for _ in range(steps):
            self.step_losses = torch.tensor(losses(self.step), dtype=torch.float32)
            self.step += 1
            for hook in self.hooks:
                hook.after_step(self)


def test_loss_sums_name_the_first_non_finite_term_and_step(tmp_path):
    """If this fails, a NaN loss is not noticed, is named with the wrong term or step (the
    first to go wrong is the cause; later ones follow from it), or the sums read in the log
    are not the means of the interval."""
    trainer = StubTrainer(tmp_path).start()
    trainer.run(2)
    assert trainer.losses.take_means(2) == [0.5, 1.0, 1.5, 2.0, 2.5]
    assert trainer.losses.sums.tolist() == [0.0] * 5  # the next interval starts from 0
    nan = float("nan")
    trainer.run(4, losses=lambda step: ([1, 1, 1, 1, nan] if step == 2 else
                                        [1, math.inf, 1, 1, nan] if step == 3 else [1] * 5))
    assert trainer.losses.any_bad()
    with pytest.raises(NonFiniteLossError, match=r"^loss_mask became non-finite at step 3;"):
        trainer.losses.check()


def test_log_lines_at_the_period_and_the_last_step_with_events(tmp_path):
    """If this fails, log lines come at other steps than every period and the last, their
    losses are not the interval's means, or the events lack the logged values or the
    metrics published to them."""
    log = LogLines(period=4)
    trainer = StubTrainer(tmp_path, log).start()
    trainer.run(6, losses=lambda step: [step] * 5)  # steps 1..6 see losses 0..5
    log.publish(6, {"bbox/AP": 0.25})
    log.close()
    steps = [line.split()[1] for line in trainer.lines if line.startswith("step ")]
    assert steps == ["4/6", "6/6"]
    assert trainer.lines[0].startswith("training 6 steps of 4 images (3 epochs of 2 steps)")
    assert " rpn_cls 1.5000 " in trainer.lines[1]  # the mean of 0, 1, 2, 3
    assert " rpn_cls 4.5000 " in trainer.lines[2]  # of 4, 5
    scalars = read_scalars(next((tmp_path / "events").iterdir()))
    assert (4, "loss/loss_mask", 1.5) in scalars and (6, "loss/total", 22.5) in scalars
    assert (6, "bbox/AP", 0.25) in scalars


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_counts_the_steps_on_a_terminal(tmp_path, monkeypatch):
    """If this fails, the bar does not start at a resumed run's step or misses steps."""
    monkeypatch.setattr(hooks.sys, "stderr", Terminal())
    bar = ProgressBar()
    trainer = StubTrainer(tmp_path, bar)
    trainer.step = 2
    trainer.start().run(3)
    assert (bar.bar.n, bar.bar.total) == (5, 6)
    bar.close()


def test_a_signal_stops_after_its_step_with_a_checkpoint(tmp_path):
    """If this fails, a SIGTERM during a step does not stop the run right after it, the stop
    has no checkpoint naming the signal, or the handlers from before training are not put
    back."""
    stop = StopOnSignal()
    before = [signal.getsignal(number) for number in STOP_SIGNALS]
    trainer = StubTrainer(tmp_path, stop).start()
    trainer.run(2)
    assert trainer.saved == [] and stop.received() == 0
    os.kill(os.getpid(), signal.SIGTERM)  # recorded, not acted on
    with pytest.raises(TrainingStopped) as stopped:
        trainer.run(1)
    stop.close()
    assert stopped.value.exit_code == 143 and trainer.saved == [(3, signal.SIGTERM)]
    assert [signal.getsignal(number) for number in STOP_SIGNALS] == before


def test_checkpoints_at_their_periods_and_the_last_step(tmp_path):
    """If this fails, a checkpoint is missing at a step or epoch period or at the end, or
    written at other steps."""
    trainer = StubTrainer(tmp_path, Checkpoints(every_steps=3, every_epochs=2), total_steps=7)
    trainer.start().run(7)
    assert [step for step, _ in trainer.saved] == [3, 4, 6, 7]


def test_evaluation_mid_run_and_after_training(tmp_path):
    """If this fails, an evaluation runs at the wrong epochs (or twice at the end), its time
    counts as training time, its metrics miss the events, the run's metrics are not the
    final evaluation's, or a signal cannot stop it."""
    published, calls = [], []

    def evaluator(stop):
        calls.append(stop)
        return {"bbox/AP": 0.1 * len(calls)}

    def stop():
        return 0

    evaluation = Evaluation(every_epochs=1, publish=lambda step, m: published.append(step),
                            stop=stop)
    trainer = StubTrainer(tmp_path, evaluation, evaluator=evaluator).start()
    trainer.run(6)
    assert published == [2, 4] and trainer.paused_s > 0 and calls == [stop, stop]
    evaluation.after_train(trainer)
    assert published == [2, 4, 6] and trainer.metrics == {"bbox/AP": pytest.approx(0.3)}


def test_abrupt_exit_ends_only_its_rank_after_its_step(tmp_path, monkeypatch):
    """If this fails, --debug_exit_after_step ends the process at another step or rank, or
    not at all (the resume tests would then test nothing)."""
    ended = []
    monkeypatch.setattr(hooks.os, "_exit", ended.append)
    StubTrainer(tmp_path, AbruptExit(2, rank=1)).start().run(3)
    assert ended == []
    StubTrainer(tmp_path, AbruptExit(2)).start().run(3)
    assert ended == [17]
