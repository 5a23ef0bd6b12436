"""Runtime: the per-device choices, made once and passed to the builders."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from maskrcnn.bench.synthetic import synthetic_batch
from maskrcnn.config import ConfigError, config_pb2, load_config
from maskrcnn.engine.step import model_inputs
from maskrcnn.model.maskrcnn import build_model
from maskrcnn.model.sampling import global_batch_keys, global_counts, local_counts
from maskrcnn.runtime import Runtime, resolve_device
from tests.tiny import TINY


def test_choices_per_device():
    """If this fails, a CPU stops trimming padded slots or using torchvision's NMS (its
    fastest path), a GPU trims (a host read per step) or uses an NMS that synchronises, or a
    misspelt NMS method is accepted."""
    cpu = Runtime.for_device("cpu")
    assert cpu.trim_slots and cpu.nms == "per_cell" and cpu.world_size == 1
    gpu = Runtime.for_device("cuda", rank=3, world_size=8)
    assert not gpu.trim_slots and gpu.nms in ("triton", "torch")
    assert cpu.roi_align == "gather" and gpu.roi_align in ("triton", "gather")
    assert cpu.match == "tiled" and gpu.match == ("triton" if gpu.roi_align == "triton"
                                                  else "tiled")
    assert (gpu.rank, gpu.world_size) == (3, 8)
    assert Runtime.gpu_path() == Runtime(trim_slots=False, nms="torch")
    with pytest.raises(ValueError, match="unknown NMS method 'fast'"):
        Runtime(trim_slots=False, nms="fast")
    with pytest.raises(ValueError, match="unknown ROIAlign method 'cuda'"):
        Runtime(trim_slots=False, nms="torch", roi_align="cuda")
    with pytest.raises(ValueError, match="unknown matching method 'dense'"):
        Runtime(trim_slots=False, nms="torch", match="dense")


def test_builders_take_every_choice_from_the_runtime():
    """If this fails, a module is built with other choices than its runtime's (slot trimming,
    each op's method: the modules hold the one Runtime, a CPU's by default), or (with several
    processes) without the global batch's sampling keys and loss normalisers summed over the
    ranks, which the trainer once set on the modules after construction."""
    config = load_config("shapes", TINY)
    one = build_model(config)
    assert one.runtime == Runtime.for_device("cpu")
    assert one.rpn.runtime is one.roi_heads.runtime is one.runtime
    assert one.rpn.normalizers is local_counts and one.roi_heads.normalizers is local_counts
    runtime = Runtime.gpu_path("triton", "triton", "triton").replace(rank=1, world_size=2)
    ranked = build_model(config, runtime)
    assert ranked.runtime is ranked.rpn.runtime is ranked.roi_heads.runtime is runtime
    for stage in (ranked.rpn, ranked.roi_heads):
        assert stage.normalizers is global_counts
        labels = torch.zeros(2, 5, dtype=torch.int64)
        torch.manual_seed(0)
        drawn = stage.keys(labels)
        torch.manual_seed(0)
        assert torch.equal(drawn, global_batch_keys(1, 2)(labels))


def test_slots_trim_only_where_the_runtime_trims_and_keep_every_used_slot():
    """If this fails, trimming cuts a used slot (a valid slot after an invalid one), gathers
    the wrong foreground slots or returns an empty set; or a runtime of static sizes (a GPU's),
    or a compiled step, trims: a host read that a GPU step must not make."""
    cpu, gpu = Runtime.for_device("cpu"), Runtime.gpu_path()
    used = torch.tensor([[True, False, False, False], [False, False, True, False]])
    assert cpu.slots(used) == slice(0, 3)
    assert cpu.slots(torch.zeros(2, 5, dtype=torch.bool)) == slice(0, 1)
    assert cpu.slots(torch.zeros(2, 0, dtype=torch.bool)) == slice(0, 1)
    assert cpu.slots(torch.tensor([False, True, False, True])).tolist() == [1, 3]
    assert cpu.slots(torch.zeros(3, dtype=torch.bool)).tolist() == [0]
    assert gpu.slots(used) == gpu.slots(used[1]) == slice(None)
    compiled = torch.compile(lambda u: u[:, cpu.slots(u)].sum(1), fullgraph=True,
                             backend="eager")
    assert compiled(used).tolist() == [1, 1]
    assert compiled(torch.ones(2, 6, dtype=torch.bool)).tolist() == [6, 6]


class _OpNames(TorchDispatchMode):
    """Records the name of every op dispatched inside."""

    def __enter__(self):
        self.names = set()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def test_triton_roi_align_and_match_model_trains_as_the_pytorch_model():
    """If this fails, the model built with the Triton ROIAlign and anchor matching (a GPU's
    defaults) computes other losses or gradients than with the gather op and the tiled
    matching: a kernel, or its wiring into the RoI heads (box and mask pooling, the levels,
    the channels-last features) or the RPN, is wrong. Run under TRITON_INTERPRET=1 at the
    tiny config's sizes."""
    # Fewer RoIs and mask slots than TINY's: the interpreter runs every program in Python.
    config = load_config("shapes", [*TINY, "run { channels_last: true images_per_gpu: 1 } "
                                    "model { roi_heads { batch_size_per_image: 16 "
                                    "max_fg_masks_per_image: 4 } }"])
    batch = synthetic_batch(config, seed=1)
    results = []
    for method in ("gather", "triton"):
        torch.manual_seed(0)
        model = build_model(config, Runtime.gpu_path(
            roi_align=method, match="triton" if method == "triton" else "tiled"))
        model = model.to(memory_format=torch.channels_last).train()
        torch.manual_seed(1)
        with _OpNames() as ops:
            losses = model(*model_inputs(batch, channels_last=True))
            sum(losses.values()).backward()
        pooled = "maskrcnn.multilevel_roi_align" + ("_triton" if method == "triton" else "")
        assert {f"{pooled}.default", f"{pooled}_backward.default"} <= ops.names, method
        assert ("maskrcnn.match_triton.default" in ops.names) == (method == "triton")
        results.append((losses, {n: p.grad for n, p in model.named_parameters()
                                 if p.grad is not None}))
    (gather, gather_grads), (triton, triton_grads) = results
    for key in gather:
        torch.testing.assert_close(triton[key], gather[key], rtol=1e-5, atol=1e-6)
    assert gather_grads.keys() == triton_grads.keys()
    for name in gather_grads:
        torch.testing.assert_close(triton_grads[name], gather_grads[name], rtol=1e-4,
                                   atol=1e-5, msg=name)


def _kernels(**choices):
    kernels = config_pb2.KernelsConfig()
    for op, name in choices.items():
        setattr(kernels, op, config_pb2.Kernel.Value(name))
    return kernels


@pytest.mark.parametrize("op, torch_on_gpu", [("nms", "torch"), ("roi_align", "gather"),
                                               ("match", "tiled")])
def test_each_kernel_switch_chooses_the_pytorch_path_or_the_kernel(op, torch_on_gpu,
                                                                   monkeypatch):
    """If this fails, run.kernels.<op> is not honoured: TORCH must give that op (alone) its
    PyTorch path on a GPU, TRITON the kernel, AUTO the device's fastest; and TRITON where
    Triton cannot run must stop with one line naming the field, not fail at the first step."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # a CPU machine: Triton "runs" on any device
    auto = Runtime.for_device("cuda", kernels=_kernels())
    assert getattr(auto, op) == "triton"
    chosen = Runtime.for_device("cuda", kernels=_kernels(**{op: "TORCH"}))
    assert getattr(chosen, op) == torch_on_gpu == chosen.torch_method(op)
    assert all(getattr(chosen, other) == "triton" for other in ("nms", "roi_align", "match")
               if other != op)
    assert getattr(Runtime.for_device("cpu", kernels=_kernels(**{op: "TRITON"})), op) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert getattr(Runtime.for_device("cpu", kernels=_kernels()), op) != "triton"
    with pytest.raises(ConfigError, match=rf"run.kernels.{op}: TRITON needs a CUDA GPU with "
                       "Triton installed; this run is on cpu"):
        Runtime.for_device("cpu", kernels=_kernels(**{op: "TRITON"}))


def test_cuda_graph_switch_and_the_line_that_says_what_runs():
    """If this fails, run.cuda_graph is ignored on a GPU or turned on on a CPU (where there is
    no graph), or the run's first line no longer says what each op runs."""
    config = load_config("8x4")
    assert config.run.cuda_graph
    assert Runtime.for_config(config, "cuda").cuda_graph
    assert not Runtime.for_config(config, "cpu").cuda_graph
    config.run.cuda_graph = False
    assert not Runtime.for_config(config, "cuda").cuda_graph
    assert Runtime.for_config(config, "cpu").describe() == (
        "nms per_cell, roi_align gather, match tiled, cuda graph off")


@pytest.mark.parametrize("flag, message", [
    ("tpu", "--device=tpu: must be cpu, cuda, cuda:K or auto"),
    ("mps", "--device=mps: must be cpu, cuda, cuda:K or auto"),
    ("cuda:x", "--device=cuda:x: must be cpu, cuda, cuda:K or auto"),
])
def test_a_bad_device_flag_is_one_config_error(flag, message):
    """If this fails, a misspelt --device ends a command in torch's traceback (or runs on a
    device our ops do not support) instead of one line naming the flag."""
    with pytest.raises(ConfigError, match=message):
        resolve_device(flag)
    assert resolve_device("cpu") == torch.device("cpu")
