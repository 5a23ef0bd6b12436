"""torchvision's maskrcnn_resnet50_fpn, converted into our MaskRCNN, detects the same things.

Both models run in eval mode on the same images with the same (seeded random) weights;
nothing is downloaded. torchvision is set up so that its transform changes nothing our model
does not also do: images already at their final size (one side equal to min_size or
max_size, so the resize factor is exactly 1), the batch padded to our canvas (a multiple of
32), and pixel statistics on the 0-255 scale, so both normalise with identical arithmetic.
The second image is narrower than the canvas, so padding and per-image clipping are
exercised; the canvas width 416 is not a multiple of 64, so P6 anchors are torchvision's
59 px apart. RPN: 300 candidates per level and at most 1000 proposals per image keep every
level's NMS survivors (about 800 per image), P6's low-scoring ones included.

Random weights need two adjustments to give a well-conditioned detector whose outputs are
comparable at float32 precision (neither changes what is being compared):
- batch-norm statistics are calibrated on the test images (running statistics = batch
  statistics), and the last batch norm of every residual branch is scaled by 0.5, as trained
  ResNets have small residual branches; with gamma 1 the random ResNet-50 amplifies float32
  rounding (1e-7) to 1e-5 relative in its output, and scores then differ by up to 3e-4.
- the output layers of the heads get standard deviations that give spread-out scores: RPN
  logits of std ~1.5 (larger ones saturate torchvision's float32 sigmoid, whose ties it then
  breaks arbitrarily), class logits of std ~2, small box deltas.
Even so a few scores are sensitive at the 1e-4 level: torchvision against itself, with its
input multiplied by 1 + 1e-7 noise, moves 8 of its 200 scores by more than 1e-4. Hence the
thresholds are fractions of agreeing detections, not all of them.
"""

import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn

from maskrcnn.config import load_config
from maskrcnn.engine.checkpoint import load_init_weights, read_init_weights
from maskrcnn.model.convert import (
    convert_torchvision_maskrcnn,
    load_torchvision_maskrcnn,
    select_classes,
)
from maskrcnn.model.maskrcnn import build_model
from maskrcnn.ops.paste_masks import paste_masks
from maskrcnn.runtime import Runtime

CANVAS = (320, 416)
# Image sizes: the first fills the canvas, the second is padded on the right. Both have
# torchvision's resize factor min(320 / short, 416 / long) exactly 1.
IMAGE_SIZES = [(320, 416), (320, 384)]
PRE_NMS, POST_NMS = 300, 1000
K = 3  # foreground classes; torchvision's num_classes is K + 1
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
RESIDUAL_GAMMA = 0.5
SCORE_TOL, BOX_RTOL, BOX_ATOL, MASK_IOU = 1e-4, 1e-3, 1e-3, 0.99
PHOTOS = Path(__file__).resolve().parents[1] / "assets" / "coco2017-tiny" / "val2017"


def _images(seed: int = 0) -> torch.Tensor:
    """uint8[N, 3, H, W] on the canvas: a shaded background with filled ellipses and
    rectangles, some noise; zero beyond each image's size."""
    g = torch.Generator().manual_seed(seed)
    h, w = CANVAS
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    out = torch.zeros(len(IMAGE_SIZES), 3, h, w, dtype=torch.uint8)
    for i, (ih, iw) in enumerate(IMAGE_SIZES):
        img = torch.rand(3, 1, 1, generator=g) * 255 * (0.5 + 0.5 * ys / h) * torch.ones(3, h, w)
        for _ in range(8):
            cx, cy = (torch.rand(2, generator=g) * torch.tensor([iw, ih])).tolist()
            a, b = (15 + torch.rand(2, generator=g) * 80).tolist()
            color = torch.rand(3, 1, 1, generator=g) * 255
            if torch.rand(1, generator=g).item() < 0.5:
                shape = ((xs - cx) / a) ** 2 + ((ys - cy) / b) ** 2 <= 1
            else:
                shape = ((xs - cx).abs() <= a) & ((ys - cy).abs() <= b)
            img = torch.where(shape, color, img)
        img = (img + torch.randn(3, h, w, generator=g) * 8).clamp(0, 255).round()
        out[i, :, :ih, :iw] = img[:, :ih, :iw].to(torch.uint8)
    return out


def _photos() -> torch.Tensor:
    """uint8[N, 3, H, W] on the canvas: the top left corners of two real COCO photos of
    tests/assets, cut to IMAGE_SIZES (no resizing, so torchvision's factor stays exactly 1)."""
    out = torch.zeros(len(IMAGE_SIZES), 3, *CANVAS, dtype=torch.uint8)
    for i, (name, (h, w)) in enumerate(zip(["000000017627.jpg", "000000087038.jpg"],
                                           IMAGE_SIZES, strict=True)):
        with Image.open(PHOTOS / name) as photo:
            pixels = torch.frombuffer(bytearray(photo.convert("RGB").tobytes()),
                                      dtype=torch.uint8)
            rgb = pixels.reshape(photo.height, photo.width, 3).permute(2, 0, 1)  # (3, H, W)
        out[i, :, :h, :w] = rgb[:, :h, :w]
    return out


def _torchvision_model(images: torch.Tensor, num_classes: int = K + 1) -> nn.Module:
    """torchvision's Mask R-CNN with our test settings and conditioned random weights."""
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes,
        min_size=CANVAS[0], max_size=CANVAS[1], image_mean=MEAN, image_std=STD,
        rpn_pre_nms_top_n_test=PRE_NMS, rpn_post_nms_top_n_test=POST_NMS, rpn_nms_thresh=0.7,
        box_score_thresh=0.05, box_nms_thresh=0.5, box_detections_per_img=100)
    body = model.backbone.body
    with torch.no_grad():
        for name, m in body.named_modules():
            if name.endswith(("bn3", "downsample.1")):  # last BN of a residual branch
                m.weight.mul_(RESIDUAL_GAMMA)
        # Calibrate: one train-mode pass with momentum None sets running stats = batch stats.
        for m in body.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        body.train()
        body(model.transform(_as_torchvision(images))[0].tensors)
        model.eval()
        g = torch.Generator().manual_seed(1)
        for layer, std in [(model.rpn.head.conv[0][0], math.sqrt(2 / (9 * 256))),
                           (model.rpn.head.cls_logits, 0.03),
                           (model.rpn.head.bbox_pred, 0.02),
                           (model.roi_heads.box_predictor.cls_score, 0.1),
                           (model.roi_heads.box_predictor.bbox_pred, 0.01),
                           (model.roi_heads.mask_predictor.mask_fcn_logits, 0.1)]:
            layer.weight.normal_(0, std, generator=g)
            layer.bias.normal_(0, std, generator=g)
    return model


def _as_torchvision(images: torch.Tensor) -> list[torch.Tensor]:
    """Our uint8 canvas batch -> torchvision's input: a list of float images (0-255 scale,
    matching MEAN and STD), each cut to its size."""
    return [img[:, :h, :w].float() for img, (h, w) in zip(images, IMAGE_SIZES, strict=True)]


def _our_model(num_classes: int = K) -> nn.Module:
    """Our MaskRCNN with torchvision's settings: its thresholds and top-k counts,
    ROIAlign not aligned, RPN min size 1e-3, the same pixel statistics. Its frozen batch
    norms stay separate modules, as torchvision's: folded into the convs (fold_frozen_bn)
    they are the same maths with other float rounding (about 2e-6 relative in the body's
    output), which moves 1 in 10 scores past SCORE_TOL; tests/model/test_backbone.py
    compares the folded body with the separate one."""
    config = load_config("8x1", [
        f"model {{ num_classes: {num_classes} "
        f"rpn {{ pre_nms_topk_test: {PRE_NMS} post_nms_topk_test: {POST_NMS} nms_threshold: 0.7 "
        "min_box_size: 0.001 } "
        "roi_heads { roi_align_aligned: false test_score_threshold: 0.05 "
        "test_nms_threshold: 0.5 detections_per_image: 100 } "
        f"pixel_mean: {MEAN} pixel_std: {STD} }}",
        f"data {{ canvas {{ height: {CANVAS[0]} width: {CANVAS[1]} }} "
        f"short_side: {CANVAS[0]} max_long_side: {CANVAS[1]} }}",
    ])
    return build_model(config, Runtime.for_device("cpu").replace(fold_frozen_bn=False)).eval()


@pytest.fixture(scope="module")
def models():
    images = _images()
    theirs = _torchvision_model(images)
    ours = _our_model()
    load_torchvision_maskrcnn(ours, theirs.state_dict())
    return images, theirs, ours


def _run_both(images: torch.Tensor, theirs: nn.Module, ours: nn.Module):
    """Both models' proposals and detections on images: torchvision's per-image lists
    (proposals [P_i, 4], detections dicts), ours padded (see MaskRCNN.forward), with
    full-image masks pasted on the canvas."""
    proposals = {}

    def keep(name, select):  # a forward hook that records, returning None (output unchanged)
        def hook(module, args, out):
            proposals[name] = select(out)
        return hook

    hooks = [theirs.rpn.register_forward_hook(keep("theirs", lambda out: out[0])),
             ours.rpn.register_forward_hook(keep("ours", lambda out: (out[0], out[2])))]
    with torch.no_grad():
        expected = theirs(_as_torchvision(images))
        out = ours(images, torch.tensor(IMAGE_SIZES))
        masks = paste_masks(out["masks"], out["boxes"], *CANVAS)  # (N, D, H, W)
    for hook in hooks:
        hook.remove()
    return proposals, expected, out, masks


@pytest.fixture(scope="module")
def outputs(models):
    """_run_both on the test images."""
    return _run_both(*models)


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return (a & b).sum().item() / union if union else 1.0


def _matched(theirs: torch.Tensor, close: torch.Tensor) -> tuple[list[int], dict[int, int]]:
    """Greedy one-to-one matching in torchvision's order: row i of close bool[T, O] says
    which of our O outputs may match its output i; each takes the nearest-in-order unused
    one. Returns (unmatched rows, row -> our index)."""
    used, pairs, unmatched = set(), {}, []
    for i in range(theirs.shape[0]):
        candidates = [j for j in close[i].nonzero().flatten().tolist() if j not in used]
        if candidates:
            pairs[i] = min(candidates, key=lambda j: abs(j - i))
            used.add(pairs[i])
        else:
            unmatched.append(i)
    return unmatched, pairs


def test_proposals_match_torchvision(outputs):
    """If this fails, our RPN proposals differ from torchvision's (anchors, top-k per level,
    decoding, clipping, the min-size filter, NMS per level or the merge of the levels)."""
    proposals = outputs[0]
    matched = compared = 0
    for i in range(len(IMAGE_SIZES)):
        theirs = proposals["theirs"][i]
        ours = proposals["ours"][0][i][proposals["ours"][1][i]]
        close = torch.isclose(ours[None], theirs[:, None], rtol=BOX_RTOL,
                              atol=BOX_ATOL).all(dim=-1)  # (T, O)
        unmatched, _ = _matched(theirs, close)
        matched += theirs.shape[0] - len(unmatched)
        compared += max(theirs.shape[0], ours.shape[0])
    print(f"\nproposals: {matched}/{compared} agree ({matched / compared:.2%})")
    assert compared >= 1000
    assert matched / compared >= 0.995, f"{matched}/{compared} proposals agree"


def _detection_agreement(expected, out, masks) -> tuple[int, int, list, list[int]]:
    """(agreeing, compared, failures, torchvision's labels) of the two models' detections.

    Each torchvision detection, in order, is matched to the nearest-in-order unused one of
    ours with the same label, a score within SCORE_TOL and a box within BOX_RTOL / BOX_ATOL;
    it agrees if their 0.5-thresholded full-image masks have IoU >= MASK_IOU. compared sums
    the larger of the two detection counts of each image."""
    agreeing = compared = 0
    failures = []
    for i, (h, w) in enumerate(IMAGE_SIZES):
        theirs, count = expected[i], int(out["valid"][i].sum())
        boxes, scores = out["boxes"][i, :count], out["scores"][i, :count]
        close = ((out["classes"][i, :count][None] == theirs["labels"][:, None])
                 & ((scores[None] - theirs["scores"][:, None]).abs() <= SCORE_TOL)
                 & torch.isclose(boxes[None], theirs["boxes"][:, None], rtol=BOX_RTOL,
                                 atol=BOX_ATOL).all(dim=-1))  # (T, D)
        unmatched, pairs = _matched(theirs["boxes"], close)
        failures += [(i, t, "no detection of ours with its label, score and box")
                     for t in unmatched]
        for t, j in pairs.items():
            iou = _mask_iou(theirs["masks"][t, 0] >= 0.5, masks[i, j, :h, :w] >= 0.5)
            if iou >= MASK_IOU:
                agreeing += 1
            else:
                failures.append((i, t, f"mask IoU {iou:.4f}"))
        compared += max(theirs["boxes"].shape[0], count)
    labels = sorted({int(c) for e in expected for c in e["labels"]})
    return agreeing, compared, failures, labels


def test_detections_match_torchvision(outputs):
    """If this fails, our inference differs from torchvision's on the same weights: proposal
    generation, RoI pooling, box decoding, class-wise NMS or mask pasting no longer follow
    torchvision's semantics (or the converter maps a weight to the wrong layer). See
    _detection_agreement for what agrees."""
    _, expected, out, masks = outputs
    agreeing, compared, failures, labels = _detection_agreement(expected, out, masks)
    fraction = agreeing / max(compared, 1)
    print(f"\ndetections: {agreeing}/{compared} agree ({fraction:.1%}); labels {labels}")
    assert compared >= 50, f"only {compared} detections to compare"
    assert fraction >= 0.95, f"{agreeing}/{compared} agree; first failures {failures[:10]}"


def test_init_from_a_saved_torchvision_state_dict_detects_as_torchvision(tmp_path):
    """If this fails, --init_from with a torchvision maskrcnn_resnet50_fpn file (its COCO
    format: 91 outputs, our num_classes 90) leaves a tensor out or puts one in the wrong
    place, so fine-tuning would not start from torchvision's model: before any training our
    detections on real photos must be torchvision's. The file is saved from a randomly
    initialised model, conditioned as the other tests' (nothing is downloaded)."""
    images = _photos()
    theirs = _torchvision_model(images, num_classes=91)
    path = tmp_path / "maskrcnn_resnet50_fpn.pth"
    torch.save(theirs.state_dict(), path)
    ours = _our_model(num_classes=90)
    line = load_init_weights(ours, read_init_weights(path))
    total = len(ours.state_dict())
    assert line == (f"--init_from={path} (a torchvision maskrcnn_resnet50_fpn state dict): "
                    f"loaded {total} of the model's {total} tensors")
    _, expected, out, masks = _run_both(images, theirs, ours)
    agreeing, compared, failures, labels = _detection_agreement(expected, out, masks)
    fraction = agreeing / max(compared, 1)
    print(f"\nphotos, 90 classes: {agreeing}/{compared} detections agree ({fraction:.1%}); "
          f"{len(labels)} labels")
    assert compared >= 50 and len(labels) >= 10, f"{compared} detections, labels {labels}"
    assert fraction >= 0.95, f"{agreeing}/{compared} agree; first failures {failures[:10]}"


def test_converter_maps_every_key_and_loads_strictly(models):
    """If this fails, a torchvision weight has no place in our model or lands in the wrong
    one (e.g. the mask head's conv order)."""
    _, theirs, ours = models
    state = theirs.state_dict()
    converted = convert_torchvision_maskrcnn(state)
    assert not any(k.endswith("num_batches_tracked") for k in converted)
    ours_state = ours.state_dict()
    for tv_key, our_key in [
            ("rpn.head.conv.0.0.weight", "rpn.head.conv.weight"),
            ("roi_heads.box_predictor.cls_score.bias", "roi_heads.box_head.cls_score.bias"),
            ("roi_heads.mask_head.2.0.weight", "roi_heads.mask_head.convs.4.weight"),
            ("roi_heads.mask_predictor.conv5_mask.weight", "roi_heads.mask_head.deconv.weight"),
            ("roi_heads.mask_predictor.mask_fcn_logits.weight",
             "roi_heads.mask_head.logits.weight"),
            ("backbone.fpn.layer_blocks.3.0.bias", "backbone.fpn.layer_blocks.3.bias")]:
        assert converted[our_key] is state[tv_key]
        assert torch.equal(ours_state[our_key], state[tv_key])


def test_converter_reads_the_published_checkpoint_names(models):
    """If this fails, torchvision's published COCO checkpoint (saved by torchvision < 0.13,
    with the old key names and FrozenBatchNorm2d, so no num_batches_tracked) no longer
    converts."""
    _, theirs, _ = models
    state = theirs.state_dict()
    old = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for i in range(4):
            key = key.replace(f"roi_heads.mask_head.{i}.0.",
                              f"roi_heads.mask_head.mask_fcn{i + 1}.")
            key = key.replace(f"blocks.{i}.0.", f"blocks.{i}.")
        old[key] = value
    assert "roi_heads.mask_head.mask_fcn4.bias" in old
    assert convert_torchvision_maskrcnn(old).keys() == convert_torchvision_maskrcnn(state).keys()


@pytest.mark.parametrize("change, message", [
    ("extra", "unexpected key 'roi_heads.box_head.fc8.weight'"),
    ("extra_body", "unexpected key 'backbone.body.fc.weight'"),
    ("missing", "missing key.*roi_heads.mask_head.convs.6.bias"),
    ("missing_body", "missing key.*backbone.body.layer4.2.bn3.running_var"),
    ("duplicate", "'rpn.head.conv.weight' and 'rpn.head.conv.0.0.weight' both map"),
])
def test_converter_rejects_bad_keys(models, change, message):
    """If this fails, a checkpoint of another architecture (or a truncated one) would load
    partially or fail with an unclear error."""
    state = dict(models[1].state_dict())
    if change == "extra":
        state["roi_heads.box_head.fc8.weight"] = torch.zeros(1)
    elif change == "extra_body":
        state["backbone.body.fc.weight"] = torch.zeros(1)
    elif change == "missing":
        del state["roi_heads.mask_head.3.0.bias"]
    elif change == "missing_body":
        del state["backbone.body.layer4.2.bn3.running_var"]
    else:
        state = {"rpn.head.conv.weight": state["rpn.head.conv.0.0.weight"], **state}
    with pytest.raises(ValueError, match=message):
        convert_torchvision_maskrcnn(state)


def test_loading_into_a_model_with_other_classes_names_the_key(models):
    """If this fails, loading COCO weights (91 outputs) into a model with the wrong
    num_classes gives a raw RuntimeError instead of pointing at the class count."""
    _, theirs, _ = models
    config = load_config("8x1", ["model { num_classes: 5 backbone { frozen_stages: 0 } }"])
    with pytest.raises(ValueError, match=r"roi_heads.box_head.cls_score.weight.*\(6, 1024\)"):
        load_torchvision_maskrcnn(build_model(config), theirs.state_dict())


def test_selected_classes_keep_their_rows(models):
    """If this fails, loading torchvision's COCO weights for our contiguous 80 classes would
    give a class another class's scores, box deltas or mask."""
    theirs = models[1]
    state = theirs.state_dict()
    converted = select_classes(convert_torchvision_maskrcnn(state), [3, 1])
    rows = {"cls_score": [0, 3, 1], "mask_fcn_logits": [0, 3, 1],
            "bbox_pred": [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7]}
    for theirs_key, our_key, name in [
            ("roi_heads.box_predictor.cls_score", "roi_heads.box_head.cls_score", "cls_score"),
            ("roi_heads.box_predictor.bbox_pred", "roi_heads.box_head.bbox_pred", "bbox_pred"),
            ("roi_heads.mask_predictor.mask_fcn_logits", "roi_heads.mask_head.logits",
             "mask_fcn_logits")]:
        for leaf in ("weight", "bias"):
            assert torch.equal(converted[f"{our_key}.{leaf}"],
                               state[f"{theirs_key}.{leaf}"][rows[name]])
    config = load_config("8x1", ["model { num_classes: 2 }"])
    load_torchvision_maskrcnn(build_model(config), state, classes=[3, 1])
    with pytest.raises(ValueError, match="distinct indices in 1..3"):
        select_classes(convert_torchvision_maskrcnn(state), [4])
