"""Training: exact resumption after a kill, checkpoints, the non-finite loss stop, outputs."""

import pytest
import torch

from maskrcnn.config import load_config
from maskrcnn.engine import checkpoint as ckpt
from maskrcnn.engine.events import read_scalars
from maskrcnn.engine.trainer import NonFiniteLossError, Trainer
from tests.tiny import TINY, run_module, tiny_flags

# 3 epochs of 2 steps (4 images, 2 per step): the kill at step 3 is in the middle of epoch 1.
SCHEDULE = "solver { epochs: 3 images_per_epoch: 4 warmup_steps: 2 lr_decay_epochs: [2] }"


def _states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_killed_and_resumed_run_is_bit_identical(tmp_path, cache):
    """If this fails, --resume does not continue exactly: some state (optimizer momentum, LR
    schedule, sampler position, RNG) is not saved or not restored."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run_module("maskrcnn.train", *tiny_flags(straight, SCHEDULE), cache_dir=cache)
    assert result.returncode == 0, result.stderr[-3000:]

    flags = tiny_flags(resumed, SCHEDULE, "run { checkpoint_period_steps: 3 }")
    killed = run_module("maskrcnn.train", *flags, "--debug_exit_after_step=3", cache_dir=cache)
    assert killed.returncode == 17, killed.stderr[-3000:]
    assert ckpt.latest_checkpoint(resumed).name == "step_00000003.pt"
    finished = run_module("maskrcnn.train", *flags, "--resume", cache_dir=cache)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "resumed from" in finished.stdout and "at step 3" in finished.stdout

    a = ckpt.load(straight / "checkpoints" / "step_00000006.pt")
    b = ckpt.load(resumed / "checkpoints" / "step_00000006.pt")
    _states_equal(a["model"], b["model"])
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    assert a["lr_scheduler"] == b["lr_scheduler"]
    # The run's outputs: config, events with every loss, COCO results, AP printed.
    assert (straight / "config.pbtxt").is_file() and (straight / "coco_results.json").is_file()
    tags = {tag for _, tag, _ in read_scalars(next((straight / "events").iterdir()))}
    assert {"loss/loss_mask", "lr", "speed/images_per_s", "bbox/AP", "segm/AP"} <= tags
    assert "box AP" in result.stdout and "mask AP" in result.stdout
    assert (straight / "predictions.png").is_file()


def test_non_finite_loss_stops_naming_the_term_and_keeps_the_last_checkpoint(tmp_path, cache):
    """If this fails, a NaN loss trains on silently, is not named, or a checkpoint is written
    from NaN parameters."""
    config = load_config("shapes", [*TINY, SCHEDULE, f"run {{ output_dir: '{tmp_path}' "
                                    "checkpoint_period_steps: 2 }"])
    trainer = Trainer(config, torch.device("cpu"), log=lambda text: None)
    model = trainer.model

    def forward(*inputs):
        losses = model(*inputs)
        if trainer.step == 2:  # the third step (0-based 2) goes wrong
            losses["loss_mask"] = losses["loss_mask"] * float("nan")
        return losses

    trainer.forward = forward
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
    trainer = Trainer(config, torch.device("cpu"), log=lambda text: None)
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
