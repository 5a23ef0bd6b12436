"""torch.compile of the training step: static shapes, one graph per canvas."""

import torch

from maskrcnn.bench.step import bench_step
from maskrcnn.bench.synthetic import synthetic_batch
from maskrcnn.config import load_config
from maskrcnn.engine.step import compile_step
from maskrcnn.model.maskrcnn import build_model
from maskrcnn.runtime import Runtime
from tests.tiny import TINY


def test_compiled_step_has_one_static_graph_per_canvas():
    """If this fails, the compiled step traces a canvas with symbolic sizes (dynamic shapes,
    which the Triton kernels and a CUDA graph cannot take), compiles a canvas more than once,
    or recompiles when batches alternate between the config's two canvases (96x128 and
    128x96 here)."""
    config = load_config("shapes", TINY)
    graphs = []

    def backend(graph, example_inputs):
        # A graph traced with dynamic sizes has inputs whose sizes are SymInts (even where a
        # guard later pins them to one value).
        values = [n.meta.get("example_value") for n in graph.graph.nodes if n.op == "placeholder"]
        symbolic = [v for v in values if isinstance(v, torch.SymInt) or (
            isinstance(v, torch.Tensor) and not all(type(d) is int for d in v.shape))]
        assert not symbolic, f"symbolic sizes in the compiled step: {symbolic}"
        graphs.append(next(t.shape[-2:] for t in example_inputs
                           if isinstance(t, torch.Tensor) and t.dtype == torch.uint8
                           and t.dim() == 4))
        return graph.forward

    torch.manual_seed(0)
    model = build_model(config, Runtime.gpu_path()).train()
    step = compile_step(model, backend=backend)
    swapped = load_config("shapes", TINY)
    swapped.data.canvas.reverse()  # synthetic_batch fills the first canvas
    batches = [synthetic_batch(c, seed=1) for c in (config, swapped)]
    for batch in batches * 2:
        losses = step(batch.images, batch.image_sizes, batch.gt_boxes, batch.gt_classes,
                      batch.gt_valid, batch.gt_masks)
        sum(losses.values()).backward()
    assert [tuple(s) for s in graphs] == [(96, 128), (128, 96)]


# A step small enough for inductor to compile on a 2-core CPU: one 64x96 image, few proposals
# and RoIs. Cold (empty inductor cache) the test took 3.5 min on a 2-core machine shared with
# other jobs (1.5 min of CPU time); 40 s from inductor's cache.
INDUCTOR_TINY = (
    "data { short_side: 64 max_long_side: 96 canvas { height: 64 width: 96 } "
    "canvas { height: 96 width: 64 } max_instances: 4 gt_mask_size: 8 }",
    "model { rpn { batch_size_per_image: 32 pre_nms_topk_train: 50 post_nms_topk_train: 20 } "
    "roi_heads { batch_size_per_image: 16 max_fg_masks_per_image: 4 } }",
    "run { images_per_gpu: 1 }",
    # A large LR from the first step: the update stands far above the weights' rounding.
    "solver { warmup_start_factor: 1.0 base_lr_per_image: 1.0 }",
)


def test_inductor_step_trains_as_the_eager_step():
    """If this fails, the default backend (inductor, which the GPU runs use: run.compile) cannot
    compile the step's forward and backward on a CPU, or its generated kernels compute other
    losses or gradients than the eager ops: one step's five losses and updated weights differ
    from the eager step's by more than float32 reordering explains. (An inductor whose ReLU
    backward was off by 1% failed here: every backbone update differed.)"""
    config = load_config("shapes", [*TINY, *INDUCTOR_TINY])
    compiled_config = load_config("shapes", [*TINY, *INDUCTOR_TINY, "run { compile: true }"])
    eager, compiled = (bench_step(c, torch.device("cpu")) for c in (config, compiled_config))
    assert compiled.forward is not compiled.model  # compile_step's wrapper, default backend
    for a, b in zip(eager.model.parameters(), compiled.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    initial = [p.detach().clone() for p in eager.model.parameters()]
    batch = synthetic_batch(config, seed=1)
    losses = []
    for step in (eager, compiled):
        torch.manual_seed(0)
        losses.append(step(batch))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    # The update itself (LR x gradient plus weight decay), within 1e-3 of its largest element:
    # the weights alone would hide a wrong gradient below their own rounding.
    for (name, a), b, start in zip(eager.model.named_parameters(), compiled.model.parameters(),
                                   initial, strict=True):
        expected = a.detach() - start
        torch.testing.assert_close(b.detach() - start, expected, rtol=1e-3,
                                   atol=1e-3 * float(expected.abs().max()),
                                   msg=lambda text, name=name: f"{name}: {text}")
