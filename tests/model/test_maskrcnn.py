"""The whole model on static shapes: losses, detections, batch independence, tracing."""

import math

import pytest
import torch

from maskrcnn.config import load_config
from maskrcnn.model.maskrcnn import build_model
from maskrcnn.runtime import Runtime

LOSS_KEYS = {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask"}
CANVAS = (128, 160)


def _fixed_keys(labels):
    """Deterministic sampling keys that depend only on the candidate index, so every image
    draws the same keys whatever batch it is in."""
    index = torch.arange(labels.shape[1], dtype=torch.float64, device=labels.device)
    keys = torch.remainder(torch.sin(index * 12.9898) * 43758.5453, 1.0).float()
    return keys.expand(labels.shape)


def _config():
    return load_config("shapes", [
        "data { canvas { height: 128 width: 160 } short_side: 128 max_long_side: 160 "
        "max_instances: 4 gt_mask_size: 16 }",
        "model { fpn_channels: 32 roi_heads { box_head_dim: 64 mask_head_channels: 16 "
        "batch_size_per_image: 64 max_fg_masks_per_image: 16 detections_per_image: 50 "
        "head_group_norm: false } "
        "rpn { pre_nms_topk_train: 200 post_nms_topk_train: 100 pre_nms_topk_test: 100 "
        "post_nms_topk_test: 50 } }",
    ])


def _batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 255, (n, 3, *CANVAS), dtype=torch.uint8, generator=g)
    image_sizes = torch.tensor([[128, 160], [100, 150], [128, 96], [90, 90]])[:n]
    gt_boxes = torch.zeros(n, 4, 4)
    gt_valid = torch.zeros(n, 4, dtype=torch.bool)
    gt_classes = torch.zeros(n, 4, dtype=torch.int64)
    for i in range(n):
        count = 1 + i % 3 if i < 3 else 0  # the fourth image has no annotations
        xy = torch.rand(count, 2, generator=g) * 50
        wh = 10 + torch.rand(count, 2, generator=g) * 40
        gt_boxes[i, :count] = torch.cat([xy, xy + wh], 1)
        gt_valid[i, :count] = True
        gt_classes[i, :count] = torch.randint(1, 6, (count,), generator=g)
    gt_masks = (torch.rand(n, 4, 16, 16, generator=g) > 0.4).to(torch.uint8) * 255
    return images, image_sizes, gt_boxes, gt_classes, gt_valid, gt_masks


def _model(runtime=None):
    torch.manual_seed(0)
    model = build_model(_config(), runtime, keys=_fixed_keys)
    return model


def test_training_returns_the_five_losses_also_without_annotations():
    """If this fails, a loss key is missing or non-finite for some batch (DDP would hang or
    training would stop), e.g. when images have no annotations."""
    model = _model().train()
    full = _batch(4)
    for batch in (full, tuple(t[3:] for t in full)):  # the last image has no annotations
        losses = model(*batch)
        assert set(losses) == LOSS_KEYS
        assert all(v.dim() == 0 and math.isfinite(v.item()) for v in losses.values())
        model.zero_grad()
        sum(losses.values()).backward()
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_losses_stay_finite_when_rois_outnumber_proposals():
    """If this fails, padded RoI slots (fewer valid proposals + ground truth than the R RoIs
    sampled per image, as with a random-weight R50 early in training) make loss_box or its
    gradients NaN: a zero-width padded box has no finite box-regression target."""
    config = _config()
    config.model.rpn.post_nms_topk_train = 4  # 4 proposals + <= 4 gt boxes << 64 RoIs
    torch.manual_seed(0)
    model = build_model(config, keys=_fixed_keys).train()
    losses = model(*_batch(4))
    assert all(math.isfinite(v.item()) for v in losses.values()), losses
    sum(losses.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_detections_have_fixed_shapes():
    """If this fails, inference output shapes depend on the data (no static shapes)."""
    model = _model().eval()
    images, sizes = _batch(2)[:2]
    out = model(images, sizes)
    d = model.roi_heads.detections_per_image
    assert out["boxes"].shape == (2, d, 4) and out["scores"].shape == (2, d)
    assert out["classes"].shape == (2, d) and out["valid"].shape == (2, d)
    assert out["masks"].shape == (2, d, 28, 28)
    assert (out["scores"][~out["valid"]] == 0).all()


def test_batch_of_m_equals_m_batches_of_one():
    """If this fails, images in a batch influence each other (padding or batching changes the
    maths): each per-image loss of a batch of 3 must equal the loss of that image alone."""
    model = _model().train()
    proposals = []
    model.rpn.register_forward_hook(lambda module, args, out: proposals.append(out[:3]))
    batch = _batch(3)
    together = model(*batch)
    alone = [model(*(t[i:i + 1] for t in batch)) for i in range(3)]
    for i in range(3):  # proposals of an image do not depend on the batch
        torch.testing.assert_close(proposals[0][0][i], proposals[i + 1][0][0], rtol=1e-4,
                                   atol=1e-3)
    # Sampled counts per image are equal (enough candidates), so batch losses normalised by
    # the total count are the mean of the per-image ones; the mask loss is normalised by the
    # foreground count, which differs per image, so it is compared per image below.
    for key in ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"):
        mean = sum(a[key] for a in alone) / 3
        torch.testing.assert_close(together[key], mean, rtol=1e-4, atol=1e-6)
    heads = model.roi_heads
    fg = []
    for i in range(3):
        gt = [t[i:i + 1] for t in batch[2:5]]
        sampled = heads.sample_rois(proposals[i + 1][0], proposals[i + 1][2], *gt)
        fg.append(sampled["is_fg"][:, :heads.max_fg_masks].sum())
    assert sum(fg) > 0 and together["loss_box"] > 0
    weighted = sum(f * a["loss_mask"] for f, a in zip(fg, alone, strict=True)) / sum(fg)
    torch.testing.assert_close(together["loss_mask"], weighted, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_traces_without_graph_breaks(training):
    """If this fails, the training or inference forward has a host synchronisation or a
    data-dependent shape that breaks the compiled graph."""
    model = _model().train(training)
    batch = _batch(2)
    inputs = batch if training else batch[:2]
    explanation = torch._dynamo.explain(model)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_box_head_convs_process_the_pooled_features():
    """If this fails, model.roi_heads.box_head_convs does not build its convs, or the box head
    does not pass the pooled features through them (the option would change nothing)."""
    config = _config()
    config.model.roi_heads.box_head_convs = 2
    model = build_model(config)
    convs = [m for m in model.roi_heads.box_head.convs if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 2 and all(c.in_channels == c.out_channels == 32 for c in convs)
    pooled = torch.randn(3, 32, 7, 7)
    before = model.roi_heads.box_head(pooled)[0]
    with torch.no_grad():
        convs[0].weight.mul_(2)
    assert not torch.allclose(model.roi_heads.box_head(pooled)[0], before)


def test_head_group_norm_normalises_every_head_conv():
    """If this fails, model.roi_heads.head_group_norm leaves a box- or mask-head conv without
    its GroupNorm (or keeps the conv bias the norm makes redundant)."""
    config = _config()
    config.model.roi_heads.box_head_convs = 2
    config.model.roi_heads.mask_head_channels = 32
    config.model.roi_heads.head_group_norm = True
    heads = build_model(config).roi_heads
    for convs, count in ((heads.box_head.convs, 2), (heads.mask_head.convs, 4)):
        layers = list(convs)
        pairs = [(a, b) for a, b in zip(layers[:-1], layers[1:], strict=True)
                 if isinstance(a, torch.nn.Conv2d)]
        assert len(pairs) == count
        assert all(isinstance(b, torch.nn.GroupNorm) and a.bias is None for a, b in pairs)


def test_class_agnostic_heads_ignore_the_class():
    """If this fails, class_agnostic_boxes / _masks still pick a per-class output: relabelling
    every ground-truth object must change only loss_cls, and every detection's box and mask
    come from the one agnostic output."""
    config = _config()
    config.model.roi_heads.class_agnostic_boxes = True
    config.model.roi_heads.class_agnostic_masks = True
    torch.manual_seed(0)
    model = build_model(config, keys=_fixed_keys).train()
    assert model.roi_heads.box_head.bbox_pred.out_features == 4
    assert model.roi_heads.mask_head.logits.out_channels == 1
    batch = _batch(3)
    relabelled = list(batch)
    relabelled[3] = torch.where(batch[4], batch[3] % 5 + 1, 0)  # every class changes
    assert (relabelled[3] != batch[3])[batch[4]].all()
    a, b = model(*batch), model(*relabelled)
    for key in ("loss_rpn_cls", "loss_rpn_box", "loss_box", "loss_mask"):
        torch.testing.assert_close(a[key], b[key])
    assert not torch.allclose(a["loss_cls"], b["loss_cls"])
    assert a["loss_box"] > 0 and a["loss_mask"] > 0
    model.eval()
    out = model(*batch[:2])
    assert out["valid"].any() and out["masks"].shape[-1] == 28



def test_trimmed_slots_give_the_same_losses_and_gradients():
    """If this fails, trimming padded slots on the CPU (ground-truth slots unused in every
    image, in anchor matching; RoI slots not sampled in any image; mask-head slots without
    foreground in every image) changes the training maths: losses and gradients must equal
    those of the static sizes that GPUs and compiled steps run."""
    batch = _batch(3)  # 1, 2 and 3 annotations in 4 ground-truth slots
    gt_slots, box_rois, mask_rois, results = [], [], [], []
    for trim in (True, False):
        config = _config()
        # At most 5 levels x 8 candidates, fewer after NMS, in 40 proposal slots: with the 4
        # ground-truth slots, 44 RoI slots per image (of 64), the last ones padding.
        config.model.rpn.pre_nms_topk_train = 8
        config.model.rpn.post_nms_topk_train = 40
        torch.manual_seed(0)
        model = build_model(config, Runtime.for_device("cpu").replace(trim_slots=trim),
                            keys=_fixed_keys).train()
        rpn_losses = model.rpn.losses

        def spy(objectness, deltas, anchors, gt_boxes, gt_valid, rpn_losses=rpn_losses):
            gt_slots.append(gt_boxes.shape[1])
            return rpn_losses(objectness, deltas, anchors, gt_boxes, gt_valid)

        model.rpn.losses = spy
        model.roi_heads.box_head.register_forward_hook(
            lambda module, args, out: box_rois.append(args[0].shape[0]))
        model.roi_heads.mask_head.register_forward_hook(
            lambda module, args, out: mask_rois.append(args[0].shape[0]))
        losses = model(*batch)
        sum(losses.values()).backward()
        results.append((losses, {n: p.grad for n, p in model.named_parameters()
                                 if p.grad is not None}))
    # Both trims happened (else this test compares a path with itself).
    assert gt_slots == [3, 4]
    assert box_rois[1] == 3 * 44 and 0 < box_rois[0] < box_rois[1]  # 99 of 132 here
    assert mask_rois[1] == 3 * model.roi_heads.max_fg_masks and 0 < mask_rois[0] < mask_rois[1]
    (trimmed, trimmed_grads), (static, static_grads) = results
    for key in LOSS_KEYS:
        torch.testing.assert_close(trimmed[key], static[key], rtol=1e-5, atol=1e-7)
    assert trimmed_grads.keys() == static_grads.keys()
    for name, grad in static_grads.items():
        torch.testing.assert_close(trimmed_grads[name], grad, rtol=1e-4, atol=1e-6,
                                   msg=name)


def test_trimmed_detection_slots_give_the_same_detections():
    """If this fails, running the mask head at inference only on the detection slots used in
    some image (the CPU's path) changes a detection or its mask, or padded slots do not get
    zero masks."""
    batch = _batch(2)[:2]
    outputs, mask_rois = [], []
    for trim in (True, False):
        model = _model(Runtime.for_device("cpu").replace(trim_slots=trim)).eval()
        model.roi_heads.score_threshold = 0.2  # 29 and 37 of 50 slots hold a detection
        model.roi_heads.mask_head.register_forward_hook(
            lambda module, args, out: mask_rois.append(args[0].shape[0]))
        with torch.no_grad():
            outputs.append(model(*batch))
    d = model.roi_heads.detections_per_image
    assert 0 < mask_rois[0] < mask_rois[1] == 2 * d  # the trimmed run skipped slots
    trimmed, static = outputs
    assert trimmed.keys() == static.keys()
    for key, value in static.items():
        torch.testing.assert_close(trimmed[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert (static["masks"][~static["valid"]] == 0).all()
