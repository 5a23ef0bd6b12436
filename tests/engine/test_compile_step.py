"""torch.compile of the training step: static shapes, one graph per canvas."""

import torch

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
