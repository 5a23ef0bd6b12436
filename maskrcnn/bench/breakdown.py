"""Where the time of our training step goes: a few steps under torch.profiler, summed by stage.

Stages come from profiler ranges: the record_function scopes in MaskRCNN.forward, two scopes
this module puts around the box and mask heads (module hooks, only while profiling), the
ROIAlign ops, the autograd engine's per-node ranges (the backward) and the optimizer's own
ranges. Times are per step. On a CPU a stage's time is its host time; on CUDA its device time
(the kernels it launched), as the host runs ahead of the GPU. "other" is the rest of the
measured step time (under the profiler, a little slower than unprofiled): loss stacking,
gradient clipping, LR step, the autograd engine between nodes and, on CUDA, the time the GPU
waits for the host.
"""

import time
from collections.abc import Callable, Iterable

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

from maskrcnn.bench.measure import synchronize
from maskrcnn.model.maskrcnn import MaskRCNN

HEADS_SCOPE = "box+mask heads"
# ROIAlign's ops, by method (ops/roi_align.py: gather, triton).
ROI_ALIGN_OPS = ("maskrcnn::multilevel_roi_align", "maskrcnn::multilevel_roi_align_triton")
ROI_ALIGN_BACKWARD_OPS = ("maskrcnn::multilevel_roi_align_backward",
                          "maskrcnn::multilevel_roi_align_triton_backward")
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
# ATen matrix products; with every ATen op named "...convolution..." (forward, backward,
# transposed, oneDNN or cuDNN) they are the work that both sides of the benchmark run in the
# same library kernels, whatever the rest of their steps do.
MATRIX_PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
OPTIMIZER_PREFIX = "Optimizer."  # Optimizer.step#SGD.step, Optimizer.zero_grad#SGD.zero_grad


def _inside(event: FunctionEvent, name: str) -> bool:
    """Whether an enclosing range of event is called name."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


def _outermost(events: Iterable[FunctionEvent],
               match: Callable[[FunctionEvent], bool]) -> list[FunctionEvent]:
    """The events that match and have no matching enclosing range (so none is counted twice)."""
    out = []
    for event in events:
        if not match(event):
            continue
        parent = event.cpu_parent
        while parent is not None and not match(parent):
            parent = parent.cpu_parent
        if parent is None:
            out.append(event)
    return out


def _is_matrix_op(event: FunctionEvent) -> bool:
    return event.name in MATRIX_PRODUCTS or (event.name.startswith("aten::")
                                             and "convolution" in event.name)


def _matrix_ms(events: list[FunctionEvent], use_device: bool) -> float:
    """Milliseconds in convolutions and matrix products: the ops' own time (their children
    excluded, so nested ops count once), on the host or the device."""
    ops = [e for e in events if _is_matrix_op(e)]
    if use_device:
        return sum(e.self_device_time_total for e in ops) / 1e3
    return sum(e.self_cpu_time_total for e in ops) / 1e3


def _profiled(step: Callable[[], object], device: torch.device,
              steps: int) -> tuple[list[FunctionEvent], float]:
    """Runs step() `steps` times under the profiler: its host-side events and the mean
    measured step time (ms). Host-side only: on CUDA each record_function also has a GPU
    annotation event of the same name, whose kernels the host range already counts."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as profiler:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        step_ms = (time.perf_counter() - start) * 1e3 / steps
    return [e for e in profiler.events() if e.device_type == DeviceType.CPU], step_ms


def matrix_times(steps: list[Callable[[], object]], device: torch.device,
                 rounds: int) -> list[dict]:
    """Profiles each step() (a warmed-up training step of any model) once per round, in turn,
    over `rounds` rounds (as time_rounds: a drift in the machine's speed hits all alike).

    Returns per step {"step_ms": its mean measured time under the profiler, "matrix_ms": the
    part in convolutions and matrix products; host time on a CPU, device time on CUDA}.
    """
    totals = [{"step_ms": 0.0, "matrix_ms": 0.0} for _ in steps]
    for _ in range(rounds):
        for step, total in zip(steps, totals, strict=True):
            events, step_ms = _profiled(step, device, 1)
            total["step_ms"] += step_ms / rounds
            total["matrix_ms"] += _matrix_ms(events, device.type == "cuda") / rounds
    return totals


def _times_ms(events: list[FunctionEvent]) -> tuple[float, float]:
    """(host, device) milliseconds of ranges, summed."""
    return (sum(e.cpu_time_total for e in events) / 1e3,
            sum(e.device_time_total for e in events) / 1e3)


class _Range:
    """Forward hooks that put a module's forward inside a profiler range called name."""

    def __init__(self, name: str):
        self.name = name
        self.open = []

    def enter(self, module, args) -> None:
        self.open.append(torch.ops.profiler._record_function_enter_new(self.name, None))

    def exit(self, module, args, out) -> None:
        torch.ops.profiler._record_function_exit(self.open.pop())


def _scope_heads(model: MaskRCNN) -> list:
    """Puts the box and mask heads' forwards in HEADS_SCOPE ranges; returns the hook handles."""
    handles = []
    for head in (model.roi_heads.box_head, model.roi_heads.mask_head):
        scope = _Range(HEADS_SCOPE)
        handles += [head.register_forward_pre_hook(scope.enter),
                    head.register_forward_hook(scope.exit)]
    return handles


def breakdown(step: Callable[[], object], model: MaskRCNN, device: torch.device,
              steps: int) -> dict:
    """Profiles `steps` calls of step() (a warmed-up training step of `model`, run eagerly).

    Returns {"step_ms": mean measured step time under the profiler, "time": "host" or
    "device", "stages": [{"name", "host_ms", "device_ms", "ms" (the one of "time"),
    "percent" (of step_ms), "part_of" (the enclosing stage's name, or None)}], "matrix_ms":
    the step's time in convolutions and matrix products (see matrix_times)}.
    """
    handles = _scope_heads(model)
    try:
        events, step_ms = _profiled(step, device, steps)
    finally:
        for handle in handles:
            handle.remove()
    use_device = device.type == "cuda"

    def named(names: str | tuple[str, ...], within: str | None = None) -> list[FunctionEvent]:
        names = (names,) if isinstance(names, str) else names
        return _outermost(events, lambda e: e.name in names
                          and (within is None or _inside(e, within)))

    roi_align = _times_ms(named(ROI_ALIGN_OPS, within="roi_heads"))
    heads = _times_ms(named(HEADS_SCOPE, within="roi_heads"))
    roi_heads = _times_ms(named("roi_heads"))
    rows = [
        ("backbone + FPN", _times_ms(named("backbone+fpn")), None),
        ("RPN head + proposals", _times_ms(named("rpn+proposals")), None),
        ("RPN losses (anchor matching, sampling)", _times_ms(named("rpn_losses")), None),
        ("RoI heads", roi_heads, None),
        ("ROIAlign forward (box + mask)", roi_align, "RoI heads"),
        ("box head + mask head", heads, "RoI heads"),
        ("RoI sampling, mask targets, losses",
         tuple(t - a - h for t, a, h in zip(roi_heads, roi_align, heads, strict=True)),
         "RoI heads"),
        ("backward", _times_ms(_outermost(
            events, lambda e: e.name.startswith(BACKWARD_PREFIX))), None),
        ("ROIAlign backward", _times_ms(named(ROI_ALIGN_BACKWARD_OPS)), "backward"),
        ("optimizer (SGD step, zero_grad)", _times_ms(_outermost(
            events, lambda e: e.name.startswith(OPTIMIZER_PREFIX))), None),
    ]
    basis = 1 if use_device else 0
    stages = []
    for name, times, part_of in rows:
        host, dev = (t / steps for t in times)
        stages.append({"name": name, "host_ms": host, "device_ms": dev if use_device else None,
                       "ms": (host, dev)[basis], "part_of": part_of})
    other = step_ms - sum(s["ms"] for s in stages if s["part_of"] is None)
    stages.append({"name": "other (loss sum, clipping, LR step, gaps)", "host_ms": None,
                   "device_ms": None, "ms": other, "part_of": None})
    for stage in stages:
        stage["percent"] = 100 * stage["ms"] / step_ms
    return {"step_ms": step_ms, "time": ("host", "device")[basis], "steps": steps,
            "stages": stages, "matrix_ms": _matrix_ms(events, use_device) / steps}
