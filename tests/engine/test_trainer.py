"""Training: exact resumption after a kill and after a signal, checkpoints, the non-finite loss
stop, outputs."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from maskrcnn.config import load_config
from maskrcnn.engine import checkpoint as ckpt
from maskrcnn.engine.distributed import Process
from maskrcnn.engine.hooks import STOP_SIGNALS, NonFiniteLossError, TrainingStopped
from maskrcnn.engine.trainer import Trainer
from maskrcnn.train import build_trainer
from tests.engine.event_files import read_scalars
from tests.engine.signalling import signal_once_started
from tests.tiny import REPO, TINY, run_module, tiny_flags

# 12 epochs of 2 steps (4 images, 2 per step): long enough that a signal sent at the log line
# of step 2 lands mid-run, and the kill at step 9 is in the middle of epoch 4.
SCHEDULE = "solver { epochs: 12 images_per_epoch: 4 warmup_steps: 2 lr_decay_epochs: [6] }"
FINAL = "step_00000024.pt"
# In-process runs: 1 epoch of 2 steps.
SHORT = "solver { epochs: 1 images_per_epoch: 4 warmup_steps: 1 lr_decay_epochs: [1] }"
CPU = Process(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _same_final_state(straight, resumed) -> None:
    """The final checkpoints of two runs hold the same model, momentum and LR schedule."""
    a = ckpt.load(straight / "checkpoints" / FINAL)
    b = ckpt.load(resumed / "checkpoints" / FINAL)
    _states_equal(a["model"], b["model"])
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    assert a["lr"] == b["lr"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
    """(output dir, result) of the tiny run with SCHEDULE, never interrupted."""
    out = tmp_path_factory.mktemp("straight")
    result = run_module("maskrcnn.train", *tiny_flags(out, SCHEDULE), cache_dir=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_killed_and_resumed_run_is_bit_identical(straight, tmp_path, cache):
    """If this fails, --resume does not continue exactly: some state (optimizer momentum, LR
    schedule, sampler position, RNG) is not saved or not restored."""
    out, result = straight
    resumed = tmp_path / "resumed"
    flags = tiny_flags(resumed, SCHEDULE, "run { checkpoint_period_steps: 9 }")
    killed = run_module("maskrcnn.train", *flags, "--debug_exit_after_step=9", cache_dir=cache)
    assert killed.returncode == 17, killed.stderr[-3000:]
    assert ckpt.latest_checkpoint(resumed).name == "step_00000009.pt"
    finished = run_module("maskrcnn.train", *flags, "--resume", cache_dir=cache)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "resumed from" in finished.stdout and "at step 9" in finished.stdout

    _same_final_state(out, resumed)
    # The run's outputs: config, events with every loss, COCO results, AP printed.
    assert (out / "config.pbtxt").is_file() and (out / "coco_results.json").is_file()
    tags = {tag for _, tag, _ in read_scalars(next((out / "events").iterdir()))}
    assert {"loss/loss_mask", "lr", "speed/images_per_s", "bbox/AP", "segm/AP"} <= tags
    assert "box AP" in result.stdout and "mask AP" in result.stdout
    assert (out / "predictions.png").is_file()


def test_sigterm_stops_with_a_checkpoint_and_resume_is_bit_identical(straight, tmp_path, cache):
    """If this fails, SIGTERM mid-run does not stop training after the step with a checkpoint,
    one line and exit status 143 (it kills the run, prints a traceback, takes a second signal
    as a reason to abort, or goes on training), or --resume from that checkpoint does not end
    where the uninterrupted run did."""
    out, _ = straight
    preempted = tmp_path / "preempted"
    env = {**os.environ, "MASKRCNN_CACHE": str(cache), "CUDA_VISIBLE_DEVICES": ""}

    def terminate_twice(process):
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGINT)  # while stopping: ignored

    result, _ = signal_once_started(["-m", "maskrcnn.train", *tiny_flags(preempted, SCHEDULE)],
                                    env, terminate_twice)
    assert result.returncode == 143, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (path,) = ckpt.checkpoints(preempted)
    step = ckpt.load(path)["step"]
    assert 2 <= step < 24  # after the step the signal came in, mid-run
    stop_lines = [line for line in result.stdout.splitlines() if "received" in line]
    assert stop_lines == [f"received SIGTERM: stopped after step {step}, checkpoint written "
                          f"to {path}; continue with --resume"]
    assert not (preempted / "coco_results.json").exists()  # no evaluation on the way out

    finished = run_module("maskrcnn.train", *tiny_flags(preempted, SCHEDULE), "--resume",
                          cache_dir=cache)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"resumed from {path} at step {step}" in finished.stdout
    _same_final_state(out, preempted)


def _unexpected(number: int, frame) -> None:
    raise AssertionError(f"{signal.Signals(number).name} reached the handler from before "
                         "training")


@pytest.fixture
def outer_handlers():
    """Handlers that fail the test, rather than end pytest, on a signal that training does not
    catch; the ones from before are put back after."""
    previous = {number: signal.signal(number, _unexpected) for number in STOP_SIGNALS}
    yield
    for number, handler in previous.items():
        signal.signal(number, handler)


def _short_trainer(output_dir, lines: list[str]) -> Trainer:
    config = load_config("shapes", [*TINY, SHORT, f"run {{ output_dir: '{output_dir}' }}"])
    return build_trainer(config, CPU, log=lines.append)


def _signal_in_step(trainer: Trainer, step: int, number: int) -> None:
    """Sends this process `number` while trainer computes step `step` (0-based)."""
    model = trainer.model

    def forward(*inputs):
        if trainer.step == step:
            os.kill(os.getpid(), number)  # Python runs the handler before the next line
        return model(*inputs)

    trainer.train_step.forward = forward


def test_a_signal_stops_after_its_step_ignores_a_second_and_restores_handlers(
        tmp_path, cache, monkeypatch, outer_handlers):
    """If this fails, a signal does not stop training right after the step it came in (it
    waits for a log step, or kills the process), a second signal during the checkpoint write
    interrupts it or changes the exit status, or training leaves its signal handlers behind."""
    lines = []
    trainer = _short_trainer(tmp_path, lines)
    _signal_in_step(trainer, 0, signal.SIGINT)  # step 1 of 2: no log line, no checkpoint due
    save = ckpt.save_atomic

    def save_interrupted(state, path):
        os.kill(os.getpid(), signal.SIGTERM)
        return save(state, path)

    monkeypatch.setattr(ckpt, "save_atomic", save_interrupted)
    with pytest.raises(TrainingStopped) as stopped:
        trainer.train()
    assert stopped.value.exit_code == 130
    path = tmp_path / "checkpoints" / "step_00000001.pt"
    assert lines[-1] == (f"received SIGINT: stopped after step 1, checkpoint written to {path}; "
                         "continue with --resume")
    assert ckpt.checkpoints(tmp_path) == [path] and ckpt.load(path)["step"] == 1
    assert all(signal.getsignal(number) is _unexpected for number in STOP_SIGNALS)


def test_a_run_stopped_after_its_last_step_only_evaluates_when_resumed(tmp_path, cache,
                                                                       outer_handlers):
    """If this fails, a signal in the last step still runs the final evaluation before
    stopping (a scheduler's grace period may not cover it), or --resume from that final
    checkpoint never evaluates, so the run never reports its AP."""
    trainer = _short_trainer(tmp_path, [])
    _signal_in_step(trainer, 1, signal.SIGTERM)
    with pytest.raises(TrainingStopped):
        trainer.train()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000002.pt"
    assert not (tmp_path / "coco_results.json").exists()

    resumed = _short_trainer(tmp_path, [])
    assert resumed.resume() == ckpt.latest_checkpoint(tmp_path)
    result = resumed.train()
    assert result.step == 2 and "bbox/AP" in result.metrics
    assert (tmp_path / "coco_results.json").is_file()


def test_data_loader_workers_outlive_stop_signals(tmp_path, cache):
    """If this fails, a SIGTERM or SIGINT that reaches every process (torchrun signals each
    rank's process group, SLURM every process of the job) ends the DataLoader workers, and the
    steps the ranks still take before they agree to stop fail for want of data."""
    config = load_config("shapes", [*TINY, SHORT, f"run {{ output_dir: '{tmp_path}' }}",
                                    "data { num_workers: 1 }"])
    trainer = build_trainer(config, CPU, log=lambda text: None)
    trainer.sampler.set_epoch(0)
    batches = iter(trainer.loader)
    next(batches)
    (worker,) = batches._workers
    for number in STOP_SIGNALS:
        os.kill(worker.pid, number)
    worker.join(timeout=1)  # returns at once if the signal ended it
    assert worker.is_alive()
    assert next(batches).images.shape[0] == 2


def test_non_finite_loss_stops_naming_the_term_and_keeps_the_last_checkpoint(tmp_path, cache):
    """If this fails, a NaN loss trains on silently, is not named, or a checkpoint is written
    from NaN parameters."""
    config = load_config("shapes", [*TINY, SCHEDULE, f"run {{ output_dir: '{tmp_path}' "
                                    "checkpoint_period_steps: 2 }"])
    trainer = build_trainer(config, CPU, log=lambda text: None)
    model = trainer.model

    def forward(*inputs):
        losses = model(*inputs)
        if trainer.step == 2:  # the third step (0-based 2) goes wrong
            losses["loss_mask"] = losses["loss_mask"] * float("nan")
        return losses

    trainer.train_step.forward = forward
    with pytest.raises(NonFiniteLossError, match="loss_mask became non-finite at step 3"):
        trainer.train()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000002.pt"
    state = ckpt.load(ckpt.latest_checkpoint(tmp_path))
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("run", ["precision: BF16", "precision: FP16", "channels_last: true",
                                 "precision: FP32"])
def test_training_step_in_each_precision_and_layout(tmp_path, cache, run):
    """If this fails, a precision or memory-format option breaks the training step (a dtype
    mismatch under autocast, the fp16 loss scaler, channels_last inputs)."""
    config = load_config("shapes", [*TINY, f"run {{ output_dir: '{tmp_path}' {run} }}"])
    trainer = build_trainer(config, CPU, log=lambda text: None)
    before = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
    trainer.sampler.set_epoch(0)
    batch = next(iter(trainer.loader))
    after = [p for p in trainer.model.parameters() if p.requires_grad]
    # fp16's dynamic loss scaling starts high and skips the steps whose scaled gradients
    # overflow (halving the scale each time), so the first update may come a few steps later.
    for _ in range(4 if "FP16" in run else 1):
        losses = trainer.train_step(batch)
        assert losses.dtype == torch.float32 and losses.shape == (5,)
        assert torch.isfinite(losses).all()
        assert all(torch.isfinite(p).all() for p in after)
        if any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)):
            break
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_a_script_that_keeps_its_trainer_exits(tmp_path, cache):
    """If this fails, a Python script that trains with data workers and still holds its
    Trainer hangs at exit: the workers ignore SIGTERM (the training process acts on it), and
    multiprocessing ends its children at exit with SIGTERM and then waits for them."""
    script = (
        "import torch\n"
        "from maskrcnn.config import load_config\n"
        "from maskrcnn.engine.distributed import Process\n"
        "from maskrcnn.train import build_trainer\n"
        "from tests.tiny import TINY\n"
        f"config = load_config('shapes', [*TINY, {SHORT!r}, 'data {{ num_workers: 2 }}',"
        f" \"run {{ output_dir: '{tmp_path}' }}\"])\n"
        "process = Process(0, 1, 0, torch.device('cpu'))\n"
        "trainer = build_trainer(config, process, log=lambda text: None)\n"
        "trainer.train()\n"
        "print('trained')\n")
    env = {**os.environ, "MASKRCNN_CACHE": str(cache), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, timeout=300,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "trained" in done.stdout, done.stderr[-3000:]
