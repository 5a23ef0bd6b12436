"""Op micro-benchmarks at a config's training-step sizes: ours against torchvision's.

Shape legend: N images (run.images_per_gpu), H x W the first canvas, C FPN channels, A_l anchors
on level l, R RoIs per image (roi_heads.batch_size_per_image), F mask slots per image.

Proposals (NMS included): ours is `generate_proposals` (per level: top-k logits, decode those,
clip, drop small boxes, NMS; then the best P per image; batched over the images), once per NMS
method: the device's default (a GPU's: the Triton kernel), the static PyTorch loop, and
torchvision's nms in one shifted call (the GPU path before the kernel, which synchronises).
torchvision's is what its RegionProposalNetwork runs after the head in training:
BoxCoder.decode of every anchor, then filter_proposals (per level top-k, clip, drop small
boxes, one batched_nms over the levels per image, best P). Same random logits and deltas,
same anchors, the config's RPN training top-k and NMS threshold.

ROIAlign: ours is `multilevel_roi_align`, once per method the device runs ("gather", the
default; on CUDA also "triton", the Triton kernels: on a CPU they only run interpreted, far too
slow at these sizes), torchvision's MultiScaleRoIAlign (level assignment, one roi_align per
level), on the same float32 NCHW P2..P5 features (requiring grad) and random RoIs; all not
aligned (torchvision's MultiScaleRoIAlign cannot be) with sampling ratio 2.
Box-head case: N x R RoIs at pooler_resolution; mask-head case: N x F RoIs at
mask_pooler_resolution. "backward" is pooled.backward(grad) until every level's .grad is
written. Every time is the median of the timed runs, each from and to a synchronised device.
"""

import functools
import statistics
import time
from collections.abc import Callable

import torch
from torchvision.ops import MultiScaleRoIAlign

from maskrcnn.bench.measure import synchronize
from maskrcnn.bench.torchvision_baseline import POOLED, build_torchvision_model
from maskrcnn.config import Config
from maskrcnn.model.anchors import AnchorCache
from maskrcnn.ops.proposals import generate_proposals
from maskrcnn.ops.roi_align import multilevel_roi_align
from maskrcnn.runtime import Runtime

# Random inputs: RPN logits ~ N(0, 1), deltas ~ N(0, DELTA_STD); RoI sides uniform in
# [ROI_MIN_SIDE, min(ROI_MAX_SIDE, canvas side)] pixels, so they spread over all four levels.
DELTA_STD = 0.1
ROI_MIN_SIDE, ROI_MAX_SIDE = 16.0, 600.0
ROI_STRIDES = [4, 8, 16, 32]  # P2..P5


def _median_ms(run: Callable[[], float], runs: int, warmup: int) -> float:
    """Median of `runs` values of run() (seconds it measured) after `warmup` calls, in ms."""
    for _ in range(warmup):
        run()
    return statistics.median(run() for _ in range(runs)) * 1e3


def _timed(fn: Callable[[], object], device: torch.device) -> Callable[[], float]:
    def run() -> float:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - start
    return run


def _row(op: str, case: str, ours_ms: float, theirs_ms: float, check: str) -> dict:
    return {"op": op, "case": case, "ours_ms": ours_ms, "torchvision_ms": theirs_ms,
            "speedup": theirs_ms / ours_ms, "check": check}


def bench_proposals(config: Config, device: torch.device, runs: int, warmup: int) -> list[dict]:
    """Proposal generation of one training step: ours, with each NMS method the device runs
    (ops/nms.py; the default first), against torchvision's RPN filtering. One row each."""
    n = config.run.images_per_gpu
    h, w = config.data.canvas[0].height, config.data.canvas[0].width
    a, rpn = config.model.anchors, config.model.rpn
    anchors = [x.to(device) for x in AnchorCache([(h, w)], list(a.sizes), list(a.aspect_ratios),
                                                 list(a.strides))((h, w))]
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(n, x.shape[0], generator=g).to(device) for x in anchors]  # (N, A_l)
    deltas = [(torch.randn(n, x.shape[0], 4, generator=g) * DELTA_STD).to(device)
              for x in anchors]
    image_sizes = torch.tensor([[h, w]] * n, device=device)
    tv_rpn = build_torchvision_model(config).rpn.to(device).train()
    all_anchors = torch.cat(anchors)  # (A, 4), levels in order as torchvision's
    tv_logits = torch.cat(logits, dim=1).reshape(-1, 1)  # (N, A) -> (N*A, 1)
    tv_deltas = torch.cat(deltas, dim=1).reshape(-1, 4)  # (N, A, 4) -> (N*A, 4)

    def ours(method: str):
        return generate_proposals(logits, deltas, anchors, image_sizes, rpn.pre_nms_topk_train,
                                  rpn.post_nms_topk_train, rpn.nms_threshold, rpn.min_box_size,
                                  method)

    def theirs():
        boxes = tv_rpn.box_coder.decode(tv_deltas, [all_anchors] * n).view(n, -1, 4)
        return tv_rpn.filter_proposals(boxes, tv_logits, [(h, w)] * n,
                                       [x.shape[0] for x in anchors])

    theirs_ms = _median_ms(_timed(theirs, device), runs, warmup)
    kept_theirs = sum(len(b) for b in theirs()[0]) / n
    case = (f"N={n}, {h}x{w}, {sum(x.shape[0] for x in anchors)} anchors, top "
            f"{rpn.pre_nms_topk_train}/level -> {rpn.post_nms_topk_train}")
    default = Runtime.for_device(device).nms
    methods = [default] + [m for m in ("torch", "shifted") if m != default]
    rows = []
    for method in methods:
        ours_ms = _median_ms(_timed(lambda method=method: ours(method), device), runs, warmup)
        kept_ours = ours(method)[2].sum().item() / n  # a sanity figure, outside the timing
        rows.append(_row(f"proposals (nms={method})", case, ours_ms, theirs_ms,
                         f"kept per image {kept_ours:.0f} / {kept_theirs:.0f}"))
    return rows


def _random_rois(n: int, per_image: int, canvas: tuple[int, int],
                 generator: torch.Generator) -> torch.Tensor:
    """float[N*per_image, 5] (batch index, x1, y1, x2, y2) inside the canvas."""
    height, width = canvas
    limits = torch.tensor([min(ROI_MAX_SIDE, width), min(ROI_MAX_SIDE, height)])
    size = ROI_MIN_SIDE + torch.rand(n * per_image, 2, generator=generator) * (
        limits - ROI_MIN_SIDE)
    corner = torch.rand(n * per_image, 2, generator=generator) * (
        torch.tensor([width, height]) - size)
    batch = torch.arange(n).repeat_interleave(per_image).float()
    return torch.cat([batch[:, None], corner, corner + size], dim=1)


def roi_align_methods(device: torch.device) -> list[str]:
    """The ROIAlign methods benchmarked on a device: "gather", and on CUDA "triton"."""
    return ["gather", "triton"] if device.type == "cuda" else ["gather"]


def bench_roi_align(config: Config, device: torch.device, case: str, per_image: int,
                    side: int, runs: int, warmup: int) -> list[dict]:
    """ROIAlign forward and backward of one pooler: two rows (forward, backward) per method of
    `roi_align_methods`, the "gather" ones unsuffixed."""
    n, c = config.run.images_per_gpu, config.model.fpn_channels
    h, w = config.data.canvas[0].height, config.data.canvas[0].width
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(n, c, h // s, w // s, generator=g).to(device).requires_grad_()
                for s in ROI_STRIDES]
    rois = _random_rois(n, per_image, (h, w), g).to(device)
    grad = torch.randn(n * per_image, c, side, side, generator=g).to(device)
    tv_pooler = MultiScaleRoIAlign(POOLED, side, sampling_ratio=2)
    tv_features = dict(zip(POOLED, features, strict=True))
    tv_boxes = list(rois[:, 1:].split(per_image))

    def ours(method: str) -> torch.Tensor:
        return multilevel_roi_align(features, rois, side, ROI_STRIDES, 2, False, method)

    def theirs():
        return tv_pooler(tv_features, tv_boxes, [(h, w)] * n)

    def backward_of(pool: Callable[[], torch.Tensor]) -> Callable[[], float]:
        def run() -> float:
            for f in features:
                f.grad = None
            pooled = pool()
            synchronize(device)
            start = time.perf_counter()
            pooled.backward(grad)
            synchronize(device)
            return time.perf_counter() - start
        return run

    with torch.no_grad():
        theirs_forward_ms = _median_ms(_timed(theirs, device), runs, warmup)
    theirs_backward_ms = _median_ms(backward_of(theirs), runs, warmup)
    what = f"{case}: N={n}, C={c}, {h}x{w}, {n * per_image} RoIs, {side}x{side}"
    rows = []
    for method in roi_align_methods(device):
        pool = functools.partial(ours, method)
        suffix = "" if method == "gather" else f" ({method})"
        with torch.no_grad():
            forward_ms = _median_ms(_timed(pool, device), runs, warmup)
            diff = (pool() - theirs()).abs().max().item()
        backward_ms = _median_ms(backward_of(pool), runs, warmup)
        rows += [_row(f"ROIAlign forward{suffix}", what, forward_ms, theirs_forward_ms,
                      f"max |ours - tv| {diff:.1e}"),
                 _row(f"ROIAlign backward{suffix}", what, backward_ms, theirs_backward_ms, "")]
    return rows


def bench_ops(config: Config, device: torch.device, runs: int, warmup: int) -> list[dict]:
    """Every op row: proposals, then ROIAlign forward and backward (per method) for the box and
    mask heads.

    Returns dicts {"op", "case", "ours_ms", "torchvision_ms", "speedup" (torchvision / ours),
    "check" (a sanity figure comparing the two outputs)}.
    """
    roi = config.model.roi_heads
    if "triton" not in roi_align_methods(device):
        print(f"ops: no ROIAlign (triton) rows on {device.type}: the Triton kernels run "
              f"compiled on CUDA only (interpreted on a CPU, far too slow at these sizes)",
              flush=True)
    return [
        *bench_proposals(config, device, runs, warmup),
        *bench_roi_align(config, device, "box head", roi.batch_size_per_image,
                         roi.pooler_resolution, runs, warmup),
        *bench_roi_align(config, device, "mask head",
                         min(roi.max_fg_masks_per_image, roi.batch_size_per_image),
                         roi.mask_pooler_resolution, runs, warmup),
    ]
