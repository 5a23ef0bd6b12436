"""The Triton ROIAlign kernels (interpreted on the CPU) against torchvision, the float64 loop
reference and the "gather" op: forward and gradients, edge cases, low precision, the
torch.library registration and torch.compile tracing. Sizes are small: the interpreter runs one
program at a time."""


import pytest
import torch
from torchvision.ops import roi_align as tv_roi_align

from maskrcnn.ops.roi_align import (
    assign_levels,
    multilevel_roi_align,
    roi_align,
    roi_align_reference,
)
from maskrcnn.ops.roi_align_triton import (
    roi_align_levels_triton,
    roi_align_levels_triton_backward,
)
from tests.ops.test_roi_align import (
    EDGE_ROIS,
    FULLY_OUTSIDE,
    _features,
    _multiscale_rois,
    _pyramid,
    _random_rois,
)
from tests.triton_compile import compile_for_gpu

# EDGE_ROIS (a 13 x 17 map at scale 0.5) and two inverted boxes (x2 < x1, y2 < y1).
EDGE_AND_INVERTED_ROIS = EDGE_ROIS + [[0, 20.0, 16.0, 10.0, 6.0], [1, 8.0, 3.0, 2.0, 20.0]]
STRIDES = [4, 8, 16, 32]


def _grads(pooled: torch.Tensor, inputs: list[torch.Tensor], grad: torch.Tensor) -> list:
    return list(torch.autograd.grad(pooled, inputs, grad))


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_roi_align_triton_matches_torchvision(aligned, sampling_ratio):
    """If this fails, the kernel samples other points, weights or averages them differently
    from torchvision.ops.roi_align, or its backward adds the gradient to other pixels or with
    other weights (float32, random RoIs partly outside the map, two images; sampling ratio 3
    has 36 taps per bin, padded to 64)."""
    features = _features(2, 5, 13, 17, seed=0).requires_grad_()
    rois = _random_rois(24, 2, 17 / 0.5, 13 / 0.5, seed=1)
    ours = roi_align(features, rois, 4, 0.5, sampling_ratio, aligned, method="triton")
    expected = tv_roi_align(features, rois, 4, 0.5, sampling_ratio, aligned)
    assert ours.shape == (24, 5, 4, 4) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    grad = _features(*ours.shape, seed=2)
    torch.testing.assert_close(_grads(ours, [features], grad), _grads(expected, [features], grad),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_triton_edge_cases_match_reference_float64(aligned):
    """If this fails, degenerate (zero-area, inverted) RoIs or RoIs partly or fully outside the
    map, or on its far edge, pool or get gradients other than the float64 loop reference's on the
    same values and torchvision's, or a RoI with no sample on the map is not exactly 0."""
    features = _features(2, 4, 13, 17, seed=3).requires_grad_()
    rois = torch.tensor(EDGE_AND_INVERTED_ROIS)
    ours = roi_align(features, rois, 3, 0.5, 2, aligned, method="triton")
    reference_features = features.detach().double().requires_grad_()
    reference = roi_align_reference(reference_features, rois.double(), 3, 0.5, 2, aligned)
    # 1e-5: the kernel's sample coordinates are float32 (as torchvision's), the reference's
    # float64; a coordinate off by 1e-6 px moves a bilinear sample of O(1) values by ~1e-6.
    torch.testing.assert_close(ours.double(), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, tv_roi_align(features, rois, 3, 0.5, 2, aligned),
                               atol=1e-5, rtol=1e-5)
    assert (ours[FULLY_OUTSIDE] == 0).all()
    grad = _features(*ours.shape, seed=4)
    ours_grad, = _grads(ours, [features], grad)
    reference_grad, = _grads(reference, [reference_features], grad.double())
    torch.testing.assert_close(ours_grad.double(), reference_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_triton_multilevel_matches_gather(channels_last, aligned):
    """If this fails, the kernel pools a RoI from another level than `levels` gives, with that
    level's wrong scale, size or strides (NCHW or channels-last features), or its backward
    writes another level's gradient buffer: forward and every level's gradient against the
    gather op (4 levels, 3 images, 7 channels, so the channel block is partly masked)."""
    format = torch.channels_last if channels_last else torch.contiguous_format
    features = [f.detach().to(memory_format=format).requires_grad_()
                for f in _pyramid(STRIDES, 3, 7, 64, 96, seed=5)]
    rois = _multiscale_rois(24, 3, 64, 96, seed=6)
    assert set((assign_levels(rois[:, 1:], 2, 5) - 2).tolist()) == {0, 1, 2, 3}
    ours = multilevel_roi_align(features, rois, 3, STRIDES, 2, aligned, method="triton")
    expected = multilevel_roi_align(features, rois, 3, STRIDES, 2, aligned, method="gather")
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert ours.is_contiguous(memory_format=torch.channels_last)  # as documented
    grad = _features(*ours.shape, seed=7)
    ours_grads = _grads(ours, features, grad)
    torch.testing.assert_close(ours_grads, _grads(expected, features, grad), atol=1e-5,
                               rtol=1e-5)
    assert all(g.shape == f.shape for g, f in zip(ours_grads, features, strict=True))


def test_roi_align_triton_many_channels():
    """If this fails, channels past the first channel block (128) are dropped, duplicated or
    read from the wrong place, forward or backward (130 channels: a full block and a block of 2;
    a gradient of channels-last strides as a channels-last consumer gives)."""
    features = _pyramid(STRIDES[:2], 2, 130, 32, 48, seed=8)
    rois = _multiscale_rois(5, 2, 32, 48, seed=9)
    levels = torch.tensor([0, 1, 1, 0, 1])
    ours = roi_align_levels_triton(features, rois, levels, 2, [0.25, 0.125], 2, True)
    pooled = []
    for roi, level in zip(rois, levels.tolist(), strict=True):
        pooled.append(tv_roi_align(features[level], roi[None], 2, 1.0 / STRIDES[level], 2, True))
    expected = torch.cat(pooled)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    grad = _features(*ours.shape, seed=10).to(memory_format=torch.channels_last)
    torch.testing.assert_close(_grads(ours, features, grad), _grads(expected, features, grad),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, forward_rtol, backward_rtol", [
    # The interpreter converts float32 to bfloat16 by truncation (relative error up to 2^-7);
    # the compiled kernel, and torch for the gradient, round to nearest (2^-8).
    (torch.bfloat16, 2**-7, 2**-8),
    (torch.float16, 2**-11, 2**-11),
])
def test_roi_align_triton_low_precision(dtype, forward_rtol, backward_rtol):
    """If this fails, bfloat16 or float16 features are not summed in float32 (so they lose more
    than the final rounding), or the output or gradient do not come back in the features'
    dtype. The expected values are torchvision's float32 results on the same low-precision
    values, so the only difference is one rounding to `dtype` (the rtols); atol covers float32
    cancellation near 0."""
    features = _features(2, 6, 13, 17, seed=11).to(dtype).to(memory_format=torch.channels_last)
    features.requires_grad_()
    rois = _random_rois(16, 2, 34.0, 26.0, seed=12)
    ours = roi_align(features, rois, 3, 0.5, 2, True, method="triton")
    assert ours.dtype == dtype
    exact = features.detach().float().requires_grad_()
    expected = tv_roi_align(exact, rois, 3, 0.5, 2, True)
    torch.testing.assert_close(ours.float(), expected, atol=1e-5, rtol=forward_rtol)
    grad = _features(*ours.shape, seed=13).to(dtype)
    ours_grad, = _grads(ours, [features], grad)
    assert ours_grad.dtype == dtype
    expected_grad, = _grads(expected, [exact], grad.float())
    torch.testing.assert_close(ours_grad.float(), expected_grad, atol=1e-5, rtol=backward_rtol)


def test_roi_align_triton_zero_rois():
    """If this fails, an empty RoI batch breaks the Triton forward (shape [0, C, P, P]) or its
    backward (zero gradients of the features' shapes)."""
    features = _pyramid([4, 8], 2, 3, 16, 24, seed=14)
    pooled = multilevel_roi_align(features, torch.zeros(0, 5), 7, [4, 8], 2, True,
                                  method="triton")
    assert pooled.shape == (0, 3, 7, 7)
    grads = torch.autograd.grad(pooled.sum(), features)
    for grad, f in zip(grads, features, strict=True):
        assert grad.shape == f.shape and (grad == 0).all()


def test_roi_align_triton_unsupported_dtype_is_an_error():
    """If this fails, an unsupported feature dtype for "triton" is silently accepted instead of
    raising a ValueError that names it. (Misspelt methods: test_runtime.py.)"""
    features = [_features(1, 2, 8, 8, seed=15), _features(1, 2, 4, 4, seed=16)]
    rois = torch.tensor([[0, 0.0, 0.0, 8.0, 8.0]])
    with pytest.raises(ValueError, match="float64"):
        roi_align(features[0].double(), rois, 2, 1.0, 2, True, method="triton")


def test_roi_align_triton_library_registration():
    """If this fails, the Triton ops' schemas, fake implementations (shapes, dtypes,
    channels-last strides) or autograd registration disagree with what they compute, so
    torch.compile or AOTAutograd would trace other shapes or gradients than eager runs."""
    features = _pyramid([4, 8], 2, 3, 16, 24, seed=17)
    rois = _multiscale_rois(4, 2, 16, 24, seed=18)
    levels = torch.tensor([0, 1, 0, 1])
    torch.library.opcheck(roi_align_levels_triton,
                          (features, rois, levels, 2, [0.25, 0.125], 2, True))
    grad = _features(4, 3, 2, 2, seed=19)
    torch.library.opcheck(roi_align_levels_triton_backward,
                          (grad, rois, levels, 2, [4, 2], [6, 3], [0.25, 0.125], 2, True))


def test_roi_align_triton_compiles_without_graph_breaks():
    """If this fails, multilevel_roi_align(method="triton") breaks the torch.compile graph (the
    Triton launch or a host read leaked out of the op), or the compiled forward or backward
    differs from eager."""
    features = _pyramid(STRIDES, 2, 3, 32, 48, seed=20)
    rois = _multiscale_rois(6, 2, 32, 48, seed=21)

    def pool_and_reduce(features, rois):
        return multilevel_roi_align(features, rois, 2, STRIDES, 2, True,
                                    method="triton").square().sum()

    explanation = torch._dynamo.explain(pool_and_reduce)(features, rois)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(pool_and_reduce, fullgraph=True, backend="aot_eager")
    compiled_grads = torch.autograd.grad(compiled(features, rois), features)
    eager_grads = torch.autograd.grad(pool_and_reduce(features, rois), features)
    torch.testing.assert_close(compiled_grads, eager_grads)


def test_roi_align_triton_kernels_compile_for_a_gpu():
    """If this fails, a kernel that the interpreter runs does not compile for a GPU (sm_90,
    bfloat16 channels-last, 256 channels, 4 levels, the box head's 7x7 and the mask head's
    14x14 at 8 images), so it would fail on the first CUDA step, or it spills registers; CI has
    no GPU, and the interpreter accepts code the compiler rejects."""
    compiled = compile_for_gpu("roi_align")
    assert [(kernel, case) for kernel, case, *_ in compiled] == [
        ("_roi_align_forward_kernel", "box-head"), ("_roi_align_backward_kernel", "box-head"),
        ("_roi_align_forward_kernel", "mask-head"), ("_roi_align_backward_kernel", "mask-head")]
    assert all(spills == 0 for *_, spills, _, _ in compiled)
