"""The training step is one object, built from a config without data, shared by the trainer,
the benchmark and the GPU checks."""

import importlib
import pkgutil

import torch

import maskrcnn
from maskrcnn.bench.step import bench_step
from maskrcnn.bench.synthetic import synthetic_batch
from maskrcnn.config import load_config
from maskrcnn.engine.step import TrainStep
from maskrcnn.engine.trainer import Trainer
from tests.tiny import TINY


def test_trainer_and_benchmark_build_the_same_step(tmp_path, cache):
    """If this fails, the benchmark (and tools/gpu_check.py, which calls bench_step) times a
    step built differently from the one training runs: another class, a subclass with
    copied set-up lines, or a step that cannot be built without a dataset."""
    for module in pkgutil.walk_packages(maskrcnn.__path__, "maskrcnn."):
        importlib.import_module(module.name)
    assert not TrainStep.__subclasses__() and not Trainer.__subclasses__()
    config = load_config("shapes", [*TINY, f"run {{ output_dir: '{tmp_path}' }}"])
    bench = bench_step(config, torch.device("cpu"))
    trainer = Trainer(config, torch.device("cpu"), log=lambda text: None)
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
