"""The loss functions of the RPN and the RoI heads, on tiny hand-computed cases."""

import math

import torch

from maskrcnn.model.maskrcnn import build_model
from maskrcnn.model.roi_heads import BOX_SMOOTH_L1_BETA, box_losses, mask_loss
from maskrcnn.model.rpn import RPN_SMOOTH_L1_BETA, rpn_losses
from tests.model.test_maskrcnn import _batch, _config, _fixed_keys

NAN = float("nan")


def _box_case():
    """One image, K = 2, three RoI slots: a foreground RoI of class 2, a background RoI and a
    padded slot. Every logit is 0 but the padded slot's, so each counted RoI's cross entropy
    is log(3)."""
    logits = torch.zeros(1, 3, 3)
    logits[0, 2] = torch.tensor([50.0, -50.0, 0.0])  # cross entropy 50 if it were counted
    deltas = torch.full((1, 3, 3, 4), 7.0)  # every other class's and RoI's deltas are far off
    deltas[0, 0, 2] = torch.tensor([0.5, 0.05, 0.0, 0.0])  # the foreground's own class
    classes = torch.tensor([[2, 0, 0]])
    targets = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [NAN, NAN, NAN, NAN]]])
    valid = torch.tensor([[True, True, False]])
    is_fg = torch.tensor([[True, False, False]])
    return logits, deltas, classes, targets, valid, is_fg


def test_box_losses_count_the_valid_rois_and_the_foreground_own_class_deltas():
    """If this fails, the box head's losses are wrong: the cross entropy must sum over the
    sampled RoIs only (not the padded slot), and the box loss must be the smooth L1 (beta
    1/9: linear above it, quadratic below) of the foreground RoI's own-class deltas only,
    summed over the four coordinates; or the padded slot's NaN target leaks into a loss or
    a gradient."""
    logits, deltas, classes, targets, valid, is_fg = _box_case()
    logits.requires_grad_(True)
    deltas.requires_grad_(True)
    cls, box = box_losses(logits, deltas, classes, targets, valid, is_fg)
    assert cls.shape == box.shape == ()
    torch.testing.assert_close(cls, torch.tensor(2 * math.log(3)))
    assert BOX_SMOOTH_L1_BETA == 1 / 9
    # |0.5| >= 1/9: 0.5 - 1/18; |0.05| < 1/9: 0.5 x 0.05^2 x 9 = 0.01125.
    torch.testing.assert_close(box, torch.tensor(0.5 - 1 / 18 + 0.01125))
    (cls + box).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(deltas.grad).all()
    assert (logits.grad[0, 2] == 0).all()  # the padded slot gets no gradient
    own = torch.zeros_like(deltas, dtype=torch.bool)
    own[0, 0, 2] = True
    assert (deltas.grad[~own] == 0).all()  # only the foreground's own-class deltas learn


def test_class_agnostic_box_losses_read_the_one_output_column():
    """If this fails, a class-agnostic box head (deltas float[N, R, 1, 4]) reads its deltas
    with the RoI's class as the column (out of range for class 2) instead of column 0."""
    logits, deltas, classes, targets, valid, is_fg = _box_case()
    agnostic = deltas[:, :, 2:3].clone()  # the foreground's deltas as the one column
    cls, box = box_losses(logits, agnostic, classes, targets, valid, is_fg)
    torch.testing.assert_close(cls, torch.tensor(2 * math.log(3)))
    torch.testing.assert_close(box, torch.tensor(0.5 - 1 / 18 + 0.01125))


def _mask_case(outputs: int):
    """Two slots of 2x2 masks: a foreground slot of class 1 whose own mask has logits log(3)
    (sigmoid 3/4) in the top row and 0 in the bottom row, and a background slot of weight 0.
    Other columns hold logits 100, far from the targets."""
    logits = torch.full((2, outputs, 2, 2), 100.0)
    own = 1 if outputs > 1 else 0
    logits[0, own] = torch.tensor([[math.log(3), math.log(3)], [0.0, 0.0]])
    classes = torch.tensor([1, 0])
    targets = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]])
    weight = torch.tensor([1.0, 0.0])
    return logits, classes, targets, weight


def test_mask_loss_is_the_own_class_pixel_mean_bce_weighted_over_slots():
    """If this fails, the mask loss reads another class's mask, does not average the BCE over
    the pixels, or counts a slot of weight 0: the foreground slot's pixels cost
    -log(3/4), -log(1/4), log(2), log(2), so its loss is log(64/3) / 4."""
    logits, classes, targets, weight = _mask_case(outputs=3)
    logits.requires_grad_(True)
    loss = mask_loss(logits, classes, targets, weight)
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(math.log(64 / 3) / 4))
    loss.backward()
    assert (logits.grad[1] == 0).all() and (logits.grad[0, [0, 2]] == 0).all()
    # Weights multiply the slots' losses: the background slot at weight 1 adds its own.
    both = mask_loss(logits, classes, targets, torch.tensor([1.0, 1.0]))
    assert both > loss + 10  # the background slot's class-0 logits of 100 miss its targets


def test_class_agnostic_mask_loss_reads_the_one_output_channel():
    """If this fails, a class-agnostic mask head (mask logits float[X, 1, M, M]) reads its
    mask with the slot's class as the channel (out of range for class 1) instead of 0."""
    logits, classes, targets, weight = _mask_case(outputs=1)
    torch.testing.assert_close(mask_loss(logits, classes, targets, weight),
                               torch.tensor(math.log(64 / 3) / 4))


def test_rpn_losses_count_the_valid_samples_and_the_foreground_boxes():
    """If this fails, the RPN's losses are wrong: the objectness BCE must sum over the sampled
    anchors only (a foreground one with logit 0 costs log(2), a background one with logit
    log(3) costs log(4), the padded slot nothing), and the box loss must be the smooth L1 of
    the foreground anchor only."""
    logits = torch.tensor([[0.0, math.log(3), 100.0]])
    deltas = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [3.0, 3.0, 3.0, 3.0], [3.0, 3.0, 3.0, 3.0]]])
    targets = torch.tensor([[[0.2, 0.0, 0.0, 0.05], [0.0] * 4, [0.0] * 4]])
    is_fg = torch.tensor([[True, False, False]])
    valid = torch.tensor([[True, True, False]])
    cls, box = rpn_losses(logits, deltas, targets, is_fg, valid)
    assert cls.shape == box.shape == ()
    torch.testing.assert_close(cls, torch.tensor(math.log(8)))
    assert RPN_SMOOTH_L1_BETA == 1 / 9
    # |0.2| >= 1/9: 0.2 - 1/18; |0.05| < 1/9: 0.01125.
    torch.testing.assert_close(box, torch.tensor(0.2 - 1 / 18 + 0.01125))


def test_each_stage_normalises_its_counts_in_one_call():
    """If this fails, the RPN or the RoI heads call their normaliser more than once per step
    (data-parallel training would run several all-reduces of the counts instead of one per
    stage), or the RoI heads no longer pass both counts (sampled RoIs, foreground mask slots)
    stacked in that one call."""
    torch.manual_seed(0)
    model = build_model(_config(), keys=_fixed_keys).train()
    calls = {"rpn": [], "roi_heads": []}
    for name in calls:
        def spy(counts, calls=calls[name]):
            calls.append(counts.shape)
            return counts.clamp(min=1)

        getattr(model, name).normalizers = spy
    model(*_batch(2))
    assert calls == {"rpn": [(1,)], "roi_heads": [(2,)]}
