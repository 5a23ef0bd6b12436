"""The GPU's training and inference steps never wait for the host: they are run here on the CPU
along the GPU's code path (Runtime.gpu_path: static sizes, NMS without host reads) under
HostSyncCounter, which records every op that synchronises on CUDA, inside our own ops too."""

import pytest
import torch

from maskrcnn.bench.host_sync import HostSyncCounter
from maskrcnn.bench.step import bench_step, inference_step
from maskrcnn.bench.synthetic import synthetic_batch
from maskrcnn.config import load_config
from maskrcnn.model import roi_heads
from maskrcnn.runtime import Runtime
from tests.tiny import TINY

# Clipping on, so that the whole optimiser step is covered.
CONFIG = [*TINY, "solver { grad_clip_norm: 10 }"]


def _trainer(runtime: Runtime):
    return bench_step(load_config("shapes", CONFIG), torch.device("cpu"), runtime)


def _batch():
    return synthetic_batch(load_config("shapes", CONFIG), seed=1)


@pytest.mark.parametrize("nms", ["torch", "triton"])
def test_gpu_training_step_never_waits_for_the_host(nms):
    """If this fails, an op that makes the host wait for a GPU (named below with the line that
    called it) is back in the training step: forward, backward, gradient clipping, SGD and the
    LR schedule, with either synchronisation-free NMS (Triton interpreted here)."""
    trainer = _trainer(Runtime.gpu_path(nms))
    batch = _batch()
    with HostSyncCounter() as syncs:
        losses = trainer(batch)
    assert not syncs.found, "host synchronisations:\n" + syncs.report()
    assert torch.isfinite(losses).all()


@pytest.mark.parametrize("nms", ["torch", "triton"])
def test_gpu_inference_never_waits_for_the_host(nms):
    """If this fails, detection (proposals, class-wise NMS, the mask head) or mask pasting reads
    the device from the host on the GPU's path."""
    trainer = _trainer(Runtime.gpu_path(nms))
    trainer.model.eval()
    step = inference_step(trainer, _batch())
    with HostSyncCounter() as syncs:
        out = step()
    assert not syncs.found, "host synchronisations:\n" + syncs.report()
    assert out["masks"].shape[-2:] == _batch().images.shape[-2:]


def test_a_reintroduced_nonzero_is_caught_with_its_line(monkeypatch):
    """If this fails, the counter misses a `.nonzero()` added to the step (so the two tests
    above could pass with synchronisations in it), or names the wrong source line."""
    original = roi_heads.mask_targets

    def with_nonzero(gt_masks, gt_boxes, rois, image_index, matched, size):
        matched.nonzero()  # the reintroduced synchronisation
        return original(gt_masks, gt_boxes, rois, image_index, matched, size)

    monkeypatch.setattr(roi_heads, "mask_targets", with_nonzero)
    trainer = _trainer(Runtime.gpu_path("torch"))
    with HostSyncCounter() as syncs:
        trainer(_batch())
    assert [s.op for s in syncs.found] == ["aten.nonzero.default"]
    assert "test_host_sync.py" in syncs.found[0].where
    assert "matched.nonzero()" in syncs.found[0].where


def test_the_cpu_path_is_seen_inside_our_ops():
    """If this fails, the counter does not look inside our torch.library ops (NMS) or misses
    host reads by Tensor methods: the CPU's own path (torchvision's nms per cell, slots
    trimmed with host reads) must show both."""
    trainer = _trainer(Runtime.for_device("cpu"))
    with HostSyncCounter() as syncs:
        trainer(_batch())
    ops = {s.op for s in syncs.found}
    assert {"aten.nonzero.default", "torchvision.nms.default", "Tensor.tolist"} <= ops
    assert any("maskrcnn/ops/nms.py" in s.where for s in syncs.found)
    # The wrapped methods are restored on exit.
    assert "wrapper" not in torch.Tensor.tolist.__qualname__


def test_each_kind_of_synchronisation_is_recognised():
    """If this fails, one of the synchronising ops the issue lists slips through (or a
    harmless variant of one, like repeat_interleave with output_size, is counted)."""
    x = torch.arange(6.0)
    mask = x > 2
    repeats = torch.tensor([1, 2])

    def run(fn):
        with HostSyncCounter() as syncs:
            fn()
        return [s.op for s in syncs.found]

    assert run(lambda: x[mask]) == ["aten.index.Tensor"]
    assert run(lambda: x.clone().index_put_((mask,), torch.tensor(0.0))) == [
        "aten.index_put_.default"]
    for read in (lambda: x.sum().item(), lambda: bool(x.any()), lambda: int(x.sum())):
        assert run(read) == ["aten._local_scalar_dense.default"]
    assert run(lambda: x.tolist()) == ["Tensor.tolist"]
    assert run(lambda: torch.unique(x)) == ["aten._unique2.default"]
    assert run(lambda: torch.bincount(repeats)) == ["aten.bincount.default"]
    assert run(lambda: torch.equal(x, x)) == ["aten.equal.default"]
    assert run(lambda: torch.masked_select(x, mask)) == ["aten.masked_select.default"]
    assert run(lambda: x[:2].repeat_interleave(repeats)) == ["aten.repeat_interleave.Tensor"]
    assert run(lambda: x[:2].repeat_interleave(repeats, output_size=3)) == []
    assert run(lambda: x[torch.tensor([0, 2])]) == []
    assert run(lambda: x.nonzero_static(size=6)) == []
