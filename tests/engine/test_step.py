"""The training step is one object, built from a config without data, shared by the trainer,
the benchmark and the GPU checks."""

import importlib
import pkgutil

import pytest
import torch

import maskrcnn
from maskrcnn.bench.step import bench_step
from maskrcnn.bench.synthetic import synthetic_batch
from maskrcnn.config import load_config
from maskrcnn.engine import solver
from maskrcnn.engine.distributed import Process
from maskrcnn.engine.step import LOSS_KEYS, TrainStep, model_inputs
from maskrcnn.engine.trainer import Trainer
from maskrcnn.runtime import Runtime
from maskrcnn.train import build_trainer
from tests.tiny import TINY


def test_trainer_and_benchmark_build_the_same_step(tmp_path, cache):
    """If this fails, the benchmark (and maskrcnn-check, which calls bench_step) times a
    step built differently from the one training runs: another class, a subclass with
    copied set-up lines, or a step that cannot be built without a dataset."""
    for module in pkgutil.walk_packages(maskrcnn.__path__, "maskrcnn."):
        importlib.import_module(module.name)
    assert not TrainStep.__subclasses__() and not Trainer.__subclasses__()
    config = load_config("shapes", [*TINY, f"run {{ output_dir: '{tmp_path}' }}"])
    bench = bench_step(config, torch.device("cpu"))
    trainer = build_trainer(config, Process(0, 1, 0, torch.device("cpu")),
                            log=lambda text: None)
    assert type(bench) is TrainStep and type(trainer.train_step) is TrainStep
    assert trainer.model is trainer.train_step.model
    # The same seed and config: the same initial weights, and one step changes them alike.
    batch = synthetic_batch(config, seed=1)
    losses = []
    for step in (bench, trainer.train_step):
        torch.manual_seed(0)
        losses.append(step(batch))
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for a, b in zip(bench.model.parameters(), trainer.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _tiny_step(runtime: Runtime, *overrides: str) -> TrainStep:
    config = load_config("shapes", [*TINY, *overrides])
    return bench_step(config, torch.device("cpu"), runtime)


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"),
                    reason="this torch's Dynamo cannot trace Tensor.backward (torch >= 2.14)")
def test_whole_train_step_compiles_as_one_graph_and_matches_eager(monkeypatch):
    """If this fails, something in the training step (forward, backward, clipping, the SGD
    update or the LR) breaks the graph: a host read, a Python float taken from a tensor, an
    optimizer step torch.compile cannot trace. Such a step could not be recorded as one CUDA
    graph either. The compiled steps must also train exactly as the eager ones: 3 steps,
    warmup and an LR decay included, the same losses, weights and LR."""
    # The eager side takes the foreach SGD that a GPU runs and compiling traces, not the
    # CPU's fused kernel (other rounding; tests/engine/test_solver.py checks both paths).
    monkeypatch.setattr(solver, "_fused_on", lambda params: False)
    overrides = ("solver { grad_clip_norm: 1.0 warmup_steps: 2 lr_decay_epochs: [1] "
                 "images_per_epoch: 4 }",)
    eager, compiled = (_tiny_step(Runtime.gpu_path(), *overrides) for _ in range(2))
    function = torch.compile(compiled.step_function, fullgraph=True, backend="aot_eager")
    batch = synthetic_batch(eager.config, seed=1)
    inputs = model_inputs(batch, eager.config.run.channels_last)
    for step in range(3):
        torch.manual_seed(step)
        expected = eager.step_function(*inputs)
        torch.manual_seed(step)
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            got = function(*inputs)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for a, b in zip(eager.model.parameters(), compiled.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert int(compiled.lr.step) == 3 and compiled.lr.current() == eager.lr.current()


def test_train_step_returns_its_losses_and_follows_the_schedule():
    """If this fails, a step does not advance the LR's device counter once, leaves gradients
    set to None or non-zero after it (a graph replay would then read stale or missing
    gradients), or returns other than the five finite losses."""
    step = _tiny_step(Runtime.gpu_path())
    batch = synthetic_batch(step.config, seed=1)
    for expected_step in (1, 2):
        losses = step(batch)
        assert losses.shape == (len(LOSS_KEYS),) and torch.isfinite(losses).all()
        assert int(step.lr.step) == expected_step
        assert all(p.grad is not None and not p.grad.any() for p in step.parameters)
    assert step.lr.current() == step.schedule.base_lr * step.schedule.lr_factor(2)
