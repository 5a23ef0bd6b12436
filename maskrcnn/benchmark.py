"""`python -m maskrcnn.benchmark --config=NAME [--device=cpu|cuda] [--baseline=torchvision]`.

Times our full training step (forward, losses, backward, SGD step, LR step: the trainer's own
`train_step`) on one synthetic batch at the config's first canvas and run.images_per_gpu,
built once in memory (maskrcnn/bench/synthetic.py), after warm-up, with the device
synchronised around every step: images/s (median, min, max), step time, peak memory, counted
FLOPs and model FLOP utilisation (MFU) against a stated peak; then inference (eval mode, no
gradients, masks pasted at full resolution) on the same batch. With --baseline=torchvision the
same for torchvision's Mask R-CNN at equivalent settings, in this process, on the same images
and targets, and the ratios; the two sides' timed steps take turns (ours, torchvision's, ours,
...), so that a drift in the machine's speed hits both alike. Then where our step's time goes
(--breakdown) and op micro-benchmarks against torchvision.ops at the step's sizes (--ops).
--json_out writes the whole report as JSON.

`--inference_formats=eager,pt2,aoti,onnx` times inference alone on the CPU instead
(maskrcnn/bench/inference.py): our eager model, the programs `maskrcnn-export` writes in each
format, and torchvision's eager model, in turn on the same uint8 batch: images/s, peak memory,
the ratios to torchvision, and where a call's time goes (backbone + FPN against the rest).

`--loader` times the input pipeline instead, without the model (maskrcnn/bench/loader.py): on
the config's training images (--data_dir, or --train_json and --train_images), images/s of each
stage, of whole samples in one process, and of the training DataLoader with each of
--loader_workers, and the workers one GPU at --gpu_images_per_s needs.
"""

import gc
import json
import math
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from absl import flags

from maskrcnn.bench.breakdown import breakdown, matrix_times
from maskrcnn.bench.inference import (
    PRECISIONS,
    SIDES,
    format_inference_report,
    run_inference_benchmark,
)
from maskrcnn.bench.loader import format_loader_report, run_loader_benchmark
from maskrcnn.bench.measure import (
    PeakMemory,
    count_flops,
    peak_tflops,
    throughput,
    time_rounds,
)
from maskrcnn.bench.ops import bench_ops
from maskrcnn.bench.step import bench_step, inference_step
from maskrcnn.bench.synthetic import synthetic_batch, torchvision_inputs
from maskrcnn.bench.torchvision_baseline import TorchvisionBaseline, unmatched_settings
from maskrcnn.cli import run_command
from maskrcnn.config import Config, ConfigError, config_pb2
from maskrcnn.config.flags import FLAGS, config_from_flags
from maskrcnn.data.batch import Batch
from maskrcnn.engine.fallback import verify_kernels
from maskrcnn.engine.step import TrainStep
from maskrcnn.runtime import KERNEL_OPS, Runtime, resolve_device

BASELINES = ("none", "torchvision")
flags.DEFINE_string("baseline", "none", "none, or torchvision: also time torchvision's Mask "
                    "R-CNN at equivalent settings on the same batch, and print the ratios.")
flags.DEFINE_integer("steps", 20, "Timed steps per measurement (and timed runs per op).")
flags.DEFINE_integer("warmup", 5, "Untimed steps before each measurement.")
flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s that MFU is stated against; 0 = the "
                   "GPU's datasheet value, or on a CPU the measured rate of a large matmul.")
flags.DEFINE_bool("baseline_cudnn_benchmark", False, "cuDNN autotuning for torchvision's side "
                  "(ours always autotunes on a GPU: its shapes are static). Off by default, as "
                  "in torchvision's reference scripts: its RoI counts change every step, and "
                  "with autotuning each new shape is tuned again (seen on an H200: median "
                  "step 4.5x its fastest).")
KERNEL_CHOICES = ("auto", "torch", "triton")
for _op, _what in (("nms", "NMS"), ("roi_align", "ROIAlign"), ("match", "RPN anchor matching")):
    flags.DEFINE_enum(_op, None, KERNEL_CHOICES, f"Our {_what} kernel: the config's "
                      f"run.kernels.{_op} (AUTO, TORCH or TRITON), which this flag overrides.")
flags.DEFINE_bool("breakdown", True, "Profile where our training step's time goes.")
flags.DEFINE_bool("ops", True, "Op micro-benchmarks (proposals, ROIAlign) against torchvision.")
flags.DEFINE_bool("loader", False, "Time the input pipeline (decode, resize, flip, pad, "
                  "targets, collate, DataLoader workers) on the training images instead of the "
                  "model; --steps and --warmup count batches.")
flags.DEFINE_integer("loader_rounds", 3, "With --loader: rounds of the in-process and "
                     "DataLoader measurements, taken in turn; the report gives the median.")
flags.DEFINE_list("loader_workers", ["1", "2"], "With --loader: the DataLoader worker counts "
                  "to time; the first one's per-worker rate sizes --gpu_images_per_s.")
flags.DEFINE_float("gpu_images_per_s", 185.0, "With --loader: the images/s one GPU's training "
                   "step consumes, to state the workers it needs.")
flags.DEFINE_list("inference_formats", [], "Time CPU inference alone instead, side by side "
                  f"with torchvision's eager model: any of {', '.join(SIDES)} (ours eager, "
                  "and maskrcnn-export's programs).")
flags.DEFINE_enum("inference_precision", "fp32", list(PRECISIONS), "With --inference_formats: "
                  "fp32, or bf16 (CPU autocast on every side, traced into the programs).")
flags.DEFINE_bool("aoti_freezing", True, "With --inference_formats: compile the aoti package "
                  "with inductor's freezing (weights as constants, pre-packed for oneDNN).")
flags.DEFINE_bool("export_trim_masks", False, "With --inference_formats: export with "
                  "maskrcnn-export --trim_masks (the mask head on the used detection slots).")
flags.DEFINE_bool("inference_profile", True, "With --inference_formats: also time each "
                  "side's backbone + FPN alone (a program of it for each format).")

# Training steps profiled for the breakdown (at most --steps).
PROFILE_STEPS = 3


def _check_flags() -> torch.device:
    """Validates this command's flags; returns the device."""
    if FLAGS.baseline not in BASELINES:
        raise ConfigError(f"--baseline={FLAGS.baseline}: must be one of {', '.join(BASELINES)}")
    if FLAGS.steps < 1:
        raise ConfigError(f"--steps={FLAGS.steps}: must be at least 1")
    if FLAGS.warmup < 0:
        raise ConfigError(f"--warmup={FLAGS.warmup}: must be at least 0")
    if FLAGS.peak_tflops < 0:
        raise ConfigError(f"--peak_tflops={FLAGS.peak_tflops:g}: must be positive (or 0)")
    if not FLAGS.loader_workers or not all(w.isdigit() and int(w) > 0
                                           for w in FLAGS.loader_workers):
        raise ConfigError(f"--loader_workers={','.join(FLAGS.loader_workers)}: must be a "
                          "comma-separated list of positive worker counts")
    if FLAGS.loader_rounds < 1:
        raise ConfigError(f"--loader_rounds={FLAGS.loader_rounds}: must be at least 1")
    if FLAGS.gpu_images_per_s <= 0:
        raise ConfigError(f"--gpu_images_per_s={FLAGS.gpu_images_per_s:g}: must be positive")
    return resolve_device(FLAGS.device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _training_record(seconds: list[float], images: int, flops: int, memory: PeakMemory,
                     peak: float, loss: torch.Tensor, parameters: int, mask_rois: int) -> dict:
    record = throughput(seconds, images)
    achieved = flops / (record["step_ms"]["median"] / 1e3) / 1e12
    record.update(peak_memory_mib=memory.mib, flops_per_step=flops, achieved_tflops=achieved,
                  mfu=achieved / peak, loss=loss.sum().item(), trainable_parameters=parameters,
                  mask_rois_per_image=mask_rois / images)
    return record


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _progress(side: str, section: str, record: dict) -> None:
    """One line to stderr as each measurement ends (a run cut short still shows what it got)."""
    print(f"  {side} {section}: {record['images_per_s']['median']:.2f} images/s, step "
          f"{record['step_ms']['median']:.1f} ms (median)", file=sys.stderr, flush=True)


@dataclass
class _Side:
    """One side of the comparison, set up and warmed up: its training step and inference step
    (callables), and what its setup measured (FLOPs, peak memory, counts)."""

    name: str
    model: torch.nn.Module
    train: Callable[[], object]
    infer: Callable[[], object]
    flops: int
    memory: PeakMemory
    last: dict  # "loss" (the last training step's), "mask_rois" (RoIs in its mask head)
    count_detections: Callable[[], float]


def _set_up(name: str, model: torch.nn.Module, train: Callable[[], object],
            infer: Callable[[], object], count_flops_of: Callable[[], int], memory: PeakMemory,
            last: dict, count_detections: Callable[[], float], extra_warmup: int = 0) -> _Side:
    """Counts the FLOPs of one training step, then runs the warm-up steps (inside the side's
    memory measurement, where its peak is reached), extra_warmup more than --warmup."""
    flops = count_flops_of()
    for _ in range(FLAGS.warmup + extra_warmup):
        train()
    return _Side(name, model, train, infer, flops, memory, last, count_detections)


def set_up_ours(config: Config, batch: Batch,
                device: torch.device) -> tuple[_Side, TrainStep]:
    last = {}
    with PeakMemory(device) as memory:
        runtime = verify_kernels(Runtime.for_config(config, device), device)
        print(f"on {device}: {runtime.describe()}", flush=True)
        trainer = bench_step(config, device, runtime)

        def train():
            last["loss"] = trainer(batch)

        def count():
            # RoIs in the mask head: the static F slots per image, fewer where the CPU trims
            # slots without foreground (Runtime.slots).
            hook = trainer.model.roi_heads.mask_head.register_forward_hook(
                lambda module, args, out: last.update(mask_rois=args[0].shape[0]))
            try:
                with trainer.eager():
                    return count_flops(train)
            finally:
                hook.remove()

        infer = inference_step(trainer, batch)
        # A graphed step first runs its eager warm-up steps, then its capture (see
        # engine/graph.py); the timed steps are all replays.
        graph_warmup = trainer.graphed.warmup_steps + 1 if trainer.graphed else 0
        side = _set_up("ours", trainer.model, train, infer, count, memory, last,
                       lambda: infer()["valid"].sum().item() / len(batch), graph_warmup)
    return side, trainer


def _cudnn_benchmark(step: Callable[[], object], enabled: bool) -> Callable[[], object]:
    """step() with cuDNN autotuning set to `enabled` while it runs (ours autotunes; the
    baseline's setting is --baseline_cudnn_benchmark)."""
    def run():
        saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = enabled
        try:
            return step()
        finally:
            torch.backends.cudnn.benchmark = saved

    return run


def set_up_torchvision(config: Config, batch: Batch, device: torch.device) -> _Side:
    images, targets = torchvision_inputs(batch)
    autotune = FLAGS.baseline_cudnn_benchmark and device.type == "cuda"
    last = {}
    with PeakMemory(device) as memory:
        baseline = TorchvisionBaseline(config, device, images, targets)

        def train():
            last["loss"] = baseline.train_step()
            last["mask_rois"] = baseline.mask_rois

        train = _cudnn_benchmark(train, autotune)
        infer = _cudnn_benchmark(baseline.inference_step, autotune)
        side = _set_up("torchvision", baseline.model, train, infer,
                       lambda: count_flops(train), memory, last,
                       lambda: sum(len(d["boxes"]) for d in infer()) / len(batch))
    return side


def _train_records(sides: list[_Side], batch: Batch, device: torch.device,
                   peak: float) -> dict:
    """Training records of the sides, their steps timed in turn (round robin)."""
    for side in sides:
        side.model.train()
    seconds = time_rounds([side.train for side in sides], device, FLAGS.steps)
    records = {}
    for side, times in zip(sides, seconds, strict=True):
        records[side.name] = _training_record(times, len(batch), side.flops, side.memory, peak,
                                              side.last["loss"], _trainable(side.model),
                                              side.last["mask_rois"])
        _progress(side.name, "training", records[side.name])
    return records


def _inference_records(sides: list[_Side], batch: Batch, device: torch.device) -> dict:
    """Inference records of the sides (eval mode), timed in turn after their warm-up."""
    for side in sides:
        side.model.eval()
        for _ in range(FLAGS.warmup):
            side.infer()
    seconds = time_rounds([side.infer for side in sides], device, FLAGS.steps)
    records = {}
    for side, times in zip(sides, seconds, strict=True):
        records[side.name] = throughput(times, len(batch))
        records[side.name]["detections_per_image"] = side.count_detections()
        _progress(side.name, "inference", records[side.name])
    return records


def run_benchmark(config: Config, device: torch.device) -> dict:
    """Every measurement of the command, as the JSON report."""
    batch = synthetic_batch(config, config.run.seed).to(device)
    n = len(batch)
    peak, peak_source = peak_tflops(device, config.run.precision, FLAGS.peak_tflops)
    canvas = config.data.canvas[0]
    report = {
        "command": shlex.join(["maskrcnn-benchmark", *sys.argv[1:]]),
        "environment": {
            "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                       else f"cpu, torch threads: {torch.get_num_threads()}"),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cudnn_benchmark": {"ours": torch.backends.cudnn.benchmark,
                                "torchvision": (FLAGS.baseline_cudnn_benchmark
                                                and device.type == "cuda")}},
        "setup": {
            "config": FLAGS.config, "canvas": [canvas.height, canvas.width],
            "images_per_step": n, "gt_slots": config.data.max_instances,
            "instances_per_image": batch.gt_valid.sum().item() / n,
            "precision": config_pb2.Precision.Name(config.run.precision),
            "compile": config.run.compile,
            "cuda_graph": config.run.cuda_graph and device.type == "cuda",
            "steps": FLAGS.steps, "warmup": FLAGS.warmup},
        "peak": {"tflops": peak, "source": peak_source},
    }
    ours, trainer = set_up_ours(config, batch, device)
    report["setup"].update(nms=trainer.runtime.nms, roi_align=trainer.runtime.roi_align,
                           match=trainer.runtime.match)
    sides = [ours]
    if FLAGS.baseline == "torchvision":
        sides.append(set_up_torchvision(config, batch, device))
    report["memory_kind"] = ours.memory.kind
    report["train"] = _train_records(sides, batch, device, peak)
    if FLAGS.breakdown:
        steps = min(PROFILE_STEPS, FLAGS.steps)
        with trainer.eager():
            report["breakdown"] = breakdown(ours.train, trainer.model, device, steps)
            if len(sides) == 2:
                report["matrix"] = dict(zip(
                    ("ours", "torchvision"),
                    matrix_times([side.train for side in sides], device, steps), strict=True))
    report["inference"] = _inference_records(sides, batch, device)
    if len(sides) == 2:
        for section in ("train", "inference"):
            report[section]["ratio"] = (report[section]["ours"]["images_per_s"]["median"]
                                        / report[section]["torchvision"]["images_per_s"]
                                        ["median"])
        report["unmatched_settings"] = unmatched_settings(config, device)
    del sides, ours, trainer
    _free(device)
    if FLAGS.ops:
        report["ops"] = bench_ops(config, device, FLAGS.steps, max(FLAGS.warmup, 1))
    return report


def _side(record: dict, training: bool) -> list[str]:
    """One column of the training or inference table."""
    ips, ms = record["images_per_s"], record["step_ms"]
    cells = [f"{ips['median']:.2f} ({ips['min']:.2f}..{ips['max']:.2f})",
             f"{ms['median']:.1f} ({ms['min']:.1f}..{ms['max']:.1f})"]
    if training:
        cells += [f"{record['peak_memory_mib']:.0f}", f"{record['flops_per_step']:.3g}",
                  f"{record['achieved_tflops']:.3g} / {record['mfu']:.1%}",
                  f"{record['loss']:.4f}", f"{record['trainable_parameters']:,}",
                  f"{record['mask_rois_per_image']:.1f}"]
    else:
        cells.append(f"{record['detections_per_image']:.1f}")
    return cells


def format_report(report: dict) -> str:
    """The report as the text the command prints."""
    env, setup, peak = report["environment"], report["setup"], report["peak"]
    lines = [
        f"maskrcnn benchmark: config {setup['config']} on {env['device']} (torch {env['torch']}, "
        f"torchvision {env['torchvision']})",
        f"batch: {setup['images_per_step']} synthetic images at {setup['canvas'][0]}x"
        f"{setup['canvas'][1]}, {setup['instances_per_image']:.1f} instances per image "
        f"({setup['gt_slots']} slots), precision {setup['precision']}; {setup['warmup']} "
        f"warm-up then {setup['steps']} timed steps per measurement",
        f"our step: {'compiled' if setup['compile'] else 'eager'}, NMS {setup['nms']}, "
        f"ROIAlign {setup['roi_align']}, anchor matching {setup['match']}"
        + (", replayed as one CUDA graph (after its warm-up and capture)"
           if setup["cuda_graph"] else ""),
        f"MFU: FLOPs as run (torch.utils.flop_counter: convolutions and matrix products, "
        f"padded slots included) against {peak['tflops']:.4g} TFLOP/s ({peak['source']})",
        f"peak memory: {report['memory_kind']}",
        f"cuDNN autotuning (torch.backends.cudnn.benchmark): ours "
        f"{env['cudnn_benchmark']['ours']}, torchvision {env['cudnn_benchmark']['torchvision']}"
        f" (--baseline_cudnn_benchmark)",
    ]
    sides = [s for s in ("ours", "torchvision") if s in report["train"]]
    for section, title, rows in (
            ("train", "training step (forward, losses, backward, SGD step)",
             ["images/s median (min..max)", "step ms median (min..max)", "peak memory MiB",
              "FLOPs per step (counted)", "achieved TFLOP/s / MFU", "loss at the last step",
              "trainable parameters", "mask-head RoIs per image"]),
            ("inference", "inference (eval, no grad, masks pasted at full size)",
             ["images/s median (min..max)", "step ms median (min..max)",
              "detections per image"])):
        columns = [_side(report[section][s], section == "train") for s in sides]
        lines += ["", title, f"  {'':<40}" + "".join(f"{s:>30}" for s in sides)]
        for i, row in enumerate(rows):
            lines.append(f"  {row:<40}" + "".join(f"{c[i]:>30}" for c in columns))
        if "ratio" in report[section]:
            lines.append(f"  ours / torchvision images/s: {report[section]['ratio']:.2f}x")
        if section == "train":
            lines += [f"  warning: {side}'s loss is not finite: its steps ran on NaN or inf"
                      for side in sides if not math.isfinite(report["train"][side]["loss"])]
        if section == "inference" and len(columns) == 2 and (
                report[section]["torchvision"]["detections_per_image"]
                < report[section]["ours"]["detections_per_image"]):
            lines.append("  (torchvision kept fewer detections than ours computes, so it ran "
                         "less of its mask head and pasting: not like for like)")
    if "unmatched_settings" in report:
        lines += ["", "settings that differ between the two sides:"]
        lines += [f"  - {note}" for note in report["unmatched_settings"]]
    if "breakdown" in report:
        b = report["breakdown"]
        lines += ["", f"where our training step's time goes ({b['time']} time, mean of "
                      f"{b['steps']} profiled steps of {b['step_ms']:.1f} ms):",
                  f"  {'stage':<46}{'ms':>10}{'%':>8}"]
        for stage in b["stages"]:
            name = ("    " + stage["name"]) if stage["part_of"] else stage["name"]
            lines.append(f"  {name:<46}{stage['ms']:>10.2f}{stage['percent']:>8.1f}")
        lines.append(f"  convolutions and matrix products: {b['matrix_ms']:.1f} ms "
                     f"({b['matrix_ms'] / b['step_ms']:.1%} of the step)")
    if "matrix" in report:
        ours, theirs = report["matrix"]["ours"], report["matrix"]["torchvision"]
        lines.append("  convolutions and matrix products (the same library kernels on both "
                     "sides), profiled in turn:")
        for side, record in report["matrix"].items():
            lines.append(f"    {side}: {record['matrix_ms']:.1f} ms of {record['step_ms']:.1f} "
                         f"({record['matrix_ms'] / record['step_ms']:.1%})")
        lines.append(f"    were all else free, ours would reach "
                     f"{theirs['step_ms'] / ours['matrix_ms']:.2f}x torchvision's images/s at "
                     f"most (its profiled step / our matrix time)")
    if "ops" in report:
        lines += ["", "ops at training-step sizes (median ms; speed-up = torchvision / ours):",
                  f"  {'op':<18}{'ours':>10}{'tv':>10}{'speed-up':>10}  case; check"]
        for row in report["ops"]:
            lines.append(f"  {row['op']:<18}{row['ours_ms']:>10.2f}{row['torchvision_ms']:>10.2f}"
                         f"{row['speedup']:>9.2f}x  {row['case']}"
                         + (f"; {row['check']}" if row["check"] else ""))
    return "\n".join(lines)


def kernel_flags(config: Config) -> Config:
    """The config with --nms, --roi_align and --match (where given) set in run.kernels."""
    for op in KERNEL_OPS:
        if getattr(FLAGS, op) is not None:
            setattr(config.run.kernels, op, config_pb2.Kernel.Value(getattr(FLAGS, op).upper()))
    return config


def main() -> None:
    device = _check_flags()
    config = kernel_flags(config_from_flags())
    if FLAGS.loader:
        report = {"command": shlex.join(["maskrcnn-benchmark", *sys.argv[1:]]),
                  **run_loader_benchmark(
            config, steps=FLAGS.steps, warmup=FLAGS.warmup, rounds=FLAGS.loader_rounds,
            workers=[int(w) for w in FLAGS.loader_workers],
            gpu_images_per_s=FLAGS.gpu_images_per_s)}
        print(format_loader_report(report), flush=True)
    elif FLAGS.inference_formats:
        if device.type != "cpu":
            raise ConfigError(f"--inference_formats: times the CPU only (--device="
                              f"{FLAGS.device})")
        report = run_inference_benchmark(config, FLAGS.inference_formats, FLAGS.steps,
                                         FLAGS.warmup, FLAGS.inference_precision,
                                         FLAGS.aoti_freezing, FLAGS.inference_profile,
                                         FLAGS.export_trim_masks)
        print(format_inference_report(report), flush=True)
    else:
        report = run_benchmark(config, device)
        print(format_report(report), flush=True)
    if FLAGS.json_out:
        path = Path(FLAGS.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {path}")


def run() -> None:
    """Console-script entry point (`maskrcnn-benchmark`)."""
    run_command(main)


if __name__ == "__main__":
    run()
