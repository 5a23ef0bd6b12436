"""Each fast op path against its PyTorch path on the same random inputs, as plain results.

Shape legend: N images, G ground-truth slots, L anchor levels (P2..P6), A anchors, B = N x L
NMS rows, K candidates per row, O kept slots per row, R RoIs, C channels, P pooled side.

`compare_op(op, method, device, sizes)` runs one op by `method` (the fast path, e.g. "triton")
and by its reference on the same seeded inputs, and returns one `Comparison` per output it
checks (ROIAlign: forward and backward). It never raises for a broken fast path: an exception
(a Triton compile error included) becomes a failed Comparison carrying its first line. Used by
`maskrcnn-check` (the config's sizes) and before training on a GPU (`Sizes.small()`, to fall
back to the PyTorch path when a kernel fails). Its host reads (`.cpu()`, `.item()`, `nonzero`)
are deliberate: the comparisons run outside any training step, never inside one.

The reference of each op and method:
- "nms" (runtime.NMS_METHODS): "torch" on the same device; for "torch" itself, "per_cell"
  (torchvision's C++ NMS) on the CPU.
- "proposals" (NMS methods): "per_cell" on the CPU; for "per_cell" itself, "torch".
- "roi_align" (runtime.ROI_ALIGN_METHODS): "gather" on the same device; for "gather" itself,
  torchvision's roi_align on each RoI's level. Float32, channels-last features.
- "match" (runtime.MATCH_METHODS), the RPN's rule: "tiled" on the same device; for "tiled" itself,
  `match_reference`, one image at a time (its IoU matrix is G x A floats per image).
- "paste_masks" (method "matmul", the op's only one): `paste_masks_reference` in float64, on
  the first PASTE_REFERENCE_DETECTIONS detections of the first image (its loop is slow).

max_diff: for outputs whose maths is exact (kept indices, matched slots and labels, valid
slots) the number of output entries that differ; for float outputs the largest absolute
difference divided by the reference's largest magnitude (scale-free), inf when the fast path
gives a non-finite value or another shape.
"""

import dataclasses
import math
import time
from collections.abc import Callable

import torch
from torchvision.ops import roi_align as tv_roi_align

from maskrcnn.model.anchors import AnchorCache
from maskrcnn.model.sampling import match, match_reference
from maskrcnn.ops.nms import batched_nms_fixed
from maskrcnn.ops.paste_masks import paste_masks, paste_masks_reference
from maskrcnn.ops.proposals import generate_proposals
from maskrcnn.ops.roi_align import assign_levels, multilevel_roi_align

OPS = ("nms", "proposals", "roi_align", "match", "paste_masks")

# Kept indices, matched slots and labels: both paths compute the same float32 operations in
# the same order (the matching kernels without FMA contraction and with IEEE division; NMS
# ranks with the same sorts and compares the same IoUs), so any difference is a bug.
EXACT_TOLERANCE = 0.0
# ROIAlign in float32, relative to the largest value: each output sums 4*S*S bilinear taps and
# each gradient many RoIs' contributions, in another order (atomics on a GPU) and perhaps with
# FMA contraction: about 1e-6 expected. A wrong tap, weight or level shows as 1e-2 or more.
ROI_ALIGN_TOLERANCE = 1e-4
# Proposal boxes decoded in float32 on two devices (exp, multiply-add): about 1e-7 of the
# largest coordinate expected (1e-5 of 1344 px is 0.01 px); the scores are copied logits.
PROPOSALS_TOLERANCE = 1e-5
# Pasted mask probabilities in float32 against float64, relative to the largest (about 1):
# the op's tests hold 1e-5.
PASTE_TOLERANCE = 1e-5
PASTE_REFERENCE_DETECTIONS = 8
# As the RoI heads (model/roi_heads.py).
SAMPLING_RATIO = 2
POOLED_LEVELS = 4
# The RPN's matching rule of the recipes (fg IoU, bg IoU, low-quality matches).
RPN_RULE = (0.7, 0.3, True)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The sizes a comparison runs at.

    images: N; height, width: the canvas; gt_slots: G, of which gt_used are valid per image;
    anchor_sizes, aspect_ratios, strides: the anchors of levels P2..P6 (ROIAlign pools the
    first POOLED_LEVELS); pre_nms_topk: K, candidates per image and level; post_nms_topk: O;
    nms_threshold; rois_per_image and pooler_resolution (P): the box head's RoIs; channels: C;
    aligned: ROIAlign's half-pixel shift; detections_per_image and mask_resolution: the masks
    pasted at canvas size.
    """

    images: int
    height: int
    width: int
    gt_slots: int
    gt_used: int
    anchor_sizes: tuple[float, ...]
    aspect_ratios: tuple[float, ...]
    strides: tuple[int, ...]
    pre_nms_topk: int
    post_nms_topk: int
    nms_threshold: float
    rois_per_image: int
    pooler_resolution: int
    channels: int
    aligned: bool
    detections_per_image: int
    mask_resolution: int

    @classmethod
    def small(cls) -> "Sizes":
        """Tiny: each comparison well under a second in Triton's interpreter on a CPU. NMS at
        IoU 0.5: anchors one stride apart overlap at IoU 0.6 here, so NMS removes boxes among
        the few top proposals (at 0.7 it would remove none, and check nothing)."""
        return cls(images=2, height=64, width=96, gt_slots=8, gt_used=5,
                   anchor_sizes=(16, 32, 64, 128, 256), aspect_ratios=(0.5, 1.0, 2.0),
                   strides=(4, 8, 16, 32, 64), pre_nms_topk=64, post_nms_topk=32,
                   nms_threshold=0.5, rois_per_image=8, pooler_resolution=7, channels=8,
                   aligned=True, detections_per_image=4, mask_resolution=28)

    @classmethod
    def from_config(cls, config) -> "Sizes":
        """The sizes of one training step of `config` on one GPU (8x4: 4 images of 800x1344,
        100 slots, 2000 candidates per level and image, 1000 kept, 512 RoIs per image, 256
        channels); gt_used: 15 (COCO images have 7 instances on average)."""
        m, data = config.model, config.data
        canvas = data.canvas[0]
        return cls(images=config.run.images_per_gpu, height=canvas.height, width=canvas.width,
                   gt_slots=data.max_instances, gt_used=min(data.max_instances, 15),
                   anchor_sizes=tuple(m.anchors.sizes),
                   aspect_ratios=tuple(m.anchors.aspect_ratios),
                   strides=tuple(m.anchors.strides), pre_nms_topk=m.rpn.pre_nms_topk_train,
                   post_nms_topk=m.rpn.post_nms_topk_train, nms_threshold=m.rpn.nms_threshold,
                   rois_per_image=m.roi_heads.batch_size_per_image,
                   pooler_resolution=m.roi_heads.pooler_resolution, channels=m.fpn_channels,
                   aligned=m.roi_heads.roi_align_aligned,
                   detections_per_image=m.roi_heads.detections_per_image,
                   mask_resolution=m.roi_heads.mask_resolution)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One output of one op by `method` against `reference` (module docstring: max_diff)."""

    op: str
    method: str
    reference: str
    max_diff: float
    tolerance: float
    ms: float  # time of the fast path's call (on CUDA after one warm-up call)
    error: str | None = None  # the first line of the fast path's exception, when it raised

    @property
    def ok(self) -> bool:
        return self.error is None and self.max_diff <= self.tolerance


def first_line(error: BaseException) -> str:
    """`Type: first line of the message`."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """fn()'s result and its milliseconds, from a synchronised device to a synchronised one."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, (time.perf_counter() - start) * 1e3


def _warm_timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """fn() timed; on CUDA after one untimed call (the first compiles the Triton kernels and
    initialises cuBLAS; a CPU compiles nothing, and the interpreter is slow enough once)."""
    if device.type == "cuda":
        fn()
    return _timed(fn, device)


def relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| in float64; inf for another shape or a non-finite value."""
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    if ours.shape != ref.shape or not torch.isfinite(ours).all():
        return math.inf
    if ref.numel() == 0:
        return 0.0
    return ((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def _count_different(*pairs: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Entries where any pair differs (all pairs one shape); inf for another shape."""
    different = None
    for ours, ref in pairs:
        ours, ref = ours.detach().cpu(), ref.detach().cpu()
        if ours.shape != ref.shape:
            return math.inf
        d = ours != ref
        different = d if different is None else different | d
    return float(different.sum())


def _boxes(g: torch.Generator, shape: tuple[int, ...], height: int, width: int,
           min_side: float = 2.0) -> torch.Tensor:
    """Random float32[*shape, 4] (x1, y1, x2, y2) boxes inside a height x width canvas."""
    side = min_side + torch.rand(*shape, 2, generator=g) * torch.tensor([width, height]) * 0.5
    corner = torch.rand(*shape, 2, generator=g) * (torch.tensor([width, height]) - side)
    return torch.cat([corner, corner + side], -1)


def _anchors(sizes: Sizes) -> list[torch.Tensor]:
    """Per level float[A_l, 4] anchors of the canvas."""
    canvas = (sizes.height, sizes.width)
    return AnchorCache([canvas], list(sizes.anchor_sizes), list(sizes.aspect_ratios),
                       list(sizes.strides))(canvas)


def _nms_inputs(sizes: Sizes, g: torch.Generator) -> tuple:
    """B = N x L rows of K candidates with 3 groups; ties: scores in K/2 steps, every 7th box
    a copy of the one before, every 11th (from the 6th) of zero width; about 10% invalid."""
    b, k = sizes.images * len(sizes.strides), sizes.pre_nms_topk
    boxes = _boxes(g, (b, k), sizes.height, sizes.width)
    boxes[:, 1::7] = boxes[:, 0:-1:7][:, :boxes[:, 1::7].shape[1]]
    boxes[:, 5::11, 2] = boxes[:, 5::11, 0]
    scores = torch.randint(0, max(k // 2, 1), (b, k), generator=g).float() / k
    valid = torch.rand(b, k, generator=g) > 0.1
    groups = torch.randint(0, 3, (b, k), generator=g)
    return boxes, scores, valid, groups


def _compare_nms(method: str, device: torch.device, sizes: Sizes,
                 g: torch.Generator) -> list[Comparison]:
    inputs = _nms_inputs(sizes, g)
    args = (sizes.nms_threshold, sizes.post_nms_topk)
    reference = reference_of("nms", method)
    where = torch.device("cpu") if reference == "per_cell" else device
    ref_indices, ref_keep = batched_nms_fixed(*(x.to(where) for x in inputs), *args, reference)
    on_device = [x.to(device) for x in inputs]
    (indices, keep), ms = _warm_timed(lambda: batched_nms_fixed(*on_device, *args, method),
                                      device)
    # Kept slots and, where kept, their indices (free slots hold index 0 by contract).
    diff = _count_different((keep, ref_keep), (torch.where(keep, indices, -1).cpu(),
                                               torch.where(ref_keep, ref_indices, -1).cpu()))
    return [Comparison("nms", method, reference, diff, EXACT_TOLERANCE, ms)]


def _compare_proposals(method: str, device: torch.device, sizes: Sizes,
                       g: torch.Generator) -> list[Comparison]:
    """Logits without ties (topk's order among equal values differs between devices); deltas
    that move some boxes off the image (clipped) and shrink some to nothing (dropped)."""
    anchors = _anchors(sizes)
    n = sizes.images
    logits = [torch.randn(n, a.shape[0], generator=g) for a in anchors]
    deltas = [torch.randn(n, a.shape[0], 4, generator=g) * 0.5 for a in anchors]
    image_sizes = torch.tensor([[sizes.height, sizes.width]] * n)
    image_sizes[1::2] = torch.tensor([sizes.height * 3 // 4, sizes.width * 2 // 3])
    args = (sizes.pre_nms_topk, sizes.post_nms_topk, sizes.nms_threshold, 0.0)
    reference = reference_of("proposals", method)
    ref = generate_proposals(logits, deltas, anchors, image_sizes, *args, reference)
    on_device = [[x.to(device) for x in xs] for xs in (logits, deltas, anchors)]
    (boxes, scores, valid), ms = _warm_timed(lambda: generate_proposals(
        *on_device, image_sizes.to(device), *args, method), device)
    ref_boxes, ref_scores, ref_valid = ref
    diff = _count_different((valid, ref_valid))
    if diff == 0:
        valid = valid.cpu()
        diff = max(relative(boxes.cpu()[valid], ref_boxes[ref_valid]),
                   relative(scores.cpu()[valid], ref_scores[ref_valid]))
    return [Comparison("proposals", method, reference, diff, PROPOSALS_TOLERANCE, ms)]


def _roi_align_inputs(sizes: Sizes, g: torch.Generator) -> tuple:
    """Channels-last float32 P2..P5 features, R = N x rois_per_image RoIs (a few of zero size
    and a few reaching past the canvas), the output gradient."""
    n, c, p = sizes.images, sizes.channels, sizes.pooler_resolution
    strides = list(sizes.strides[:POOLED_LEVELS])
    features = [torch.randn(n, c, sizes.height // s, sizes.width // s, generator=g)
                .to(memory_format=torch.channels_last) for s in strides]
    r = n * sizes.rois_per_image
    boxes = _boxes(g, (r,), sizes.height, sizes.width, min_side=1.0)
    boxes[::13, 2:] = boxes[::13, :2]  # empty RoIs
    boxes[5::17] += torch.tensor([sizes.width, sizes.height] * 2) * 0.25  # past the canvas
    batch = torch.arange(n).repeat_interleave(sizes.rois_per_image).float()[:, None]
    rois = torch.cat([batch, boxes], 1)
    grad = torch.randn(r, c, p, p, generator=g)
    return features, rois, grad, strides


def _torchvision_multilevel(features: list[torch.Tensor], rois: torch.Tensor, side: int,
                            strides: list[int], aligned: bool) -> torch.Tensor:
    """torchvision's roi_align of each RoI on its level: the gather method's reference."""
    first = round(math.log2(strides[0]))
    index = assign_levels(rois[:, 1:], first, first + len(strides) - 1) - first
    out = features[0].new_zeros(rois.shape[0], features[0].shape[1], side, side)
    for level, (f, stride) in enumerate(zip(features, strides, strict=True)):
        on = index == level
        out = out.index_put((on.nonzero().squeeze(1),), tv_roi_align(
            f, rois[on], side, 1.0 / stride, SAMPLING_RATIO, aligned))
    return out


def _compare_roi_align(method: str, device: torch.device, sizes: Sizes,
                       g: torch.Generator) -> list[Comparison]:
    features, rois, grad, strides = _roi_align_inputs(sizes, g)
    features = [f.to(device) for f in features]
    rois, grad = rois.to(device), grad.to(device)
    side, aligned = sizes.pooler_resolution, sizes.aligned

    def pool(how: str) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        if how == "torchvision":
            return lambda leaves: _torchvision_multilevel(leaves, rois, side, strides, aligned)
        return lambda leaves: multilevel_roi_align(leaves, rois, side, strides,
                                                   SAMPLING_RATIO, aligned, how)

    def leaves() -> list[torch.Tensor]:
        return [f.detach().clone().requires_grad_() for f in features]

    reference = reference_of("roi_align", method)
    ref_leaves = leaves()
    ref_pooled = pool(reference)(ref_leaves)
    ref_pooled.backward(grad)
    ref_grads = torch.cat([x.grad.flatten() for x in ref_leaves])
    ours = pool(method)
    rows = []
    try:
        if device.type == "cuda":
            ours(leaves()).backward(grad)  # warm-up: compiles both kernels (_warm_timed)
        forward_leaves = leaves()
        pooled, forward_ms = _timed(lambda: ours(forward_leaves), device)
        rows.append(Comparison("roi_align", method, reference, relative(pooled, ref_pooled),
                               ROI_ALIGN_TOLERANCE, forward_ms))
        _, backward_ms = _timed(lambda: pooled.backward(grad), device)
        grads = torch.cat([x.grad.flatten() for x in forward_leaves])
        rows.append(Comparison("roi_align_backward", method, reference,
                               relative(grads, ref_grads), ROI_ALIGN_TOLERANCE, backward_ms))
    except Exception as error:  # noqa: BLE001 (a broken kernel is a result, not a crash)
        rows += [Comparison(op, method, reference, math.inf, ROI_ALIGN_TOLERANCE, math.nan,
                            first_line(error))
                 for op in ("roi_align", "roi_align_backward")[len(rows):]]
    return rows


def _match_inputs(sizes: Sizes, g: torch.Generator) -> tuple:
    """All anchors of the canvas (about 10% invalid), G slots per image of which gt_used are
    valid; ties: slot 1 a copy of slot 0, slot 2 exactly an anchor, slot 3 of zero width."""
    anchors = torch.cat(_anchors(sizes))  # (A, 4)
    anchor_valid = torch.rand(anchors.shape[0], generator=g) > 0.1
    n, slots = sizes.images, sizes.gt_slots
    gt_boxes = _boxes(g, (n, slots), sizes.height, sizes.width, min_side=8.0)
    if slots >= 4:
        gt_boxes[:, 1] = gt_boxes[:, 0]
        gt_boxes[:, 2] = anchors[torch.randint(0, anchors.shape[0], (n,), generator=g)]
        gt_boxes[:, 3, 2] = gt_boxes[:, 3, 0]
    gt_valid = torch.arange(slots)[None, :] < torch.randint(
        1, sizes.gt_used + 1, (n, 1), generator=g)
    return anchors, anchor_valid, gt_boxes, gt_valid


def _compare_match(method: str, device: torch.device, sizes: Sizes,
                   g: torch.Generator) -> list[Comparison]:
    inputs = [x.to(device) for x in _match_inputs(sizes, g)]
    anchors, anchor_valid, gt_boxes, gt_valid = inputs
    reference = reference_of("match", method)
    if reference == "reference":
        # One image at a time: the reference holds G x A IoUs several times over.
        per_image = [match_reference(anchors, anchor_valid, gt_boxes[i:i + 1],
                                     gt_valid[i:i + 1], *RPN_RULE) for i in range(len(gt_boxes))]
        ref_matched, ref_labels = (torch.cat(x) for x in zip(*per_image, strict=True))
    else:
        ref_matched, ref_labels = match(*inputs, *RPN_RULE, method=reference)
    (matched, labels), ms = _warm_timed(lambda: match(*inputs, *RPN_RULE, method=method),
                                        device)
    diff = _count_different((matched, ref_matched), (labels, ref_labels))
    return [Comparison("match", method, reference, diff, EXACT_TOLERANCE, ms)]


def _compare_paste_masks(method: str, device: torch.device, sizes: Sizes,
                         g: torch.Generator) -> list[Comparison]:
    if method != "matmul":
        raise ValueError(f"paste_masks has one method, 'matmul', not {method!r}")
    n, d, m = sizes.images, sizes.detections_per_image, sizes.mask_resolution
    masks = torch.rand(n, d, m, m, generator=g)
    boxes = _boxes(g, (n, d), sizes.height, sizes.width, min_side=1.0)
    boxes[:, 1::5] -= 0.2 * sizes.width  # partly outside the canvas
    h, w = sizes.height, sizes.width
    masks_d, boxes_d = masks.to(device), boxes.to(device)
    pasted, ms = _warm_timed(lambda: paste_masks(masks_d, boxes_d, h, w), device)
    first = min(d, PASTE_REFERENCE_DETECTIONS)
    ref = paste_masks_reference(masks[:1, :first], boxes[:1, :first], h, w)
    return [Comparison("paste_masks", method, "reference", relative(pasted[:1, :first], ref),
                       PASTE_TOLERANCE, ms)]


_COMPARISONS = {"nms": _compare_nms, "proposals": _compare_proposals,
                "roi_align": _compare_roi_align, "match": _compare_match,
                "paste_masks": _compare_paste_masks}
# For a failure before any row was made: the rows an op's comparison returns, its tolerance.
_ROWS = {"roi_align": ("roi_align", "roi_align_backward")}
_TOLERANCES = {"nms": EXACT_TOLERANCE, "proposals": PROPOSALS_TOLERANCE,
               "roi_align": ROI_ALIGN_TOLERANCE, "match": EXACT_TOLERANCE,
               "paste_masks": PASTE_TOLERANCE}


def reference_of(op: str, method: str) -> str:
    """What `compare_op` compares `op` by `method` with (module docstring)."""
    return {"nms": "per_cell" if method == "torch" else "torch",
            "proposals": "torch" if method == "per_cell" else "per_cell",
            "roi_align": "torchvision" if method == "gather" else "gather",
            "match": "reference" if method == "tiled" else "tiled",
            "paste_masks": "reference"}[op]


def compare_op(op: str, method: str, device: torch.device, sizes: Sizes,
               seed: int = 0) -> list[Comparison]:
    """`op` by `method` on `device` against its reference, on inputs drawn from `seed` at
    `sizes` (module docstring). Raises ValueError for an unknown op only; anything the fast
    path (or its reference) raises is returned as failed Comparisons with the error's line."""
    if op not in _COMPARISONS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    g = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    try:
        return _COMPARISONS[op](method, device, sizes, g)
    except Exception as error:  # noqa: BLE001 (a broken kernel is a result, not a crash)
        return [Comparison(row, method, reference_of(op, method), math.inf, _TOLERANCES[op],
                           math.nan, first_line(error)) for row in _ROWS.get(op, (op,))]
