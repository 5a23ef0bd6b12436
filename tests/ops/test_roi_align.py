"""ROIAlign, single- and multi-level, against torchvision, a float64 loop reference and
hand-computed cases; gradients, the torch.library registration and torch.compile tracing."""

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align
from torchvision.ops.poolers import LevelMapper

from maskrcnn.ops.roi_align import (
    assign_levels,
    multilevel_roi_align,
    roi_align,
    roi_align_reference,
)
from maskrcnn.ops.roi_align_gather import roi_align_levels, roi_align_levels_backward

# Edge-case RoIs for a 13 x 17 map at spatial scale 0.5 (a 26 x 34 px image), one per row:
EDGE_ROIS = [
    [0, 10.0, 5.0, 10.0, 20.0],  # zero width
    [1, 7.0, 7.0, 7.0, 7.0],  # a point
    [0, -20.0, -10.0, 15.0, 12.0],  # partly outside, top left
    [1, -1.5, -1.9, 4.0, 3.0],  # samples in [-1, 0] px of the map, clamped to 0
    [0, 20.0, 16.0, 34.0, 26.0],  # touching the far edges
    [1, 30.0, 20.0, 36.0, 28.0],  # over the far edges: samples in [H-1, H] and beyond H
    [0, 100.0, 100.0, 150.0, 140.0],  # fully outside, far side
    [1, -80.0, -60.0, -40.0, -30.0],  # fully outside, before the origin
]
FULLY_OUTSIDE = [6, 7]


def _random_rois(r: int, n: int, width: float, height: float, seed: int,
                 dtype=torch.float32) -> torch.Tensor:
    """float[R, 5]: random image index, corners in [-0.2, 1.2] of the image (so some RoIs leave
    it), sides up to half the image, some of them zero."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, n, (r, 1), generator=g).to(dtype)
    extent = torch.tensor([width, height], dtype=dtype)
    xy = (torch.rand(r, 2, generator=g, dtype=dtype) * 1.4 - 0.2) * extent
    wh = torch.rand(r, 2, generator=g, dtype=dtype) * extent / 2
    wh = wh * (torch.rand(r, 2, generator=g, dtype=dtype) > 0.1)
    return torch.cat([batch, xy, xy + wh], dim=1)


def _features(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_roi_align_matches_torchvision(aligned, sampling_ratio):
    """If this fails, the single-level op samples other points, weights or averages them
    differently from torchvision.ops.roi_align (float32, random and partly outside RoIs)."""
    features = _features(2, 5, 13, 17, seed=0)
    for output_size, scale in ((7, 0.5), (4, 0.3)):
        rois = _random_rois(60, 2, 17 / scale, 13 / scale, seed=output_size)
        ours = roi_align(features, rois, output_size, scale, sampling_ratio, aligned, "gather")
        expected = tv_roi_align(features, rois, output_size, scale, sampling_ratio, aligned)
        assert ours.shape == (60, 5, output_size, output_size) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [1, 3])
def test_roi_align_matches_reference_float64(aligned, sampling_ratio):
    """If this fails, the fast path disagrees with the one-sample-at-a-time reference in
    float64 beyond rounding (the reference itself is checked against torchvision by the
    edge-case test)."""
    features = _features(2, 3, 9, 11, seed=1, dtype=torch.float64)
    rois = _random_rois(12, 2, 11 / 0.5, 9 / 0.5, seed=2, dtype=torch.float64)
    ours = roi_align(features, rois, 3, 0.5, sampling_ratio, aligned, "gather")
    expected = roi_align_reference(features, rois, 3, 0.5, sampling_ratio, aligned)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("method", ["gather", "triton"])
def test_roi_align_hand_cases(method):
    """If this fails, the half-pixel offset, the >= 1 px RoI size of aligned=False or the
    clamping at the far edge is wrong in that method (values worked out by hand on
    f[y, x] = 10 y + x; the Triton kernel interpreted)."""
    features = (10 * torch.arange(4.0)[:, None] + torch.arange(5.0)).expand(1, 1, 4, 5)
    rois = torch.tensor([
        [0, 0.0, 0.0, 2.0, 2.0],  # aligned: sample (0.5, 0.5) -> 5.5; not: (1, 1) -> 11
        [0, 4.0, 3.0, 6.0, 5.0],  # not aligned: sample (y, x) = (4, 5) on the edge -> f(3, 4)
        [0, 4.0, 3.0, 6.2, 5.2],  # not aligned: x = 5.1 > W -> 0
        [0, 1.0, 1.0, 1.0, 1.0],  # not aligned: a point grows to 1 px: sample (1.5, 1.5)
    ])
    aligned = roi_align(features, rois[:1], 1, 1.0, 1, True, method).flatten()
    torch.testing.assert_close(aligned, torch.tensor([5.5]))
    not_aligned = roi_align(features, rois, 1, 1.0, 1, False, method).flatten()
    torch.testing.assert_close(not_aligned, torch.tensor([11.0, 34.0, 0.0, 16.5]))


@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_edge_cases(aligned):
    """If this fails, degenerate RoIs or RoIs partly or fully outside the map, or on its far
    edge, pool other values than torchvision's and the reference's (or not exactly 0 when no
    sample lands on the map), or get other gradients."""
    features = _features(2, 4, 13, 17, seed=3).requires_grad_()
    rois = torch.tensor(EDGE_ROIS)
    ours = roi_align(features, rois, 5, 0.5, 2, aligned, "gather")
    expected = tv_roi_align(features, rois, 5, 0.5, 2, aligned)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    reference = roi_align_reference(features.detach().double(), rois.double(), 5, 0.5, 2, aligned)
    torch.testing.assert_close(ours.double(), reference, atol=1e-5, rtol=1e-5)
    assert (ours[FULLY_OUTSIDE] == 0).all()
    grad = _features(*ours.shape, seed=4)
    ours_grad, = torch.autograd.grad(ours, features, grad)
    expected_grad, = torch.autograd.grad(expected, features, grad)
    torch.testing.assert_close(ours_grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_zero_rois():
    """If this fails, an empty RoI batch breaks the forward (shape [0, C, P, P]) or the
    backward (zero gradients of the features' shapes), single- and multi-level."""
    features = [_features(2, 3, 8, 12, seed=5).requires_grad_(),
                _features(2, 3, 4, 6, seed=6).requires_grad_()]
    rois = torch.zeros(0, 5)
    single = roi_align(features[0], rois, 7, 0.25, 2, True, "gather")
    multi = multilevel_roi_align(features, rois, 7, [4, 8], 2, True, "gather")
    assert single.shape == multi.shape == (0, 3, 7, 7)
    grads = torch.autograd.grad(single.sum() + multi.sum(), features)
    for grad, f in zip(grads, features, strict=True):
        assert grad.shape == f.shape and (grad == 0).all()


def test_assign_levels_hand_cases():
    """If this fails, RoIs are pooled from the wrong FPN level: a 224 px box belongs on
    level 4, 112 px on 3, 448 px on 5, tiny or empty boxes on the lowest, huge on the highest."""
    boxes = torch.tensor([
        [0.0, 0.0, 224.0, 224.0],
        [10.0, 10.0, 122.0, 122.0],
        [0.0, 0.0, 448.0, 448.0],
        [0.0, 0.0, 223.0, 223.0],
        [0.0, 0.0, 1.0, 1.0],
        [5.0, 5.0, 5.0, 50.0],
        [0.0, 0.0, 5000.0, 3000.0],
        [0.0, 0.0, 112.0, 448.0],  # sqrt(area) = 224
    ])
    levels = assign_levels(boxes, 2, 5)
    assert levels.dtype == torch.int64
    assert levels.tolist() == [4, 3, 5, 3, 2, 2, 5, 4]


def test_assign_levels_matches_torchvision():
    """If this fails, assign_levels rounds differently from torchvision's LevelMapper (the
    rule MultiScaleRoIAlign uses) on random boxes."""
    boxes = _random_rois(500, 1, 1344.0, 800.0, seed=7)[:, 1:]
    expected = LevelMapper(2, 5)([boxes]) + 2
    torch.testing.assert_close(assign_levels(boxes, 2, 5), expected)


def _pyramid(strides, n, c, height, width, seed, dtype=torch.float32):
    return [_features(n, c, height // s, width // s, seed=seed + i, dtype=dtype).requires_grad_()
            for i, s in enumerate(strides)]


def _multiscale_rois(r, n, height, width, seed, dtype=torch.float32):
    """float[R, 5] of sides 4 to 600 px, so that every level P2..P5 gets RoIs."""
    g = torch.Generator().manual_seed(seed)
    size = 4 + torch.rand(r, 2, generator=g, dtype=dtype) * 596
    centre = torch.rand(r, 2, generator=g, dtype=dtype) * torch.tensor([width, height], dtype=dtype)
    batch = torch.randint(0, n, (r, 1), generator=g).to(dtype)
    return torch.cat([batch, centre - size / 2, centre + size / 2], dim=1)


@pytest.mark.parametrize("aligned", [True, False])
def test_multilevel_matches_torchvision_per_level(aligned):
    """If this fails, a RoI is pooled from another level than assign_levels gives, with the
    wrong scale, or from the wrong place of the concatenated levels (forward or gradient)."""
    strides = [4, 8, 16, 32]
    features = _pyramid(strides, 2, 3, 128, 192, seed=10)
    rois = _multiscale_rois(80, 2, 128, 192, seed=11)
    ours = multilevel_roi_align(features, rois, 5, strides, 2, aligned, "gather")
    levels = assign_levels(rois[:, 1:], 2, 5) - 2
    assert set(levels.tolist()) == {0, 1, 2, 3}
    expected = torch.zeros_like(ours)
    for index, (f, stride) in enumerate(zip(features, strides, strict=True)):
        mask = levels == index
        expected[mask] = tv_roi_align(f, rois[mask], 5, 1.0 / stride, 2, aligned)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    grad = _features(*ours.shape, seed=12)
    ours_grads = torch.autograd.grad(ours, features, grad)
    expected_grads = torch.autograd.grad(expected, features, grad)
    for ours_grad, expected_grad in zip(ours_grads, expected_grads, strict=True):
        torch.testing.assert_close(ours_grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_multilevel_matches_multiscale_roi_align():
    """If this fails, multilevel_roi_align(aligned=False) is not what torchvision's Mask R-CNN
    pools (MultiScaleRoIAlign: its level rule, scales and sampling ratio 2)."""
    strides = [4, 8, 16, 32]
    features = _pyramid(strides, 2, 3, 128, 192, seed=13)
    rois = _multiscale_rois(60, 2, 128, 192, seed=14)
    rois = rois[rois[:, 0].argsort(stable=True)]  # MultiScaleRoIAlign takes boxes per image
    names = ["p2", "p3", "p4", "p5"]
    pooler = MultiScaleRoIAlign(names, 7, sampling_ratio=2)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    expected = pooler(dict(zip(names, features, strict=True)), per_image, [(128, 192)] * 2)
    ours = multilevel_roi_align(features, rois, 7, strides, 2, False, "gather")
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_gradient_matches_reference_float64():
    """If this fails, the backward scatters gradient to other pixels or with other weights
    than autograd through the one-sample-at-a-time reference (float64, edge-case RoIs)."""
    features = _features(2, 2, 13, 17, seed=15, dtype=torch.float64).requires_grad_()
    rois = torch.tensor(EDGE_ROIS, dtype=torch.float64)
    grad = _features(len(EDGE_ROIS), 2, 3, 3, seed=16, dtype=torch.float64)
    for aligned in (True, False):
        ours, = torch.autograd.grad(roi_align(features, rois, 3, 0.5, 2, aligned, "gather"),
                                    features, grad)
        expected, = torch.autograd.grad(
            roi_align_reference(features, rois, 3, 0.5, 2, aligned), features, grad)
        torch.testing.assert_close(ours, expected, atol=1e-12, rtol=1e-12)


def test_multilevel_gradcheck():
    """If this fails, the registered backward is not the derivative of the forward
    (finite differences in float64, two levels, RoIs on both)."""
    features = _pyramid([4, 8], 2, 2, 24, 32, seed=17, dtype=torch.float64)
    rois = torch.tensor([[0, 1.0, 2.0, 30.0, 22.0], [1, -3.0, 4.0, 9.0, 13.0],
                         [1, 2.0, 0.0, 31.0, 23.0], [0, 14.0, 15.0, 14.0, 20.0]],
                        dtype=torch.float64)
    assert assign_levels(rois[:, 1:], 2, 3, canonical_level=3, canonical_scale=16.0).unique(
    ).numel() == 2

    def pool(*levels):
        index = assign_levels(rois[:, 1:], 2, 3, canonical_level=3, canonical_scale=16.0) - 2
        return roi_align_levels(list(levels), rois, index, 2, [0.25, 0.125], 2, True)

    assert torch.autograd.gradcheck(pool, tuple(features))


def test_low_precision_features():
    """If this fails, bfloat16 features (autocast) break the op or lose more than bfloat16
    rounding, or the output and gradient do not come back in bfloat16."""
    features = _features(2, 4, 13, 17, seed=18)
    rois = _random_rois(20, 2, 34.0, 26.0, seed=19)
    low = features.bfloat16().requires_grad_()
    ours = roi_align(low, rois, 5, 0.5, 2, True, "gather")
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), tv_roi_align(features, rois, 5, 0.5, 2, True),
                               atol=3e-2, rtol=3e-2)
    ours.sum().backward()
    assert low.grad.dtype == torch.bfloat16


def test_invalid_arguments():
    """If this fails, unsupported arguments (adaptive sampling, strides that are not
    consecutive powers of two) are silently accepted."""
    features = [_features(1, 2, 8, 8, seed=20), _features(1, 2, 4, 4, seed=21)]
    rois = torch.tensor([[0, 0.0, 0.0, 8.0, 8.0]])
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align(features[0], rois, 2, 1.0, 0, True, "gather")
    with pytest.raises(ValueError, match="strides"):
        multilevel_roi_align(features, rois, 2, [4, 12], 2, True, "gather")


def test_library_registration():
    """If this fails, the ops' schemas, fake implementations or autograd registration are
    wrong, so torch.compile or AOTAutograd would trace shapes or gradients that eager does not
    produce."""
    features = _pyramid([4, 8], 2, 3, 24, 32, seed=22)
    rois = _multiscale_rois(6, 2, 24, 32, seed=23)
    levels = torch.tensor([0, 1, 0, 1, 1, 0])
    torch.library.opcheck(roi_align_levels, (features, rois, levels, 3, [0.25, 0.125], 2, True))
    grad = _features(6, 3, 3, 3, seed=24)
    torch.library.opcheck(roi_align_levels_backward,
                          (grad, rois, levels, 2, [6, 3], [8, 4], [0.25, 0.125], 2, True))


def test_compiles_without_graph_breaks():
    """If this fails, calling multilevel_roi_align breaks the torch.compile graph (a host sync
    or data-dependent shape leaked out of the op), or the compiled forward or backward differs
    from eager."""
    strides = [4, 8, 16, 32]
    features = _pyramid(strides, 2, 3, 64, 96, seed=25)
    rois = _multiscale_rois(10, 2, 64, 96, seed=26)

    def pool_and_reduce(features, rois):
        return multilevel_roi_align(features, rois, 4, strides, 2, True,
                                    "gather").square().sum()

    explanation = torch._dynamo.explain(pool_and_reduce)(features, rois)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(pool_and_reduce, fullgraph=True, backend="aot_eager")
    compiled_grads = torch.autograd.grad(compiled(features, rois), features)
    eager_grads = torch.autograd.grad(pool_and_reduce(features, rois), features)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(compiled_grad, eager_grad)
