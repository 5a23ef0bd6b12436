"""ResNet body, frozen batch norm, FPN and their torchvision compatibility.

Everything runs on random weights: nothing is downloaded.
"""

import pytest
import torch
import torchvision
from torch import nn

from maskrcnn.config import ConfigError, load_config
from maskrcnn.model.backbone import (
    IMAGENET_FILES,
    Backbone,
    ResNetBody,
    cached_imagenet,
    convert_torchvision_backbone,
    read_imagenet,
)
from maskrcnn.model.fpn import FPN
from maskrcnn.model.frozen_bn import FoldedConv2d, FrozenBatchNorm2d


def randomize_bn(model: nn.Module) -> nn.Module:
    """Random affine parameters and running statistics in every BatchNorm2d, so that folding
    them is actually exercised (fresh ones are the identity)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """max |actual - expected| <= rel * max |expected|."""
    assert actual.shape == expected.shape
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * scale, f"max error {err} vs scale {scale}"


@pytest.fixture
def imagenet_resnet18(tmp_path):
    """A random torchvision resnet18 with random BN statistics, eval mode, and the path of its
    state dict saved as an ImageNet checkpoint would be."""
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    return tv, str(path)


# ---------------------------------------------------------------- FrozenBatchNorm2d


def test_frozen_bn_equals_batchnorm_in_eval():
    """Folding weight/bias/running_mean/running_var into scale/bias on load is wrong (formula,
    eps, or num_batches_tracked rejected)."""
    torch.manual_seed(0)
    bn = randomize_bn(nn.BatchNorm2d(8)).eval()
    frozen = FrozenBatchNorm2d(8)
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(2, 8, 5, 7)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-6)


def test_frozen_bn_own_format_round_trip():
    """Our folded (scale, bias) state dict does not load back as itself, or the state dict
    holds more or other entries than scale and bias."""
    torch.manual_seed(0)
    bn = randomize_bn(nn.BatchNorm2d(8)).eval()
    frozen = FrozenBatchNorm2d(8)
    frozen.load_state_dict(bn.state_dict())
    state = frozen.state_dict()
    assert set(state) == {"scale", "bias"}
    again = FrozenBatchNorm2d(8)
    again.load_state_dict(state)
    torch.testing.assert_close(again.state_dict(), state, rtol=0, atol=0)
    x = torch.randn(2, 8, 5, 7)
    torch.testing.assert_close(again(x), bn(x), rtol=1e-5, atol=1e-6)


def test_frozen_bn_has_no_parameters():
    """Frozen batch norm would be trained by the optimizer (it must be fixed)."""
    assert list(FrozenBatchNorm2d(8).parameters()) == []


def test_frozen_bn_incomplete_torchvision_state_is_reported_missing():
    """A torchvision-format state lacking a statistic loads silently (wrong statistics) or
    reports a confusing key instead of the absent one."""
    state = nn.BatchNorm2d(4).state_dict()
    del state["running_var"]
    with pytest.raises(RuntimeError, match="running_var"):
        FrozenBatchNorm2d(4).load_state_dict(state)


def test_frozen_bn_keeps_bf16_under_autocast():
    """Under bf16 autocast the fp32 buffers promote the activations back to fp32 (doubling
    memory traffic), or the bf16 result is not the fp32 one rounded."""
    torch.manual_seed(0)
    frozen = FrozenBatchNorm2d(8)
    frozen.load_state_dict(randomize_bn(nn.BatchNorm2d(8)).state_dict())
    conv = nn.Conv2d(3, 8, 3)
    x = torch.randn(2, 3, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = frozen(conv(x))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), frozen(conv(x)), rtol=0.05, atol=0.05)


# ---------------------------------------------------------------- ResNetBody


@pytest.mark.parametrize("depth, channels", [(18, [64, 128, 256, 512]),
                                             (34, [64, 128, 256, 512]),
                                             (50, [256, 512, 1024, 2048])])
def test_body_stage_shapes(depth, channels):
    """The body returns the wrong stages (strides 4, 8, 16, 32) or misreports out_channels."""
    body = ResNetBody(depth, 0)
    assert body.out_channels == channels
    outs = body(torch.randn(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [
        (2, c, 64 // s, 96 // s) for c, s in zip(channels, [4, 8, 16, 32], strict=True)]


def test_body_101_builds():
    """ResNet-101 is not offered or has the wrong channels / block counts."""
    body = ResNetBody(101, 2)
    assert body.out_channels == [256, 512, 1024, 2048]
    assert [len(body.layer1), len(body.layer2), len(body.layer3), len(body.layer4)] == [3, 4, 23, 3]


def test_body_rejects_bad_arguments():
    """An unsupported depth or frozen_stages builds something unintended instead of failing."""
    with pytest.raises(ValueError, match="depth"):
        ResNetBody(152, 2)
    with pytest.raises(ValueError, match="frozen_stages"):
        ResNetBody(18, 6)


@pytest.mark.parametrize("frozen_stages, frozen_prefixes", [
    (0, ()),
    (1, ("conv1.",)),
    (2, ("conv1.", "layer1.")),
    (5, ("conv1.", "layer1.", "layer2.", "layer3.", "layer4.")),
])
def test_frozen_stages(frozen_stages, frozen_prefixes):
    """frozen_stages freezes too much or too little: the recipe (2) must train res3..res5 and
    nothing in the stem or res2."""
    body = ResNetBody(18, frozen_stages)
    for name, p in body.named_parameters():
        assert p.requires_grad == (not name.startswith(frozen_prefixes)), name


def test_frozen_stages_get_no_gradient():
    """Gradients flow into frozen parameters, or stop before the trainable ones."""
    body = ResNetBody(18, 2)
    sum(o.sum() for o in body(torch.randn(1, 3, 64, 64))).backward()
    for name, p in body.named_parameters():
        assert (p.grad is None) == name.startswith(("conv1.", "layer1.")), name


# ---------------------------------------------------------------- read_imagenet


def test_read_imagenet_matches_torchvision(imagenet_resnet18):
    """An ImageNet checkpoint loads into the wrong modules, fc is not ignored, or the frozen
    batch norms disagree with torchvision's in eval mode."""
    tv, path = imagenet_resnet18
    body = ResNetBody(18, 2)
    body.load_state_dict(read_imagenet(path, 18))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        expected = []
        for layer in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
            y = layer(y)
            expected.append(y)
        for ours, theirs in zip(body(x), expected, strict=True):
            assert_rel_close(ours, theirs, 1e-5)


def test_build_model_reads_no_weights_file(tmp_path):
    """If this fails, building a model reads model.backbone.weights_path, so maskrcnn-eval and
    maskrcnn-predict of a checkpoint (which holds every weight) would need the ImageNet file
    the run was started from."""
    from maskrcnn.model.maskrcnn import build_model  # noqa: PLC0415 (layer 2, above backbone)

    absent = tmp_path / "resnet50-0676ba61.pth"
    config = load_config("8x1", [f"model {{ backbone {{ weights_path: '{absent}' }} }}"])
    assert build_model(config).backbone.body.depth == 50


def test_read_imagenet_missing_file(tmp_path):
    """A missing checkpoint fails with something other than one line naming it (ConfigError,
    which the commands print as one line)."""
    path = str(tmp_path / "absent.pth")
    with pytest.raises(ConfigError, match="absent.pth: no such file"):
        read_imagenet(path, 18)


def test_cached_imagenet_prefers_torchvision_v1_file_of_the_depth(tmp_path):
    """If this fails, a run with empty weights_path misses torchvision's file in torch hub's
    cache, takes another depth's file, or prefers another ImageNet recipe's file of the depth
    over the IMAGENET1K_V1 one torchvision's detection models start from."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    assert cached_imagenet(50, tmp_path) is None
    for name in ("resnet101-63fe2227.pth", "resnet18-f37072fd.pth", "resnet50-11ad3fa6.pth"):
        (folder / name).touch()
    assert cached_imagenet(50, tmp_path) == folder / "resnet50-11ad3fa6.pth"
    (folder / IMAGENET_FILES[50]).touch()
    assert cached_imagenet(50, tmp_path) == folder / "resnet50-0676ba61.pth"
    assert cached_imagenet(101, tmp_path) == folder / "resnet101-63fe2227.pth"
    assert cached_imagenet(34, tmp_path) is None


@pytest.mark.parametrize("edit, bad_key", [
    (lambda s: s.pop("layer2.0.conv1.weight"), "layer2.0.conv1.weight"),
    (lambda s: s.pop("layer1.1.bn2.running_var"), "layer1.1.bn2.running_var"),
    (lambda s: s.update({"layer5.0.conv1.weight": torch.zeros(1)}), "layer5.0.conv1.weight"),
    (lambda s: s.update({"layer3.0.conv1.weight": torch.zeros(256, 128, 1, 1)}),
     "layer3.0.conv1.weight"),
    (lambda s: s.update({"layer4.1.bn1.bias": torch.zeros(7)}), "layer4.1.bn1.bias"),
])
def test_read_imagenet_bad_key(imagenet_resnet18, tmp_path, edit, bad_key):
    """A missing key, an unexpected key or a shape mismatch loads silently or fails without a
    one-line message naming the file and the key (e.g. a ResNet-50 file for a ResNet-18)."""
    tv, _ = imagenet_resnet18
    state = tv.state_dict()
    edit(state)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        read_imagenet(str(path), 18)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and bad_key in message


def test_read_imagenet_wrong_depth(imagenet_resnet18):
    """A checkpoint of another depth loads partially instead of failing."""
    _, path = imagenet_resnet18
    with pytest.raises(ValueError, match="resnet18.pth"):
        read_imagenet(path, 34)


def test_read_imagenet_corrupted_file(tmp_path):
    """A file that is not a torch checkpoint fails with an obscure multi-line error."""
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError) as info:
        read_imagenet(str(path), 18)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


# ---------------------------------------------------------------- FPN and Backbone


def test_backbone_pyramid_shapes():
    """P2..P6 have the wrong strides or channels, or strides misdescribes them."""
    backbone = Backbone(18, 2, 32)
    outs = backbone(torch.randn(2, 3, 64, 96))
    assert backbone.strides == [4, 8, 16, 32, 64]
    # P6 subsamples P5 (2 x 3) with stride 2: ceil -> 1 x 2.
    assert [tuple(o.shape) for o in outs] == [
        (2, 32, 16, 24), (2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3), (2, 32, 1, 2)]


def test_p6_is_p5_subsampled():
    """P6 is not torchvision's LastLevelMaxPool (a 1x1 max pool with stride 2 = P5[::2, ::2])."""
    torch.manual_seed(0)
    fpn = FPN([8, 16, 32, 64], 16)
    feats = [torch.randn(1, c, 40 // 2**i, 56 // 2**i) for i, c in enumerate([8, 16, 32, 64])]
    outs = fpn(feats)
    torch.testing.assert_close(outs[4], outs[3][:, :, ::2, ::2], rtol=0, atol=0)


def test_backbone_odd_input_size():
    """An image size that is not a multiple of 32 breaks the top-down additions (stage sizes
    round up, so they are not exactly twice the coarser level's)."""
    outs = Backbone(18, 2, 32)(torch.randn(1, 3, 65, 97))
    # conv1 and maxpool each halve with ceil: 65 x 97 -> 33 x 49 -> 17 x 25 (C2), then 9 x 13,
    # 5 x 7, 3 x 4, and P6 2 x 2.
    assert [tuple(o.shape[-2:]) for o in outs] == [(17, 25), (9, 13), (5, 7), (3, 4), (2, 2)]


def test_matches_torchvision_maskrcnn_backbone():
    """Our Backbone (ResNet-50 + FPN) is not torchvision's maskrcnn_resnet50_fpn backbone: a
    torchvision state dict does not map onto ours key for key, or the maths differ (frozen BN
    fold, top-down path, P6)."""
    torch.manual_seed(0)
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3)
    randomize_bn(tv).eval()
    ours = Backbone(50, 2, 256).eval()
    ours.load_state_dict(convert_torchvision_backbone(tv.state_dict()), strict=True)
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        expected = tv.backbone(x)
        actual = ours(x)
    assert list(expected) == ["0", "1", "2", "3", "pool"]
    for a, e in zip(actual, expected.values(), strict=True):
        assert_rel_close(a, e, 1e-5)


def test_convert_accepts_legacy_fpn_keys():
    """Checkpoints saved by torchvision < 0.13 (the published COCO weights among them), whose FPN
    convs are not wrapped (inner_blocks.0.weight, not inner_blocks.0.0.weight), fail to map."""
    w, b = torch.zeros(2), torch.ones(2)
    new = convert_torchvision_backbone({"backbone.fpn.inner_blocks.0.0.weight": w,
                                        "backbone.fpn.layer_blocks.3.0.bias": b,
                                        "rpn.head.conv.0.0.weight": w})
    old = convert_torchvision_backbone({"backbone.fpn.inner_blocks.0.weight": w,
                                        "backbone.fpn.layer_blocks.3.bias": b})
    assert new == old == {"fpn.inner_blocks.0.weight": w, "fpn.layer_blocks.3.bias": b}
    with pytest.raises(ValueError, match="extra"):
        convert_torchvision_backbone({"backbone.fpn.extra.weight": w})


def test_backbone_has_no_graph_breaks():
    """Something in the backbone's forward breaks the torch.compile graph (host sync,
    data-dependent control flow, an untraceable op)."""
    backbone = Backbone(50, 2, 256)
    explanation = torch._dynamo.explain(backbone)(torch.randn(1, 3, 64, 96))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_group_norm_body_trains_its_norms_and_is_batch_independent():
    """If this fails, the from-scratch option (backbone.norm: GROUP_NORM) is not group norm,
    its norms are not trained, or one image's features depend on the others in its batch."""
    body = ResNetBody(18, 0, norm="group_norm").eval()
    norms = [m for m in body.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and not any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    assert all(m.weight.requires_grad for m in norms)
    x = torch.randn(3, 3, 64, 96)
    together = body(x)[-1]
    alone = body(x[1:2])[-1]
    torch.testing.assert_close(together[1:2], alone, rtol=1e-4, atol=1e-5)


def test_batch_norm_body_trains_its_norms_with_batch_statistics():
    """If this fails, the from-scratch option backbone.norm: BATCH_NORM is not trained batch
    norm (frozen, or group norm), or its residual blocks do not start as the identity."""
    body = ResNetBody(18, 0, norm="batch_norm")
    norms = [m for m in body.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.weight.requires_grad for m in norms)
    assert all(block.bn2.weight.abs().sum() == 0 for block in body.layer1)  # zero-init residual
    x = torch.randn(2, 3, 64, 96)
    body(x)  # training mode: batch statistics, and the running ones move
    assert not torch.equal(body.bn1.running_mean, torch.zeros_like(body.bn1.running_mean))
    body.eval()
    torch.testing.assert_close(body(x)[-1][1:2], body(x[1:2])[-1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("trained", [True, False])
def test_folded_conv_equals_conv_then_frozen_bn(trained):
    """If this fails, FoldedConv2d is not norm(conv(x)): its output, or the gradient of its
    input or (trained) weight, differs; or a frozen weight gets a gradient."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False).requires_grad_(trained)
    norm = FrozenBatchNorm2d(16)
    with torch.no_grad():
        norm.scale.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 8, 20, 24, requires_grad=True)
    weights = torch.randn(2, 16, 10, 12)
    expected = norm(conv(x))
    expected_grads = torch.autograd.grad((expected * weights).sum(),
                                         [x, conv.weight] if trained else [x])
    folded = FoldedConv2d(conv, norm)
    assert norm(x).data_ptr() == x.data_ptr()  # the norm is now the identity
    actual = norm(folded(x))
    assert folded.weight is conv.weight
    actual_grads = torch.autograd.grad((actual * weights).sum(),
                                       [x, folded.weight] if trained else [x])
    assert_rel_close(actual, expected, 1e-6)
    for a, e in zip(actual_grads, expected_grads, strict=True):
        assert_rel_close(a, e, 1e-5)


@pytest.mark.parametrize("depth, convs", [(50, 53), (18, 20)])
def test_folded_body_equals_separate_norms(depth, convs):
    """If this fails, running each conv and its frozen batch norm as one FoldedConv2d changes
    the body's output, misses or doubles a norm, changes which weights get gradients, or
    changes the state dict's keys. (Gradients are compared loosely: in a deep random net
    with exploding activations, rounding at 1e-6 flips a few ReLUs, and float32 gradients of
    both bodies differ from float64 ones by up to 2e-3 relative, the folded one's by up to
    4e-3; FoldedConv2d's own gradients are compared tightly above.)"""
    torch.manual_seed(0)
    separate = ResNetBody(depth, 2, fold_frozen_bn=False)
    folded = ResNetBody(depth, 2)
    with torch.no_grad():  # random norms, so the fold is exercised
        for m in separate.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.scale.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    assert folded.state_dict().keys() == separate.state_dict().keys()
    folded.load_state_dict(separate.state_dict())
    assert sum(isinstance(m, FoldedConv2d) for m in folded.modules()) == convs
    assert not any(isinstance(m, FoldedConv2d) for m in separate.modules())
    x = torch.randn(2, 3, 96, 128)
    outputs = []
    for body in (separate, folded):
        out = body(x)
        sum((o * torch.linspace(0.5, 1, o.numel()).view_as(o)).sum() for o in out).backward()
        outputs.append(out)
    for a, e in zip(outputs[1], outputs[0], strict=True):
        assert_rel_close(a.detach(), e.detach(), 1e-5)
    grads = dict(separate.named_parameters())
    for name, p in folded.named_parameters():
        assert (p.grad is None) == (grads[name].grad is None), name
        if p.grad is not None:
            assert_rel_close(p.grad, grads[name].grad, 3e-2)
