"""The LR schedule and the optimiser's parameter groups."""

import pytest
import torch

from maskrcnn.config import load_config
from maskrcnn.engine.solver import build_optimizer, make_schedule
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
    optimizer = build_optimizer(model, config, make_schedule(config, 256, 64))
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
