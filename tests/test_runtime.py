"""Runtime: the per-device choices, made once and passed to the builders."""

import pytest
import torch

from maskrcnn.config import load_config
from maskrcnn.engine import distributed
from maskrcnn.model.maskrcnn import build_model
from maskrcnn.model.sampling import global_batch_keys, local_counts
from maskrcnn.runtime import Runtime
from tests.tiny import TINY


def test_choices_per_device():
    """If this fails, a CPU stops trimming padded slots or using torchvision's NMS (its
    fastest path), a GPU trims (a host read per step) or uses an NMS that synchronises, or a
    misspelt NMS method is accepted."""
    cpu = Runtime.for_device("cpu")
    assert cpu.trim_slots and cpu.nms == "per_cell" and cpu.world_size == 1
    gpu = Runtime.for_device("cuda", rank=3, world_size=8)
    assert not gpu.trim_slots and gpu.nms in ("triton", "torch")
    assert (gpu.rank, gpu.world_size) == (3, 8)
    assert Runtime.gpu_path() == Runtime(trim_slots=False, nms="torch")
    with pytest.raises(ValueError, match="unknown NMS method 'fast'"):
        Runtime(trim_slots=False, nms="fast")


def test_builders_take_every_choice_from_the_runtime():
    """If this fails, a module is built with other choices than its runtime's: slot trimming,
    NMS method, frozen-norm folding, or (with several processes) the global batch's sampling
    keys and loss normalisers summed over the ranks, which the trainer once set on the
    modules after construction."""
    config = load_config("shapes", TINY)
    one = build_model(config)
    assert one.trim_slots and one.roi_heads.trim_slots
    assert one.rpn.nms_method == one.roi_heads.nms_method == "per_cell"
    assert one.rpn.normalizers is local_counts and one.roi_heads.normalizers is local_counts
    ranked = build_model(config, Runtime.gpu_path("triton").replace(rank=1, world_size=2))
    assert not ranked.trim_slots and not ranked.roi_heads.trim_slots
    assert ranked.rpn.nms_method == ranked.roi_heads.nms_method == "triton"
    for stage in (ranked.rpn, ranked.roi_heads):
        assert stage.normalizers is distributed.global_counts
        labels = torch.zeros(2, 5, dtype=torch.int64)
        torch.manual_seed(0)
        drawn = stage.keys(labels)
        torch.manual_seed(0)
        assert torch.equal(drawn, global_batch_keys(1, 2)(labels))
