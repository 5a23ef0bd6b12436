"""Checks that our ops and model compute on a GPU what they compute on the CPU.

`python tools/gpu_check.py [--device=cuda]`: the CPU test suite checks every op against a simple
reference; this script checks that the CUDA runs of the same code agree with the CPU runs, on
fresh random inputs: ROIAlign forward and backward, proposal generation (NMS included), fixed-size
NMS (every GPU method: the Triton kernel, the static PyTorch loop, torchvision's shifted call;
against the CPU's per-cell torchvision NMS, up to the recipe's sizes), the Triton ROIAlign
against the gather op at the recipe's sizes in BF16 and FP32 (forward and backward, timed
against torchvision's MultiScaleRoIAlign; CUDA only), anchor matching by the Triton kernels
against the tiled PyTorch path at the recipe's sizes (timed, with peak memory; CUDA only),
mask pasting, the whole
model's five training losses and gradients (deterministic sampling keys, FP32 with TF32 off)
and its detections in eval mode; a few training steps of the trainer's own TrainStep in BF16
and FP16 (losses must be finite); one training step and one inference forward of the 8x4
model under torch.cuda.set_sync_debug_mode("error") (no host synchronisation); then 8 steps
of the 8x4 model replayed as a CUDA graph against the same steps run eagerly (losses,
weights, LR). Prints one
line per check and exits 1 if any fails; --json_out also writes every check and the measured
times as JSON. CI never has a GPU: with --device=cpu it compares the CPU with itself, which
exercises the script only.
"""

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision.ops import MultiScaleRoIAlign

from maskrcnn.bench.measure import time_rounds
from maskrcnn.bench.step import bench_step
from maskrcnn.bench.synthetic import synthetic_batch
from maskrcnn.config import load_config
from maskrcnn.model.anchors import AnchorCache
from maskrcnn.model.maskrcnn import build_model
from maskrcnn.model.sampling import FOREGROUND, match
from maskrcnn.ops.boxes import box_iou
from maskrcnn.ops.nms import batched_nms_fixed
from maskrcnn.ops.paste_masks import paste_masks
from maskrcnn.ops.proposals import generate_proposals
from maskrcnn.ops.roi_align import assign_levels, multilevel_roi_align
from maskrcnn.runtime import Runtime

# Relative error bound (||gpu - cpu|| / ||cpu||) of float32 results computed in different orders.
FP32_RTOL = 1e-4
STRIDES = [4, 8, 16, 32]

# Relative error bound of a BF16 result against FP32 on the same BF16 values: one rounding.
BF16_RTOL = 1e-2

# Anchors (of 8 x 268,569) whose label or matched slot may differ between the Triton matching
# and the tiled path. 0 expected: the kernels compute box_iou's float32 operations without FMA
# contraction and with IEEE division, so the IoUs are the same; should a compiler still change
# a last bit, only an anchor whose IoU is at a threshold or a tie could move, a handful.
MATCH_DIFF_BOUND = 10

failures: list[str] = []
# What --json_out writes: every check's outcome, and the times measured (ms).
results: dict = {"checks": [], "times_ms": {}, "peak_mib": {}}


def _report(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    results["checks"].append({"name": name, "ok": ok, "detail": detail})
    if not ok:
        failures.append(name)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _close(name: str, gpu: torch.Tensor, cpu: torch.Tensor, rtol: float = FP32_RTOL) -> None:
    error = _relative(gpu, cpu)
    _report(name, error <= rtol, f"relative error {error:.2e} (bound {rtol:g})")


def _fixed_keys(labels: torch.Tensor) -> torch.Tensor:
    """Sampling keys that depend on the candidate index only: the same on every device."""
    index = torch.arange(labels.shape[1], dtype=torch.float64, device=labels.device)
    return torch.remainder(torch.sin(index * 12.9898) * 43758.5453, 1.0).float().expand(
        labels.shape)


def check_roi_align(device: torch.device, g: torch.Generator) -> None:
    n, c, h, w = 2, 16, 128, 160
    features = [torch.randn(n, c, h // s, w // s, generator=g) for s in STRIDES]
    side = 8 + torch.rand(300, 2, generator=g) * 100
    corner = torch.rand(300, 2, generator=g) * (torch.tensor([w, h]) - side)
    rois = torch.cat([torch.randint(0, n, (300, 1), generator=g).float(), corner,
                      corner + side], 1)
    grad = torch.randn(300, c, 7, 7, generator=g)
    for aligned in (True, False):
        outs = {}
        for where in (torch.device("cpu"), device):
            leaves = [f.to(where, copy=True).requires_grad_() for f in features]
            pooled = multilevel_roi_align(leaves, rois.to(where), 7, STRIDES, 2, aligned)
            pooled.backward(grad.to(where))
            outs[where.type] = (pooled, [f.grad for f in leaves])
        (gpu, gpu_grads), (cpu, cpu_grads) = outs[device.type], outs["cpu"]
        _close(f"ROIAlign forward (aligned={aligned})", gpu, cpu)
        _close(f"ROIAlign backward (aligned={aligned})", torch.cat(
            [x.flatten() for x in gpu_grads]), torch.cat([x.flatten() for x in cpu_grads]))


def _median_ms(fn, device: torch.device, runs: int = 5) -> float:
    """Median time of fn() over `runs` runs after one warm-up, each from a synchronised device."""
    fn()
    return statistics.median(time_rounds([fn], device, runs)[0]) * 1e3


def check_roi_align_triton(device: torch.device, g: torch.Generator) -> None:
    """The Triton ROIAlign (compiled) against the gather op at the recipe's sizes: 8 images,
    256 channels, P2..P5 of an 800x1344 canvas, channels-last, 512 box RoIs per image at 7x7 and
    128 mask RoIs per image at 14x14, aligned; in BF16 (against the gather op in FP32 on the
    same BF16 values) and FP32, forward and every level's gradient. Then forward + backward
    timed for each (`_time_roi_align`; under BF16 autocast torchvision pools in FP32, as in
    its model)."""
    if device.type != "cuda":
        _report("ROIAlign (triton)", True, "not checked: the Triton kernels run compiled on CUDA "
                "only (the CPU tests run them interpreted, at small sizes)")
        return
    n, c, h, w = 8, 256, 800, 1344
    base = [torch.randn(n, c, h // s, w // s, generator=g).to(device)
            .to(memory_format=torch.channels_last) for s in STRIDES]
    for case, per_image, side in (("box", 512, 7), ("mask", 128, 14)):
        size = 16 + torch.rand(n * per_image, 2, generator=g) * 584
        corner = torch.rand(n * per_image, 2, generator=g) * (torch.tensor([w, h]) - size)
        batch = torch.arange(n).repeat_interleave(per_image).float()[:, None]
        rois = torch.cat([batch, corner, corner + size], 1).to(device)
        grad = torch.randn(n * per_image, c, side, side, generator=g).to(device)
        levels = (assign_levels(rois[:, 1:], 2, 5) - 2).bincount(minlength=4).tolist()
        what = f"{case} {n * per_image} RoIs {side}x{side}, per level {levels}"
        for dtype in (torch.bfloat16, torch.float32):
            name = f"ROIAlign (triton) {case} {str(dtype).removeprefix('torch.')}"
            outs = {}
            # Triton in `dtype`; the reference, the gather op in FP32 on the same values.
            for method, leaf_dtype in (("triton", dtype), ("gather", torch.float32)):
                leaves = [f.to(dtype).to(leaf_dtype, copy=True).requires_grad_() for f in base]
                pooled = multilevel_roi_align(leaves, rois, side, STRIDES, 2, True, method)
                pooled.backward(grad.to(dtype).to(leaf_dtype))
                outs[method] = (pooled, [f.grad for f in leaves])
            (ours, ours_grads), (ref, ref_grads) = outs["triton"], outs["gather"]
            rtol = BF16_RTOL if dtype == torch.bfloat16 else FP32_RTOL
            _report(f"{name}: output dtype", ours.dtype == dtype and all(
                x.dtype == dtype for x in ours_grads), f"{ours.dtype}; {what}")
            _close(f"{name}: forward", ours, ref, rtol)
            _close(f"{name}: backward", torch.cat([x.flatten() for x in ours_grads]),
                   torch.cat([x.flatten() for x in ref_grads]), rtol)
            del outs, ours, ours_grads, ref, ref_grads
            _time_roi_align(f"{case} {str(dtype).removeprefix('torch.')}", base, rois, grad,
                            side, dtype, device)


def _time_roi_align(key: str, base: list[torch.Tensor], rois: torch.Tensor,
                    grad: torch.Tensor, side: int, dtype: torch.dtype,
                    device: torch.device) -> None:
    """Forward + backward times of the Triton op and the gather op (channels-last features,
    aligned) and of torchvision's MultiScaleRoIAlign (NCHW features, its layout; not aligned, as
    it must be: the same work), printed and recorded in results["times_ms"][key]."""
    names = ["p2", "p3", "p4", "p5"]
    features = [f.to(dtype, copy=True).requires_grad_() for f in base]
    tv_features = [f.to(dtype, memory_format=torch.contiguous_format).requires_grad_()
                   for f in base]
    n = features[0].shape[0]
    pooler = MultiScaleRoIAlign(names, side, sampling_ratio=2)
    boxes = list(rois[:, 1:].split(rois.shape[0] // n))
    image_sizes = [(features[0].shape[2] * STRIDES[0], features[0].shape[3] * STRIDES[0])] * n

    def step(pool, leaves):
        def run():
            for f in leaves:
                f.grad = None
            pooled = pool()
            pooled.backward(grad.to(pooled.dtype))
        return run

    def torchvision():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            return pooler(dict(zip(names, tv_features, strict=True)), boxes, image_sizes)

    times = {method: _median_ms(step(lambda method=method: multilevel_roi_align(
        features, rois, side, STRIDES, 2, True, method), features), device)
        for method in ("triton", "gather")}
    times["torchvision"] = _median_ms(step(torchvision, tv_features), device)
    results["times_ms"][f"ROIAlign forward+backward {key}"] = times
    print(f"     ROIAlign forward+backward {key}: " + ", ".join(
        f"{method} {ms:.2f} ms" for method, ms in times.items())
        + f" (torchvision / triton {times['torchvision'] / times['triton']:.2f}x)", flush=True)


def check_match_triton(device: torch.device, g: torch.Generator) -> None:
    """Anchor matching by the Triton kernels (compiled) against the tiled PyTorch path at the
    recipe's sizes: 8 images, 100 ground-truth slots (5 to 15 used per image), the 268,569
    anchors of an 800x1344 canvas with the 8x4 config's anchors; the RPN's rule (0.7, 0.3, low
    quality matches) and the RoI heads' (0.5, 0.5). Matched slots and labels must agree up to
    MATCH_DIFF_BOUND anchors; the kernels' best IoUs are counted against box_iou's, bit for
    bit. Then both paths timed, with the peak memory each allocates (results["peak_mib"])."""
    if device.type != "cuda":
        _report("match (triton)", True, "not checked: needs CUDA")
        return
    from maskrcnn.ops.match_triton import match_triton  # noqa: PLC0415 (needs Triton)
    n, slots, (h, w) = 8, 100, (800, 1344)
    a = load_config("8x4").model.anchors
    anchors = torch.cat(AnchorCache([(h, w)], list(a.sizes), list(a.aspect_ratios),
                                    list(a.strides))((h, w))).to(device)  # (A, 4)
    anchor_valid = torch.ones(anchors.shape[0], dtype=torch.bool, device=device)
    xy = torch.rand(n, slots, 2, generator=g) * torch.tensor([w - 200, h - 200])
    gt_boxes = torch.cat([xy, xy + 16 + torch.rand(n, slots, 2, generator=g) * 180], -1)
    used = torch.randint(5, 16, (n, 1), generator=g)
    gt_valid = (torch.arange(slots)[None, :] < used).to(device)
    gt_boxes = gt_boxes.to(device)
    what = (f"{n} images, {slots} slots each ({int(used.sum())} used in all), "
            f"{anchors.shape[0]} anchors")
    best, _, _ = match_triton(anchors, anchor_valid, gt_boxes, gt_valid, False)
    ref = torch.stack([torch.where(gt_valid[i, :, None], box_iou(gt_boxes[i], anchors), -1.0)
                       .amax(dim=0) for i in range(n)])  # (N, A), one image's IoUs at a time
    off = int((best != ref).sum())
    _report("match (triton): best IoUs bitwise equal to box_iou's", off <= MATCH_DIFF_BOUND,
            f"{off} of {best.numel()} differ (bound {MATCH_DIFF_BOUND}, 0 expected); {what}")
    del best, ref
    for fg_iou, bg_iou, low_quality in ((0.7, 0.3, True), (0.5, 0.5, False)):
        args = (anchors, anchor_valid, gt_boxes, gt_valid, fg_iou, bg_iou, low_quality)
        rule = f"({fg_iou}, {bg_iou}{', low quality' if low_quality else ''})"
        (ours_matched, ours_labels), (matched, labels) = (match(*args, method=method)
                                                          for method in ("triton", "tiled"))
        off = int(((ours_matched != matched) | (ours_labels != labels)).sum())
        _report(f"match (triton) {rule}: same matched slots and labels", off <= MATCH_DIFF_BOUND,
                f"{off} anchors differ (bound {MATCH_DIFF_BOUND}, 0 expected), "
                f"{int((ours_labels != labels).sum())} in their label; "
                f"{int((labels == FOREGROUND).sum())} foreground")
        del ours_matched, ours_labels, matched, labels
    # The RPN's rule (two passes over the ground truth), timed.
    args = (anchors, anchor_valid, gt_boxes, gt_valid, 0.7, 0.3, True)
    times, peaks = {}, {}
    for method in ("triton", "tiled"):
        times[method] = _median_ms(lambda method=method: match(*args, method=method), device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = match(*args, method=method)
        torch.cuda.synchronize(device)
        peaks[method] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        del out
    key = f"match {n}x{slots}x{anchors.shape[0]} (0.7, 0.3, low quality)"
    results["times_ms"][key] = times
    results["peak_mib"][key] = peaks
    print(f"     {key}: " + ", ".join(f"{m} {times[m]:.2f} ms (peak {peaks[m]:.0f} MiB)"
                                      for m in times), flush=True)


def _gpu_methods(device: torch.device) -> list[str]:
    """The NMS methods to check on the device: the synchronisation-free ones and the old one."""
    return ["triton", "torch", "shifted"] if device.type == "cuda" else ["torch", "per_cell"]


def check_proposals(device: torch.device, g: torch.Generator) -> None:
    """Proposals at a small size with every method, and at one FPN canvas of the 8x4 recipe
    (800x1344, 2000 per level -> 1000) with the default one, against the CPU's per_cell."""
    for h, w, n, pre, post in ((128, 160, 2, 300, 200), (800, 1344, 2, 2000, 1000)):
        anchors = AnchorCache([(h, w)], [32, 64, 128, 256, 512], [0.5, 1.0, 2.0],
                              [4, 8, 16, 32, 64])((h, w))
        logits = [torch.randn(n, a.shape[0], generator=g) for a in anchors]
        deltas = [torch.randn(n, a.shape[0], 4, generator=g) * 0.1 for a in anchors]
        sizes = torch.tensor([[h, w], [h * 3 // 4, w * 2 // 3]])
        cb, cs, cv = generate_proposals(logits, deltas, anchors, sizes, pre, post, 0.7, 0.0,
                                        "per_cell")
        methods = _gpu_methods(device) if h == 128 else _gpu_methods(device)[:1]
        for method in methods:
            gb, gs, gv = generate_proposals(
                [x.to(device) for x in logits], [x.to(device) for x in deltas],
                [x.to(device) for x in anchors], sizes.to(device), pre, post, 0.7, 0.0, method)
            name = f"proposals {h}x{w} ({method})"
            same_valid = torch.equal(gv.cpu(), cv)
            _report(f"{name}: same valid slots", same_valid,
                    f"{int(gv.sum())} / {int(cv.sum())} valid")
            if same_valid:
                _close(f"{name}: boxes", gb[gv], cb[cv])
                _close(f"{name}: scores", gs[gv], cs[cv])


def check_nms(device: torch.device, g: torch.Generator) -> None:
    """Fixed-size NMS with every method against the CPU's per_cell at three sizes: small, one
    RPN level of 8 images (2000 candidates, 1000 kept) and the detection NMS (5000
    candidates of 80 classes, 100 kept)."""
    for b, k, groups, max_out in ((3, 400, 4, 100), (8, 2000, 1, 1000), (2, 5000, 80, 100)):
        xy = torch.rand(b, k, 2, generator=g) * 800
        boxes = torch.cat([xy, xy + 10 + torch.rand(b, k, 2, generator=g) * 200], -1)
        scores = torch.rand(b, k, generator=g)
        valid = torch.rand(b, k, generator=g) > 0.2
        group = torch.randint(0, groups, (b, k), generator=g)
        ci, ck = batched_nms_fixed(boxes, scores, valid, group, 0.5, max_out, "per_cell")
        for method in _gpu_methods(device):
            gi, gk = batched_nms_fixed(boxes.to(device), scores.to(device), valid.to(device),
                                       group.to(device), 0.5, max_out, method)
            same = torch.equal(gk.cpu(), ck) and torch.equal(gi.cpu()[ck], ci[ck])
            _report(f"NMS {b}x{k}, {groups} groups ({method}): same kept boxes", same,
                    f"{int(ck.sum())} kept of {b * k}")


def check_no_host_sync(device: torch.device) -> None:
    """One eager training step and one inference forward of the 8x4 recipe's model (2 images,
    BF16) under torch.cuda.set_sync_debug_mode("error"): any synchronising op raises."""
    if device.type != "cuda":
        _report("no host synchronisation", True, "not checked: needs CUDA")
        return
    config = load_config("8x4", ["run { images_per_gpu: 2 cuda_graph: false }"])
    trainer = bench_step(config, device)
    batch = synthetic_batch(config).to(device)
    trainer(batch)  # warm-up: cuDNN autotuning and lazy initialisation
    torch.cuda.synchronize(device)
    for what, run in (("training step", lambda: trainer(batch)),
                      ("inference forward", lambda: trainer.model.eval()(batch.images,
                                                                         batch.image_sizes))):
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.no_grad() if what != "training step" else contextlib.nullcontext():
                run()
            ok, detail = True, "no synchronising op"
        except RuntimeError as error:
            ok, detail = False, str(error).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(device)
        _report(f"no host synchronisation in the {what}", ok, detail)


def check_paste_masks(device: torch.device, g: torch.Generator) -> None:
    masks = torch.rand(2, 10, 28, 28, generator=g)
    xy = torch.rand(2, 10, 2, generator=g) * 120
    boxes = torch.cat([xy, xy + 4 + torch.rand(2, 10, 2, generator=g) * 80], -1)
    _close("paste_masks", paste_masks(masks.to(device), boxes.to(device), 160, 192),
           paste_masks(masks, boxes, 160, 192))


def _model_config():
    return load_config("shapes", ["run { images_per_gpu: 2 precision: FP32 }"])


def check_model(device: torch.device) -> None:
    """The whole model on the same batch and weights: training losses, gradients, detections."""
    config = _model_config()
    batch = synthetic_batch(config, seed=1)
    torch.manual_seed(0)
    cpu_model = build_model(config, keys=_fixed_keys)
    gpu_model = build_model(config, Runtime.for_device(device), keys=_fixed_keys)
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.to(device)
    results = {}
    for where, model in (("cpu", cpu_model), (device.type, gpu_model)):
        on = batch.to(torch.device(where) if where == "cpu" else device)
        inputs = (on.images, on.image_sizes, on.gt_boxes, on.gt_classes, on.gt_valid,
                  on.gt_masks)
        losses = model(*inputs)
        total = torch.stack(list(losses.values())).sum()
        total.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        model.eval()
        with torch.no_grad():
            detections = model(*inputs[:2])
        results[where] = (torch.stack(list(losses.values())), grads, detections)
    (gl, gg, gd), (cl, cg, cd) = results[device.type], results["cpu"]
    _close("model: five training losses", gl, cl)
    _close("model: gradients", gg, cg, rtol=1e-3)
    _close("model: detection scores", gd["scores"], cd["scores"], rtol=1e-3)
    # Random weights give near-equal scores, so rounding can swap detections between slots:
    # each GPU detection must have a CPU detection of its image and class at IoU > 0.99.
    matched, total = 0, 0
    for i in range(len(batch)):
        gv, cv = gd["valid"][i].cpu(), cd["valid"][i]
        g_boxes, c_boxes = gd["boxes"][i].cpu()[gv], cd["boxes"][i][cv]
        same_class = gd["classes"][i].cpu()[gv][:, None] == cd["classes"][i][cv][None, :]
        iou = box_iou(g_boxes, c_boxes) * same_class
        matched += int((iou.amax(1) > 0.99).sum()) if iou.numel() else 0
        total += len(g_boxes)
    _report("model: detections (same boxes and classes)",
            matched == total and int(gd["valid"].sum()) == int(cd["valid"].sum()),
            f"{matched} of {total} GPU detections match a CPU one; {int(cd['valid'].sum())} "
            f"on the CPU")


def check_training(device: torch.device) -> None:
    """A few steps of the trainer's own TrainStep in each autocast precision."""
    for precision in ("BF16", "FP16"):
        config = load_config("shapes", [f"run {{ images_per_gpu: 4 precision: {precision} }}"])
        trainer = bench_step(config, device)
        batch = synthetic_batch(config).to(device)
        losses = torch.stack([trainer(batch) for _ in range(3)])
        _report(f"train_step in {precision}: finite losses", bool(torch.isfinite(losses).all()),
                "losses of step 3: " + " ".join(f"{x:.4f}" for x in losses[-1].tolist()))


def check_cuda_graph(device: torch.device, steps: int = 8) -> None:
    """The 8x4 recipe's step (2 images, BF16) replayed as a CUDA graph against the same step
    run eagerly, from the same weights, with the same sampling keys (the generator seeded
    alike before each step): 3 eager warm-up steps, the capture, then replays. BF16 bound:
    the two run the same kernels, but atomic adds (ROIAlign's backward) sum in another order,
    and 8 steps of SGD carry those differences into the weights."""
    if device.type != "cuda":
        _report("CUDA graph against eager", True, "not checked: needs CUDA")
        return
    sides = {}
    for graphed in (False, True):
        flag = str(graphed).lower()
        config = load_config("8x4", [f"run {{ images_per_gpu: 2 cuda_graph: {flag} }}"])
        sides[graphed] = bench_step(config, device)
    batch = synthetic_batch(config).to(device)
    losses = {False: [], True: []}
    seconds = {False: [], True: []}
    for step in range(steps):
        for graphed, trainer in sides.items():
            torch.manual_seed(step)
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            losses[graphed].append(trainer(batch))
            torch.cuda.synchronize(device)
            seconds[graphed].append(time.perf_counter() - start)
    replays = steps - sides[True].graphed.warmup_steps
    _report("CUDA graph: captured once", len(sides[True].graphed.graphs) == 1,
            f"{len(sides[True].graphed.graphs)} graph(s), {replays} replayed steps")
    _close(f"CUDA graph: losses of {steps} steps against eager", torch.stack(losses[True]),
           torch.stack(losses[False]), rtol=BF16_RTOL)
    params = [torch.cat([p.detach().flatten().float() for p in sides[g].parameters])
              for g in (True, False)]
    _close(f"CUDA graph: weights after {steps} steps against eager", *params, rtol=1e-3)
    _close(f"CUDA graph: LR after {steps} steps", sides[True].lr.value(),
           sides[False].lr.value(), rtol=0)
    for graphed, name in ((False, "eager"), (True, "graphed")):
        results["times_ms"][f"8x4 step, 2 images, {name}"] = 1e3 * statistics.median(
            seconds[graphed][-replays:])
    print(f"     step ms (median of the last {replays}): eager "
          f"{results['times_ms']['8x4 step, 2 images, eager']:.1f}, graphed "
          f"{results['times_ms']['8x4 step, 2 images, graphed']:.1f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json_out", default=None, help="also write the results to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(f"--device={device}: no CUDA device is available")
            return 2
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}")
    start = time.perf_counter()
    g = torch.Generator().manual_seed(int(time.time()))  # fresh inputs every run
    checks = ((check_roi_align, (device, g)), (check_roi_align_triton, (device, g)),
              (check_match_triton, (device, g)), (check_proposals, (device, g)),
              (check_nms, (device, g)), (check_paste_masks, (device, g)),
              (check_model, (device,)), (check_training, (device,)),
              (check_no_host_sync, (device,)), (check_cuda_graph, (device,)))
    for check, check_args in checks:  # not `args`: the command line's, read below
        try:
            check(*check_args)
        except Exception as error:  # noqa: BLE001 (one failed check must not hide the others)
            _report(check.__name__, False, f"raised {type(error).__name__}: "
                    + (str(error).splitlines() or [""])[0])
    print(f"{len(failures)} failed ({time.perf_counter() - start:.1f} s)"
          + (": " + ", ".join(failures) if failures else ""))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
