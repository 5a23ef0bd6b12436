"""`maskrcnn-check [--config=8x4] [--device=auto] [--json_out=PATH]`: a self-check of this
machine's fast paths, at the config's sizes.

It compares each op's fast path with its reference on seeded random inputs (engine/
kernel_check.py: NMS, proposals, ROIAlign forward and backward, anchor matching, mask paste),
for the methods the config selects on the device (run.kernels) and, on CUDA, for every GPU
method; on CUDA, the whole model (FP32, TF32 off) against the same weights and batch on the
CPU: losses, gradients, detections. It counts the host synchronisations of one training step
and one inference forward along the device's path (HostSyncCounter; on a CPU along the GPU's
path, Runtime.gpu_path, as the tests do): a GPU step must have none. On CUDA it replays the
training step as a CUDA graph against the same steps run eagerly (losses, weights, LR).

Prints one table (op | method | reference | largest diff | tolerance | ms | verdict) and a
summary line; --json_out writes the rows as JSON. Exit status: 0 all passed, 1 any failed,
2 bad input (a config error, an unavailable device).
"""

import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from absl import flags

from maskrcnn.bench.host_sync import HostSyncCounter
from maskrcnn.bench.step import bench_step, inference_step
from maskrcnn.bench.synthetic import synthetic_batch
from maskrcnn.cli import run_command
from maskrcnn.config import Config, ConfigError
from maskrcnn.config.config_pb2 import FP32
from maskrcnn.config.flags import FLAGS, config_from_flags
from maskrcnn.engine.kernel_check import Comparison, Sizes, compare_op, first_line, relative
from maskrcnn.engine.step import model_inputs
from maskrcnn.model.maskrcnn import build_model
from maskrcnn.ops.boxes import box_iou
from maskrcnn.runtime import Runtime, resolve_device

flags.DEFINE_integer("graph_steps", 8, "CUDA only: training steps replayed as a CUDA graph against "
                     "the same steps run eagerly.")
flags.DEFINE_integer("input_seed", 0, "Seed of the random inputs of the op comparisons.")

# Every GPU method of each op, checked on CUDA whatever the config selects.
GPU_METHODS = {"nms": ("triton", "torch", "shifted"), "roi_align": ("triton", "gather"),
               "match": ("triton", "tiled")}
# The whole model against the CPU (float32, TF32 off), relative to the largest value: the
# losses are sums computed in another order on the device; gradients and detection scores
# pass through the whole network, where the orders add up (the old GPU checks' bounds).
MODEL_LOSS_TOLERANCE = 1e-4
MODEL_GRAD_TOLERANCE = 1e-3
# Images of the model comparison and of the CUDA-graph replay (a COCO-sized model in FP32 on
# the CPU takes seconds per image).
MODEL_IMAGES = 2
# Graphed against eager steps in BF16: the same kernels, but atomic adds (ROIAlign's backward)
# sum in another order, and the SGD steps carry those differences into the weights.
GRAPH_LOSS_TOLERANCE = 1e-2
GRAPH_WEIGHT_TOLERANCE = 1e-3
COLUMNS = ("op", "method", "reference", "largest diff", "tolerance", "ms", "verdict")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _variant(config: Config, **run) -> Config:
    """A copy of config with run fields changed."""
    copy = Config()
    copy.CopyFrom(config)
    for name, value in run.items():
        setattr(copy.run, name, value)
    return copy


def op_methods(runtime: Runtime, device: torch.device) -> list[tuple[str, str]]:
    """(op, method) pairs to compare: the runtime's methods, and on CUDA every GPU method."""
    pairs = []
    for op, nms_like in (("nms", "nms"), ("proposals", "nms"), ("roi_align", "roi_align"),
                         ("match", "match")):
        methods = [getattr(runtime, nms_like)]
        if device.type == "cuda":
            methods += [m for m in GPU_METHODS[nms_like] if m not in methods]
        pairs += [(op, m) for m in methods]
    return [*pairs, ("paste_masks", "matmul")]


def check_host_syncs(config: Config, device: torch.device) -> tuple[list[Comparison], str]:
    """Host synchronisations of one eager training step and one inference forward along the
    device's path (on a CPU, the GPU's: Runtime.gpu_path), and the report of those found."""
    if device.type == "cuda":
        runtime, method = Runtime.for_config(config, device).replace(cuda_graph=False), "eager"
    else:
        runtime, method = Runtime.gpu_path(), "gpu_path"
    trainer = bench_step(_variant(config, cuda_graph=False), device, runtime)
    batch = synthetic_batch(config).to(device)
    if device.type == "cuda":
        trainer(batch)  # warm-up: lazy initialisation, cuDNN autotuning
    rows, reports = [], []
    for what, run in (("train_step", lambda: trainer(batch)),
                      ("inference", inference_step(trainer, batch))):
        if what == "inference":
            trainer.model.eval()
        _sync(device)
        start = time.perf_counter()
        try:
            with HostSyncCounter() as syncs:
                run()
            _sync(device)
            rows.append(Comparison(f"host_syncs {what}", method, "none", len(syncs.found), 0,
                                   (time.perf_counter() - start) * 1e3))
            reports += [f"{what}: {s}" for s in syncs.found]
        except Exception as error:  # noqa: BLE001 (reported as a failed row)
            rows.append(Comparison(f"host_syncs {what}", method, "none", math.inf, 0,
                                   math.nan, first_line(error)))
    return rows, "\n".join(reports)


def _fixed_keys(labels: torch.Tensor) -> torch.Tensor:
    """Sampling keys that depend on the candidate index only: the same on every device."""
    index = torch.arange(labels.shape[1], dtype=torch.float64, device=labels.device)
    return torch.remainder(torch.sin(index * 12.9898) * 43758.5453, 1.0).float().expand(
        labels.shape)


def check_model(config: Config, device: torch.device) -> list[Comparison]:
    """The whole model (FP32, MODEL_IMAGES images) on the device, by the config's methods,
    against the same weights and batch on the CPU: the five training losses, the gradients,
    and the detections in eval mode (each device detection must have a CPU detection of its
    image and class at IoU > 0.99: random weights give near-equal scores, so rounding can swap
    detections between slots)."""
    config = _variant(config, images_per_gpu=MODEL_IMAGES, precision=FP32)
    batch = synthetic_batch(config, seed=1)
    torch.manual_seed(0)
    cpu_model = build_model(config, Runtime.for_device("cpu"), keys=_fixed_keys)
    runtime = Runtime.for_config(config, device)
    ours = build_model(config, runtime, keys=_fixed_keys)
    ours.load_state_dict(cpu_model.state_dict())
    ours.to(device)
    out, ms = {}, 0.0
    for where, model in (("cpu", cpu_model), ("device", ours)):
        inputs = model_inputs(batch.to(torch.device("cpu") if where == "cpu" else device),
                              False)
        start = time.perf_counter()
        losses = torch.stack(list(model(*inputs).values()))
        losses.sum().backward()
        _sync(device)
        ms = (time.perf_counter() - start) * 1e3
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        model.eval()
        with torch.no_grad():
            detections = model(*inputs[:2])
        # Compared on the host, outside any training step.
        out[where] = (losses, grads, {k: v.cpu() for k, v in detections.items()})
    (losses, grads, det), (ref_losses, ref_grads, ref_det) = out["device"], out["cpu"]
    matched = 0
    for i in range(MODEL_IMAGES):
        ours_ok, ref_ok = det["valid"][i], ref_det["valid"][i]
        same_class = det["classes"][i][ours_ok][:, None] == ref_det["classes"][i][ref_ok][None]
        iou = box_iou(det["boxes"][i][ours_ok], ref_det["boxes"][i][ref_ok]) * same_class
        matched += int((iou.amax(1) > 0.99).sum()) if iou.numel() else 0
    # Detections without a CPU counterpart, and the difference in their count.
    unmatched = int(det["valid"].sum()) - matched + abs(
        int(det["valid"].sum()) - int(ref_det["valid"].sum()))
    method = f"{runtime.nms}/{runtime.roi_align}/{runtime.match}"  # NMS/ROIAlign/matching
    return [Comparison("model losses", method, "cpu", relative(losses, ref_losses),
                       MODEL_LOSS_TOLERANCE, ms),
            Comparison("model gradients", method, "cpu", relative(grads, ref_grads),
                       MODEL_GRAD_TOLERANCE, ms),
            Comparison("model detections", method, "cpu", float(unmatched), 0, math.nan)]


def check_cuda_graph(config: Config, device: torch.device, steps: int) -> list[Comparison]:
    """The config's step (MODEL_IMAGES images, its precision) replayed as a CUDA graph against
    the same step run eagerly from the same weights, the sampling generator seeded alike before
    each step: eager warm-up steps, the capture, then replays. Rows: the losses of every step,
    the weights and the LR after the last (ms: the median replayed and eager step)."""
    sides, losses, seconds = {}, {}, {}
    for graphed in (False, True):
        sides[graphed] = bench_step(_variant(config, images_per_gpu=MODEL_IMAGES,
                                             cuda_graph=graphed), device)
        losses[graphed], seconds[graphed] = [], []
    batch = synthetic_batch(_variant(config, images_per_gpu=MODEL_IMAGES)).to(device)
    for step in range(steps):
        for graphed, trainer in sides.items():
            torch.manual_seed(step)
            _sync(device)
            start = time.perf_counter()
            losses[graphed].append(trainer(batch))
            _sync(device)
            seconds[graphed].append(time.perf_counter() - start)
    graphed = sides[True].graphed
    if graphed is None or len(graphed.graphs) != 1:
        return [Comparison("cuda_graph capture", "graph", "eager", math.inf, 0, math.nan,
                           "the step was not captured as one CUDA graph")]
    replays = max(1, steps - graphed.warmup_steps)
    ms = {g: 1e3 * statistics.median(seconds[g][-replays:]) for g in sides}
    params = [torch.cat([p.detach().flatten().float() for p in sides[g].parameters])
              for g in (True, False)]
    return [Comparison(f"cuda_graph losses ({steps} steps)", "graph", "eager",
                       relative(torch.stack(losses[True]), torch.stack(losses[False])),
                       GRAPH_LOSS_TOLERANCE, ms[True]),
            Comparison("cuda_graph weights", "graph", "eager", relative(*params),
                       GRAPH_WEIGHT_TOLERANCE, ms[True]),
            Comparison("cuda_graph LR", "graph", "eager", relative(
                sides[True].lr.value(), sides[False].lr.value()), 0, ms[False])]


def run_checks(config: Config, device: torch.device, steps: int = 8,
               seed: int = 0) -> tuple[list[Comparison], str]:
    """Every check of this command on `device`, in table order; and the host syncs found."""
    runtime = Runtime.for_config(config, device)
    sizes = Sizes.from_config(config)
    rows = []
    for op, method in op_methods(runtime, device):
        rows += compare_op(op, method, device, sizes, seed)
    stages = [(check_host_syncs, (config, device))]
    if device.type == "cuda":
        stages = [(check_model, (config, device)), *stages,
                  (check_cuda_graph, (config, device, steps))]
    syncs = ""
    for stage, args in stages:
        try:
            out = stage(*args)
        except Exception as error:  # noqa: BLE001 (one failed stage must not hide the others)
            out = [Comparison(stage.__name__.removeprefix("check_"), "", "", math.inf, 0,
                              math.nan, first_line(error))]
        if isinstance(out, tuple):
            out, syncs = out
        rows += out
    return rows, syncs


def _number(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3g}"


def format_table(rows: list[Comparison]) -> str:
    """The rows as an aligned text table; a failed row's error on the line below it."""
    cells = [COLUMNS] + [(r.op, r.method, r.reference, _number(r.max_diff), _number(r.tolerance),
                          "-" if math.isnan(r.ms) else f"{r.ms:.1f}", "PASS" if r.ok else "FAIL")
                         for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = []
    for index, line in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if index and rows[index - 1].error:
            lines.append(f"    {rows[index - 1].error}")
    return "\n".join(lines)


def _json_number(x: float) -> float | None:
    """JSON has no inf or NaN: null."""
    return x if math.isfinite(x) else None


def report_json(rows: list[Comparison], device: torch.device, config_name: str,
                seconds: float) -> dict:
    """The rows (with `ok`; non-finite numbers as null) and the run's facts."""
    return {"device": str(device), "config": config_name, "seconds": seconds,
            "failed": sum(not r.ok for r in rows),
            "rows": [{**{k: _json_number(v) if isinstance(v, float) else v
                         for k, v in dataclasses.asdict(r).items()}, "ok": r.ok} for r in rows]}


def main() -> None:
    if FLAGS.graph_steps < 1:
        raise ConfigError(f"--graph_steps={FLAGS.graph_steps}: must be at least 1")
    device = resolve_device(FLAGS.device)
    config = config_from_flags(data=False)
    if device.type == "cuda":
        # FP32 comparisons with the CPU: no TF32 rounding of matrix products on the device.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        where = f"{torch.cuda.get_device_name(device)}"
    else:
        where = "CPU"
    print(f"maskrcnn-check on {device} ({where}; torch {torch.__version__}), config "
          f"{FLAGS.config}: {Runtime.for_config(config, device).describe()}", flush=True)
    start = time.perf_counter()
    rows, syncs = run_checks(config, device, FLAGS.graph_steps, FLAGS.input_seed)
    seconds = time.perf_counter() - start
    print(format_table(rows))
    if syncs:
        print("host synchronisations found:\n" + syncs)
    failed = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(failed)} of {len(rows)} passed, {len(failed)} failed "
          f"({seconds:.1f} s)" + (": " + ", ".join(f"{r.op} {r.method}" for r in failed)
                                  if failed else ""))
    if FLAGS.json_out:
        Path(FLAGS.json_out).write_text(json.dumps(
            report_json(rows, device, FLAGS.config, seconds), indent=2) + "\n")
    if failed:
        sys.exit(1)


def run() -> None:
    run_command(main)


if __name__ == "__main__":
    run()
