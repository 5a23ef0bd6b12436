"""Inference side by side on the CPU: our eager model, each exported format (engine/deploy.py)
and torchvision's eager Mask R-CNN, timed in turn on the same uint8 batch
(`maskrcnn-benchmark --inference_formats=eager,pt2,aoti,onnx`).

Shape legend: N images (run.images_per_gpu), H x W the config's first canvas, D detection
slots per image, M mask side.

Every side gets the same synthetic batch (bench/synthetic.py) and the same random weights
(torchvision's model is built at equivalent settings, bench/torchvision_baseline.py, with its
own random weights), returns detections with their masks pasted at full canvas size
(torchvision's inference pastes; ours and the programs return box-local masks, pasted here by
our op, over the slots some image uses), and runs in the same precision (float32, or bf16
autocast on every side with --inference_precision=bf16). Sides:
- eager: our model as `maskrcnn-eval` runs it on this device (Runtime.for_config).
- pt2, aoti, onnx: the program `maskrcnn-export` writes, traced from the same weights along
  the static path (Runtime.gpu_path), written to a temporary folder and loaded back as a
  server would (torch.export.load, aoti_load_package, an onnxruntime session). Tracing,
  compiling and loading are timed apart, not in the timed calls.
- torchvision: its eager model, inputs a list of float32 images (converted before timing).

Per side: images/s (median, min, max over the timed rounds), call time, peak memory (the
process's resident memory above its level when the side began loading, over its loading and
first call: weights, runtime workspaces and a call's activations), the setup times (trace,
write, load, first call), detections per image (of the first call), and the ratio of its
images/s to torchvision's. With --inference_profile, the
backbone + FPN alone of each side is timed the same way (a program of the backbone alone for
each format): the rest of a call is the RPN, RoI heads, NMS and mask pasting.
"""

import contextlib
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

from maskrcnn.bench.measure import PeakMemory, throughput, time_rounds
from maskrcnn.bench.synthetic import synthetic_batch, torchvision_inputs
from maskrcnn.bench.torchvision_baseline import build_torchvision_model
from maskrcnn.config import Config, ConfigError
from maskrcnn.engine import deploy
from maskrcnn.model.maskrcnn import build_model
from maskrcnn.ops.paste_masks import paste_masks
from maskrcnn.runtime import Runtime

SIDES = ("eager", *deploy.FORMATS)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
CPU = torch.device("cpu")


@dataclass
class _Side:
    """One side, loaded and called once: `call()` runs the batch through the whole inference,
    `backbone()` (or None) its backbone + FPN alone; `detections` per image of the first
    call, `memory` the peak over loading and that call."""

    name: str
    call: Callable[[], object]
    detections: float
    memory: PeakMemory
    backbone: Callable[[], object] | None = None
    setup_s: dict = field(default_factory=dict)


def _autocast(precision: str) -> contextlib.AbstractContextManager:
    """CPU autocast to the precision's type; no region at all in float32 (torch.export
    would record a disabled one)."""
    dtype = PRECISIONS[precision]
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _pasted(boxes: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor, h: int,
            w: int) -> torch.Tensor:
    """Masks float[N, D, M, M] pasted at the canvas's h x w: float32[N, U, h, w] over the
    slots some image uses (Runtime.slots on a CPU; at least one)."""
    used = Runtime.for_device(CPU).slots(valid)
    return paste_masks(masks[:, used].float(), boxes[:, used].float(), h, w)


def _timed(call: Callable[[], object]) -> tuple[object, float]:
    """call()'s result and its seconds (the first call of a side: a warm-up)."""
    began = time.perf_counter()
    out = call()
    return out, time.perf_counter() - began


def _check_sides(sides: list[str]) -> None:
    unknown = [s for s in sides if s not in SIDES]
    if unknown or not sides or len(set(sides)) != len(sides):
        raise ConfigError(f"--inference_formats={','.join(sides)}: must be distinct names "
                          f"from {', '.join(SIDES)}")


def _our_detections(out) -> float:
    # A host read after the timed calls, for the report: not on any step's path.
    return out["valid"].sum().item() / out["valid"].shape[0]


def _eager_side(config: Config, state: dict, images: torch.Tensor, sizes: torch.Tensor,
                precision: str) -> _Side:
    h, w = images.shape[-2:]
    with PeakMemory(CPU) as memory:
        model = build_model(config, Runtime.for_config(config, CPU))
        model.load_state_dict(state)
        model.eval()
        if config.run.channels_last:  # as the trainer and maskrcnn-eval run it
            model = model.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)

        @torch.no_grad()
        def call():
            with _autocast(precision):
                out = model(images, sizes)
            out["masks"] = _pasted(out["boxes"], out["masks"], out["valid"], h, w)
            return out

        @torch.no_grad()
        def backbone():
            with _autocast(precision):
                return model.backbone(model.normalize(images, sizes))

        first, first_s = _timed(call)
    return _Side("eager", call, _our_detections(first), memory, backbone,
                 {"first_call_s": first_s})


class _Backbone(nn.Module):
    """Our backbone + FPN as a program of the inputs (images, image_sizes) -> P2..P6, in the
    precision of `precision` (autocast inside the forward, as deploy.InferenceProgram)."""

    def __init__(self, model: nn.Module, precision: str):
        super().__init__()
        self.model, self.precision = model, precision

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        with _autocast(self.precision):
            return self.model.backbone(self.model.normalize(images, image_sizes))


def _export(config: Config, state: dict, inputs: tuple[torch.Tensor, torch.Tensor],
            formats: list[str], folder: Path, precision: str, freeze: bool, profile: bool,
            trim_masks: bool) -> dict:
    """Traces the program (and the backbone's, with profile) once and writes each format:
    {format: (path, backbone path or None, {"trace_s", "write_s"})}."""
    model = build_model(config, deploy.export_runtime(trim_masks))
    model.load_state_dict(state)
    model.eval()
    traced = {}  # ONNX's program traces ROIAlign otherwise (deploy._roi_align_by_gathers)
    for onnx in sorted({fmt == "onnx" for fmt in formats}):
        began = time.perf_counter()
        traced[onnx] = (deploy.export_program(model, inputs, PRECISIONS[precision], onnx),
                        time.perf_counter() - began)
    backbone = None
    if profile:
        with torch.no_grad():
            backbone = torch.export.export(_Backbone(model, precision), inputs,
                                           strict=False).run_decompositions()
    written = {}
    for fmt in formats:
        suffix = ".onnx" if fmt == "onnx" else ".pt2"
        path = folder / f"model-{fmt}{suffix}"
        program, trace_s = traced[fmt == "onnx"]
        began = time.perf_counter()
        deploy.save(program, fmt, path, inputs, freeze=freeze)
        write_s = time.perf_counter() - began
        print(f"  {fmt}: written in {write_s:.1f} s (traced in {trace_s:.1f} s)",
              file=sys.stderr, flush=True)
        backbone_path = None
        if backbone is not None:
            backbone_path = folder / f"backbone-{fmt}{suffix}"
            _save_backbone(backbone, fmt, backbone_path, inputs, freeze)
        written[fmt] = (path, backbone_path, {"trace_s": trace_s, "write_s": write_s})
    return written


def _save_backbone(program, fmt: str, path: Path, inputs: tuple[torch.Tensor, torch.Tensor],
                   freeze: bool) -> None:
    if fmt == "onnx":
        torch.onnx.export(program, inputs, dynamo=True, opset_version=deploy.ONNX_OPSET,
                          input_names=["images", "image_sizes"], optimize=False,
                          verbose=False).save(str(path))
    else:
        deploy.save(program, fmt, path, inputs, freeze=freeze)


def _program_side(fmt: str, path: Path, backbone_path: Path | None, setup_s: dict,
                  images: torch.Tensor, sizes: torch.Tensor) -> _Side:
    h, w = images.shape[-2:]
    threads = torch.get_num_threads()
    with PeakMemory(CPU) as memory:
        began = time.perf_counter()
        program = deploy.load_program(path, fmt, threads)
        setup_s = {**setup_s, "load_s": time.perf_counter() - began}

        @torch.no_grad()
        def call():
            out = dict(zip(deploy.OUTPUTS, program(images, sizes), strict=True))
            out["masks"] = _pasted(out["boxes"], out["masks"], out["valid"], h, w)
            return out

        first, first_s = _timed(call)
        setup_s["first_call_s"] = first_s
    backbone = None
    if backbone_path is not None:
        if fmt == "onnx":  # its outputs are the five levels, not the OUTPUTS tuple
            import onnxruntime  # noqa: PLC0415 (optional dependency)
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = onnxruntime.InferenceSession(str(backbone_path), options,
                                                   providers=["CPUExecutionProvider"])
            feeds = {"images": images.numpy(), "image_sizes": sizes.numpy()}

            def backbone():
                return session.run(None, feeds)
        else:
            runner = deploy.load_program(backbone_path, fmt)

            @torch.no_grad()
            def backbone():
                return runner(images, sizes)
    return _Side(fmt, call, _our_detections(first), memory, backbone, setup_s)


def _torchvision_side(config: Config, images: list[torch.Tensor], precision: str) -> _Side:
    with PeakMemory(CPU) as memory:
        torch.manual_seed(config.run.seed)
        model = build_torchvision_model(config).eval()

        @torch.no_grad()
        def call():
            with _autocast(precision):
                return model(images)

        @torch.no_grad()
        def backbone():
            with _autocast(precision):
                return model.backbone(model.transform(images)[0].tensors)

        first, first_s = _timed(call)
    return _Side("torchvision", call, sum(len(d["boxes"]) for d in first) / len(first),
                 memory, backbone, {"first_call_s": first_s})


def run_inference_benchmark(config: Config, sides: list[str], steps: int, warmup: int,
                            precision: str = "fp32", freeze: bool = True,
                            profile: bool = True, trim_masks: bool = False) -> dict:
    """The side-by-side inference report (module docstring) as JSON."""
    _check_sides(sides)
    if precision not in PRECISIONS:
        raise ConfigError(f"--inference_precision={precision}: must be one of "
                          f"{', '.join(PRECISIONS)}")
    batch = synthetic_batch(config, config.run.seed)
    images, sizes = batch.images, batch.image_sizes
    tv_images, _ = torchvision_inputs(batch)
    torch.manual_seed(config.run.seed)
    state = build_model(config).state_dict()  # the weights of every side of ours
    canvas = config.data.canvas[0]
    report = {
        "command": shlex.join(["maskrcnn-benchmark", *sys.argv[1:]]),
        "environment": {"device": f"cpu, torch threads: {torch.get_num_threads()}",
                        "torch": torch.__version__, "torchvision": torchvision.__version__},
        "setup": {"canvas": [canvas.height, canvas.width], "images_per_call": len(batch),
                  "precision": precision, "channels_last_eager": config.run.channels_last,
                  "aoti_freezing": freeze, "trim_masks": trim_masks, "steps": steps,
                  "warmup": warmup},
        "memory_kind": PeakMemory(CPU).kind,
    }
    programs = [s for s in sides if s != "eager"]
    with tempfile.TemporaryDirectory(prefix="maskrcnn-bench-") as folder:
        written = _export(config, state, (images, sizes), programs, Path(folder), precision,
                          freeze, profile, trim_masks) if programs else {}
        loaded = []
        for name in sides:
            if name == "eager":
                loaded.append(_eager_side(config, state, images, sizes, precision))
            else:
                loaded.append(_program_side(name, *written[name], images, sizes))
            print(f"  {name}: loaded, first call {loaded[-1].setup_s['first_call_s']:.1f} s",
                  file=sys.stderr, flush=True)
        loaded.append(_torchvision_side(config, tv_images, precision))
        report["sides"] = _time_sides(loaded, steps, warmup, len(batch))
        if profile:
            report["profile"] = _profile(loaded, report["sides"], steps, warmup)
    return report


def _time_sides(sides: list[_Side], steps: int, warmup: int, n: int) -> dict:
    """Each side's record, its calls timed in turn after `warmup` more calls each."""
    for side in sides:
        for _ in range(warmup):
            side.call()
    seconds = time_rounds([side.call for side in sides], CPU, steps)
    records = {}
    for side, times in zip(sides, seconds, strict=True):
        record = throughput(times, n)
        record.update(peak_memory_mib=side.memory.mib, setup_s=side.setup_s,
                      detections_per_image=side.detections)
        records[side.name] = record
        print(f"  {side.name}: {record['images_per_s']['median']:.3f} images/s",
              file=sys.stderr, flush=True)
    baseline = records["torchvision"]["images_per_s"]["median"]
    for record in records.values():
        record["ratio"] = record["images_per_s"]["median"] / baseline
    return records


def _profile(sides: list[_Side], records: dict, steps: int, warmup: int) -> dict:
    """Each side's backbone + FPN alone, timed in turn; the rest is the whole call less it."""
    timed = [side for side in sides if side.backbone is not None]
    for side in timed:
        for _ in range(max(warmup, 1)):  # a backbone program's first call is its first
            side.backbone()
    seconds = time_rounds([side.backbone for side in timed], CPU, steps)
    profile = {}
    for side, times in zip(timed, seconds, strict=True):
        whole = records[side.name]["step_ms"]["median"]
        backbone = throughput(times, 1)["step_ms"]["median"]
        profile[side.name] = {"call_ms": whole, "backbone_ms": backbone,
                              "rest_ms": whole - backbone}
    return profile


def format_inference_report(report: dict) -> str:
    """The report as the text the command prints."""
    env, setup = report["environment"], report["setup"]
    lines = [
        f"maskrcnn inference benchmark on {env['device']} (torch {env['torch']}, torchvision "
        f"{env['torchvision']})",
        f"batch: {setup['images_per_call']} synthetic uint8 images at {setup['canvas'][0]}x"
        f"{setup['canvas'][1]}, precision {setup['precision']}; {setup['warmup']} warm-up "
        f"then {setup['steps']} timed calls per side, in turn; masks pasted at full size",
        f"eager: our model on the CPU's path (channels_last {setup['channels_last_eager']}); "
        f"pt2 / aoti / onnx: maskrcnn-export's program (aoti freezing "
        f"{setup['aoti_freezing']}, mask head on "
        f"{'the used slots' if setup['trim_masks'] else 'all D slots'}); torchvision: its "
        "eager model at equivalent settings",
        f"peak memory: {report['memory_kind']}, over loading and the first call",
        "",
        f"  {'side':<13}{'images/s median (min..max)':>30}{'call ms':>11}{'peak MiB':>10}"
        f"{'det/img':>9}{'vs tv':>8}  setup",
    ]
    for name, r in report["sides"].items():
        ips = r["images_per_s"]
        setup_text = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in r["setup_s"].items())
        lines.append(f"  {name:<13}{ips['median']:>12.3f} ({ips['min']:.3f}..{ips['max']:.3f})"
                     .ljust(45) + f"{r['step_ms']['median']:>11.0f}{r['peak_memory_mib']:>10.0f}"
                     f"{r['detections_per_image']:>9.1f}{r['ratio']:>7.2f}x  {setup_text}")
    if "profile" in report:
        tv = report["profile"].get("torchvision")
        lines += ["", "where a call's time goes (median ms; rest = RPN, RoI heads, NMS, "
                      "pasting):",
                  f"  {'side':<13}{'call':>10}{'backbone+FPN':>14}{'rest':>10}{'backbone %':>12}"]
        for name, p in report["profile"].items():
            lines.append(f"  {name:<13}{p['call_ms']:>10.0f}{p['backbone_ms']:>14.0f}"
                         f"{p['rest_ms']:>10.0f}{p['backbone_ms'] / p['call_ms']:>12.1%}")
        if tv:
            best = max((n for n in report["profile"] if n != "torchvision"),
                       key=lambda n: report["sides"][n]["images_per_s"]["median"], default=None)
            if best:
                lines.append(f"  were all but its backbone + FPN free, {best} would reach "
                             f"{tv['call_ms'] / report['profile'][best]['backbone_ms']:.2f}x "
                             f"torchvision's images/s")
    return "\n".join(lines)
