"""The LR schedule (also as a device tensor), the optimiser and its parameter groups."""

import pytest
import torch

from maskrcnn.config import load_config
from maskrcnn.engine import solver
from maskrcnn.engine.solver import SGD, LearningRate, build_optimizer, make_schedule
from maskrcnn.model.maskrcnn import build_model


def _config(*overrides):
    return load_config("shapes", ["solver { base_lr_per_image: 0.01 warmup_steps: 10 "
                                  "warmup_start_factor: 0.1 epochs: 12 images_per_epoch: 800 "
                                  "lr_decay_epochs: [8, 11] }", "run { images_per_gpu: 4 }",
                                  *overrides])


def test_schedule_counts_epochs_in_images_and_scales_lr_with_the_global_batch():
    """If this fails, the LR or the decay points do not follow the config's scaling rule."""
    s = make_schedule(_config("run { num_gpus: 2 }"), train_images=256, steps_per_epoch=100)
    assert s.global_batch == 8 and s.base_lr == pytest.approx(0.08)
    assert s.total_steps == 1200 and s.decay_steps == (800, 1100)
    assert s.lr_factor(0) == pytest.approx(0.1)
    assert s.lr_factor(5) == pytest.approx(0.1 * 0.5 + 0.5)
    assert s.lr_factor(10) == 1.0 and s.lr_factor(799) == 1.0
    assert s.lr_factor(800) == pytest.approx(0.1) and s.lr_factor(1100) == pytest.approx(0.01)


def test_images_per_epoch_zero_means_the_training_set():
    s = make_schedule(_config("solver { images_per_epoch: 0 }"), train_images=256,
                      steps_per_epoch=64)
    assert s.images_per_epoch == 256 and s.decay_steps == (512, 704)


def test_no_weight_decay_on_norms_and_biases():
    """If this fails, weight decay pulls biases or group-norm scales towards zero."""
    config = _config("model { backbone { norm: GROUP_NORM } }", "solver { weight_decay: 0.5 }")
    model = build_model(config)
    optimizer = build_optimizer(model, config, make_schedule(config, 256, 64),
                                torch.device("cpu"))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"])
    assert any(names[id(p)].endswith("bn1.weight") for p in no_decay["params"])
    assert any(names[id(p)].endswith("fc6.bias") for p in no_decay["params"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)
    assert optimizer.defaults["momentum"] == pytest.approx(0.9)
    assert isinstance(optimizer, torch.optim.SGD)


@pytest.mark.parametrize("warmup", [0, 1, 10])
def test_device_lr_reproduces_the_schedule_exactly(warmup):
    """If this fails, the LR a graphed or compiled step reads from its device tensor is not
    bit for bit the schedule's (base LR x lr_factor) at some step: warmup, decay or the end."""
    s = make_schedule(_config(f"solver {{ warmup_steps: {warmup} }}"), 256, steps_per_epoch=10)
    lr = LearningRate(s, torch.device("cpu"))
    for step in range(s.total_steps + 2):
        assert lr.value().item() == s.base_lr * s.lr_factor(step), step
        assert lr.value().dtype == torch.float64
        lr.advance()
    lr.set_step(85)
    assert lr.current() == s.base_lr * s.lr_factor(85)
    assert lr.state_dict() == {"step": 85, "base_lr": s.base_lr}


def _toy_params():
    torch.manual_seed(0)
    return [torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_sgd_matches_torch_sgd_with_the_device_lr(fused, monkeypatch):
    """If this fails, our graph-safe SGD does not do torch.optim.SGD's update (momentum,
    weight decay on the first group only, the LR of each step) to float32 rounding, on the
    CPU's fused path or the foreach path that CUDA takes."""
    monkeypatch.setattr(solver, "_fused_on", lambda params: fused)
    schedule = make_schedule(_config(), 256, steps_per_epoch=2)
    ours, theirs = _toy_params(), _toy_params()
    groups = lambda ps: [{"params": ps[:1], "weight_decay": 0.01},  # noqa: E731
                         {"params": ps[1:], "weight_decay": 0.0}]
    sgd = SGD(groups(ours), LearningRate(schedule, torch.device("cpu")), momentum=0.9)
    reference = torch.optim.SGD(groups(theirs), lr=schedule.base_lr, momentum=0.9)
    for step in range(12):
        torch.manual_seed(step)
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        for group in reference.param_groups:
            group["lr"] = schedule.base_lr * schedule.lr_factor(step)
        sgd.step()
        reference.step()
        sgd.lr.advance()
        for p, q in zip(ours, theirs, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_sgd_keeps_its_tensors_in_place_across_steps():
    """If this fails, a step replaces a gradient, momentum buffer or parameter by a new tensor
    (or sets a gradient to None): a CUDA graph replaying the step would then update memory
    nobody reads any more."""
    params = _toy_params()
    sgd = SGD([{"params": params, "weight_decay": 0.0}],
              LearningRate(make_schedule(_config(), 256, 2), torch.device("cpu")), momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    before = [(p.data_ptr(), p.grad.data_ptr(), sgd.state[p]["momentum_buffer"].data_ptr())
              for p in params]
    for _ in range(3):
        for p in params:
            p.grad.add_(1.0)
        sgd.step()
        sgd.zero_grad()
    after = [(p.data_ptr(), p.grad.data_ptr(), sgd.state[p]["momentum_buffer"].data_ptr())
             for p in params]
    assert before == after
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)
    with pytest.raises(ValueError, match="set_to_none"):
        sgd.zero_grad(set_to_none=True)


def test_sgd_checkpoint_round_trip_keeps_momentum():
    """If this fails, resuming loses the momentum buffers, or a checkpoint written before the
    first step (no buffers in torch's format) leaves the optimizer unable to step."""
    schedule = make_schedule(_config(), 256, 2)
    params = _toy_params()
    sgd = SGD([{"params": params, "weight_decay": 0.0}],
              LearningRate(schedule, torch.device("cpu")), momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    sgd.step()
    state = sgd.state_dict()
    fresh = SGD([{"params": _toy_params(), "weight_decay": 0.0}],
                LearningRate(schedule, torch.device("cpu")), momentum=0.9)
    fresh.load_state_dict(state)
    for a, b in zip(sgd.state.values(), fresh.state.values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    torch_format = {"state": {}, "param_groups": state["param_groups"]}
    fresh.load_state_dict(torch_format)
    assert all(torch.count_nonzero(s["momentum_buffer"]) == 0 for s in fresh.state.values())
