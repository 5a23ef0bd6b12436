"""Range and consistency checks of a resolved Config.

Each check is one line of the table in `_problems`: a dotted field path and the reason the
value is unusable. `validate` returns the first problem, so the user fixes one thing at a time.
"""

from collections.abc import Iterator

from maskrcnn.config import config_pb2

# Groups of every GroupNorm (Norm GROUP_NORM, head_group_norm; Wu and He, 2018): every ResNet
# width is a multiple of it; the heads' channel counts must be (checked below). The model builds
# its GroupNorms with it.
GN_GROUPS = 32
# (dotted field path, "= value: reason", other fields the rule involves). The error message
# blames whichever layer set one of these fields last.
Problem = tuple[str, str, tuple[str, ...]]


# model.backbone.weights_path (--backbone_weights) that asks for a random frozen-BN body.
RANDOM_WEIGHTS = "random"

def _show(value) -> str:
    """A value as the user wrote it: float32 fields printed with 7 significant digits."""
    if isinstance(value, float):
        return f"{value:.7g}"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _check(path: str, value, ok: bool, rule: str, also: tuple[str, ...] = ()) -> Iterator[Problem]:
    if not ok:
        yield path, f"= {_show(value)}: {rule}", also


def _unit(path: str, value: float, low_open: bool = False) -> Iterator[Problem]:
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    yield from _check(path, value, ok, "must be in (0, 1]" if low_open else "must be in [0, 1]")


def _positive(path: str, value) -> Iterator[Problem]:
    yield from _check(path, value, value > 0, "must be > 0")


def _model_problems(model: config_pb2.ModelConfig) -> Iterator[Problem]:
    yield from _check("model.backbone.depth", model.backbone.depth,
                      model.backbone.depth in (18, 34, 50, 101), "must be 18, 34, 50 or 101")
    yield from _check("model.backbone.frozen_stages", model.backbone.frozen_stages,
                      0 <= model.backbone.frozen_stages <= 5, "must be in 0..5")
    yield from _check("model.backbone.norm", config_pb2.Norm.Name(model.backbone.norm),
                      not (model.backbone.weights_path not in ("", RANDOM_WEIGHTS)
                           and model.backbone.norm != config_pb2.FROZEN_BN),
                      "must be FROZEN_BN with weights_path (ImageNet weights carry batch-norm "
                      "statistics)")
    yield from _check("model.backbone.norm", config_pb2.Norm.Name(model.backbone.norm),
                      not (model.backbone.frozen_stages
                           and model.backbone.norm == config_pb2.BATCH_NORM),
                      "must not be BATCH_NORM with frozen_stages > 0 (a frozen stage's batch "
                      "statistics would still change)")
    yield from _positive("model.num_classes", model.num_classes)
    yield from _positive("model.fpn_channels", model.fpn_channels)
    anchors = model.anchors
    yield from _check("model.anchors.sizes", list(anchors.sizes),
                      len(anchors.sizes) >= 1 and min(anchors.sizes) > 0,
                      "must be one or more sizes > 0")
    yield from _check("model.anchors.aspect_ratios", list(anchors.aspect_ratios),
                      len(anchors.aspect_ratios) >= 1 and min(anchors.aspect_ratios) > 0,
                      "must be one or more ratios > 0")
    strides = list(anchors.strides)
    yield from _check("model.anchors.strides", strides,
                      all(s > 0 and s & (s - 1) == 0 for s in strides), "must be powers of two")
    yield from _check("model.anchors.sizes", list(anchors.sizes),
                      len(strides) == len(anchors.sizes),
                      f"must have one size per FPN level ({len(strides)} strides)",
                      also=("model.anchors.strides",))
    for name in ("pixel_mean", "pixel_std"):
        values = list(getattr(model, name))
        yield from _check(f"model.{name}", values, len(values) == 3, "must have 3 values (RGB)")
    yield from _check("model.pixel_std", list(model.pixel_std),
                      all(v > 0 for v in model.pixel_std), "must be > 0")
    rpn = model.rpn
    yield from _positive("model.rpn.batch_size_per_image", rpn.batch_size_per_image)
    yield from _unit("model.rpn.positive_fraction", rpn.positive_fraction, low_open=True)
    yield from _unit("model.rpn.fg_iou_threshold", rpn.fg_iou_threshold)
    yield from _unit("model.rpn.bg_iou_threshold", rpn.bg_iou_threshold)
    yield from _check("model.rpn.bg_iou_threshold", rpn.bg_iou_threshold,
                      rpn.bg_iou_threshold <= rpn.fg_iou_threshold,
                      "must be <= model.rpn.fg_iou_threshold", also=("model.rpn.fg_iou_threshold",))
    for name in ("pre_nms_topk_train", "pre_nms_topk_test",
                 "post_nms_topk_train", "post_nms_topk_test"):
        yield from _positive(f"model.rpn.{name}", getattr(rpn, name))
    yield from _unit("model.rpn.nms_threshold", rpn.nms_threshold, low_open=True)
    yield from _check("model.rpn.min_box_size", rpn.min_box_size, rpn.min_box_size >= 0,
                      "must be >= 0")
    roi = model.roi_heads
    yield from _positive("model.roi_heads.batch_size_per_image", roi.batch_size_per_image)
    yield from _unit("model.roi_heads.positive_fraction", roi.positive_fraction, low_open=True)
    yield from _unit("model.roi_heads.fg_iou_threshold", roi.fg_iou_threshold)
    for name in ("box_head_dim", "pooler_resolution", "mask_pooler_resolution",
                 "mask_resolution", "mask_head_channels", "detections_per_image"):
        yield from _positive(f"model.roi_heads.{name}", getattr(roi, name))
    yield from _check("model.roi_heads.mask_resolution", roi.mask_resolution,
                      roi.mask_resolution == 2 * roi.mask_pooler_resolution,
                      "must be 2 x model.roi_heads.mask_pooler_resolution (the head upsamples 2x)",
                      also=("model.roi_heads.mask_pooler_resolution",))
    weights = list(roi.bbox_reg_weights)
    yield from _check("model.roi_heads.bbox_reg_weights", weights,
                      len(weights) == 4 and min(weights) > 0, "must be 4 values > 0")
    yield from _check("model.roi_heads.box_head_convs", roi.box_head_convs,
                      roi.box_head_convs >= 0, "must be >= 0")
    if roi.head_group_norm:
        for name, channels in (("model.fpn_channels", model.fpn_channels),
                               ("model.roi_heads.mask_head_channels", roi.mask_head_channels)):
            yield from _check(name, channels, channels % GN_GROUPS == 0,
                              f"must be divisible by {GN_GROUPS} with head_group_norm",
                              also=("model.roi_heads.head_group_norm",))
    yield from _check("model.roi_heads.max_fg_masks_per_image", roi.max_fg_masks_per_image,
                      1 <= roi.max_fg_masks_per_image <= roi.batch_size_per_image,
                      "must be in 1..model.roi_heads.batch_size_per_image",
                      also=("model.roi_heads.batch_size_per_image",))
    yield from _check("model.roi_heads.test_score_threshold", roi.test_score_threshold,
                      0 <= roi.test_score_threshold < 1, "must be in [0, 1)")
    yield from _unit("model.roi_heads.test_nms_threshold", roi.test_nms_threshold, low_open=True)


def _data_problems(data: config_pb2.DataConfig) -> Iterator[Problem]:
    for split in ("train", "val"):
        given = bool(getattr(data, f"{split}_json")), bool(getattr(data, f"{split}_images"))
        yield from _check(f"data.{split}_json", getattr(data, f"{split}_json") or '""',
                          given[0] == given[1],
                          f"must be given together with data.{split}_images",
                          also=(f"data.{split}_images",))
    for canvas in data.canvas:
        size = f"{canvas.height}x{canvas.width}"
        # The coarsest FPN level the image is padded for is stride 32 (P6 pools P5).
        yield from _check("data.canvas", size,
                          canvas.height > 0 and canvas.width > 0
                          and canvas.height % 32 == 0 and canvas.width % 32 == 0,
                          "height and width must be positive multiples of 32")
    yield from _positive("data.short_side", data.short_side)
    yield from _check("data.max_long_side", data.max_long_side,
                      data.max_long_side >= data.short_side, "must be >= data.short_side",
                      also=("data.short_side",))
    yield from _positive("data.max_instances", data.max_instances)
    yield from _check("data.gt_mask_size", data.gt_mask_size, 8 <= data.gt_mask_size <= 512,
                      "must be in 8..512")
    yield from _unit("data.flip_prob", data.flip_prob)
    yield from _check("data.num_workers", data.num_workers, data.num_workers >= 0,
                      "must be >= 0")
    synthetic = data.synthetic
    yield from _positive("data.synthetic.num_train", synthetic.num_train)
    yield from _positive("data.synthetic.num_val", synthetic.num_val)
    yield from _check("data.synthetic.min_side", synthetic.min_side, synthetic.min_side >= 64,
                      "must be >= 64")
    yield from _check("data.synthetic.max_side", synthetic.max_side,
                      synthetic.max_side >= synthetic.min_side,
                      "must be >= data.synthetic.min_side", also=("data.synthetic.min_side",))


def _solver_problems(solver: config_pb2.SolverConfig) -> Iterator[Problem]:
    yield from _positive("solver.base_lr_per_image", solver.base_lr_per_image)
    yield from _check("solver.momentum", solver.momentum, 0 <= solver.momentum < 1,
                      "must be in [0, 1)")
    yield from _check("solver.weight_decay", solver.weight_decay, solver.weight_decay >= 0,
                      "must be >= 0")
    yield from _check("solver.warmup_steps", solver.warmup_steps, solver.warmup_steps >= 0,
                      "must be >= 0")
    yield from _unit("solver.warmup_start_factor", solver.warmup_start_factor, low_open=True)
    yield from _positive("solver.epochs", solver.epochs)
    yield from _check("solver.images_per_epoch", solver.images_per_epoch,
                      solver.images_per_epoch >= 0, "must be >= 0 (0 = the training set size)")
    decay = list(solver.lr_decay_epochs)
    yield from _check("solver.lr_decay_epochs", decay,
                      all(a < b for a, b in zip([0, *decay[:-1]], decay, strict=True))
                      and all(e <= solver.epochs for e in decay),
                      "must be increasing epochs in 1..solver.epochs", also=("solver.epochs",))
    yield from _check("solver.grad_clip_norm", solver.grad_clip_norm,
                      solver.grad_clip_norm >= 0, "must be >= 0 (0 = no clipping)")


def _run_problems(run: config_pb2.RunConfig) -> Iterator[Problem]:
    yield from _positive("run.num_gpus", run.num_gpus)
    yield from _positive("run.images_per_gpu", run.images_per_gpu)
    for name in ("eval_period_epochs", "checkpoint_period_epochs", "checkpoint_period_steps"):
        yield from _check(f"run.{name}", getattr(run, name), getattr(run, name) >= 0,
                          "must be >= 0 (0 = only at the end)")
    yield from _positive("run.log_period_steps", run.log_period_steps)
    yield from _check("run.cuda_graph", run.cuda_graph, not (run.cuda_graph
                                                            and run.precision == config_pb2.FP16),
                      "needs precision FP32 or BF16 (FP16's dynamic loss scaling reads the "
                      "overflow flag on the host every step, which a graph cannot)",
                      also=("run.precision",))


def validate(config: config_pb2.Config) -> Problem | None:
    """The first problem found, or None if the config is usable."""
    problems = (
        *_model_problems(config.model),
        *_data_problems(config.data),
        *_solver_problems(config.solver),
        *_run_problems(config.run),
    )
    return problems[0] if problems else None
