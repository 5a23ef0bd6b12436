"""The whole training step recorded as one CUDA graph per canvas, and replayed.

A graph records the kernels of one call of the step function (forward, backward, clipping,
the SGD update and the LR's step counter: engine/step.py) with the addresses of every tensor
they read and write, and replays them with one launch. So everything the step reads must
live at fixed addresses: the batch is copied into static input buffers (one set per canvas,
since each canvas is a graph of its own), the LR and its step counter are device tensors,
the gradients and momentum buffers are allocated before the capture and never replaced
(engine/solver.py: SGD), and the losses come out in a static tensor that is copied before
the next replay. Sampling keys are drawn inside the graph from the default CUDA generator,
which PyTorch registers with every capture: each replay draws new numbers.

Before capturing a canvas, its first `warmup_steps` batches run the step eagerly on a side
stream (real training steps, not discarded): lazily created state (cuBLAS and cuDNN
handles, autograd's streams, DDP's gradient buckets, the gradients themselves, compiled
kernels of that canvas) then exists before the capture, as PyTorch's CUDA-graph notes
require. PyTorch asks for at least 11 eager DDP iterations before capturing a DDP backward.
The batch the capture runs on is trained on by the first replay (a capture records kernels
without running them).

All canvases share one memory pool. That is safe here because the graphs never run at the
same time and nothing they allocate outlives a replay except the loss output, which is
copied at once: inputs, parameters, gradients and optimizer state are allocated outside
the pool.

A capture that fails (an op that cannot be recorded, a driver that refuses) must not end the
run: the replayer prints one line with the error's first line, drops every graph, and runs
the step eagerly from then on, the failed capture's batch included (a capture runs no kernel,
so nothing of that batch was applied). With several processes the ranks agree after each
capture (`agree`: a collective at a step where all of them capture the same canvas, since
they step in lockstep on one canvas): if it failed on any, all run eagerly, so that every
rank computes the same thing.

`capture` and `stream` are parameters so that tests can drive the bookkeeping on a CPU,
where no CUDA graph exists (tests/engine/test_graph.py).
"""

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

# Eager steps per canvas before its capture: one process, and several (PyTorch's rule for
# DistributedDataParallel: its reducer settles its buckets only after several iterations).
WARMUP_STEPS = 3
WARMUP_STEPS_DDP = 11

StepFunction = Callable[..., torch.Tensor]


class CudaCapture:
    """Records one call of a function as a CUDA graph (the default `capture`)."""

    def __init__(self):
        self.pool = None  # shared by all graphs (see the module docstring)

    def __call__(self, function: StepFunction, inputs: tuple[torch.Tensor, ...]
                 ) -> tuple[Callable[[], None], torch.Tensor]:
        """Captures function(*inputs); returns (replay, output)."""
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        # thread_local: the DataLoader's pinning thread may allocate pinned memory (an event
        # query) while this thread captures; in the global mode that would break the capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            output = function(*inputs)
        self.pool = graph.pool()
        return graph.replay, output


def side_stream(device: torch.device) -> AbstractContextManager:
    """A context that runs its work on a fresh stream of `device`, ordered after the current
    stream's work and before whatever the current stream does next (CUDA); nothing on a CPU."""
    if device.type != "cuda":
        return nullcontext()
    return _SideStream(device)


class _SideStream:
    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.context = torch.cuda.stream(self.stream)

    def __enter__(self):
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        self.context.__enter__()

    def __exit__(self, *exc_info):
        self.context.__exit__(*exc_info)
        torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)


@dataclass
class _Graph:
    inputs: tuple[torch.Tensor, ...]  # the static input buffers
    replay: Callable[[], None]
    output: torch.Tensor  # the static losses


class GraphedStep:
    """Calls `function(*inputs)` as a replayed CUDA graph, one per input signature (shapes,
    dtypes, strides: in practice one per canvas), after `warmup_steps` eager calls of each.

    Args:
        function: the whole step; it must not synchronise with the host, must not replace
            the tensors it updates, and must return a tensor (the losses).
        device: where the step runs (for the side stream of the eager warm-up).
        warmup_steps: eager calls of each signature before it is captured.
        capture: records a function (CudaCapture; tests pass a recorder).
        log: prints the one line of a failed capture.
        agree: given whether this process's capture failed, whether any process's did (the
            identity with one process; a collective with several).

    Attributes:
        eager_steps: per signature, the eager calls made; graphs: per signature, its graph;
        failed: the reason the step runs eagerly for good (a failed capture), or None.
    """

    def __init__(self, function: StepFunction, device: torch.device,
                 warmup_steps: int = WARMUP_STEPS, capture: Callable | None = None,
                 log: Callable[[str], None] = print,
                 agree: Callable[[bool], bool] = lambda failed: failed):
        self.function, self.device, self.warmup_steps = function, device, warmup_steps
        self.capture = capture or CudaCapture()
        self.log, self.agree = log, agree
        self.eager_steps: dict[tuple, int] = {}
        self.graphs: dict[tuple, _Graph] = {}
        self.failed: str | None = None

    @staticmethod
    def signature(inputs: tuple[torch.Tensor, ...]) -> tuple:
        return tuple((t.shape, t.dtype, t.stride()) for t in inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The step's output on these inputs (a fresh tensor, not the graph's buffer)."""
        if self.failed is not None:
            return self.function(*inputs)
        key = self.signature(inputs)
        graph = self.graphs.get(key)
        if graph is None:
            done = self.eager_steps.get(key, 0)
            if done < self.warmup_steps:
                self.eager_steps[key] = done + 1
                with side_stream(self.device):
                    return self.function(*inputs)
            graph = self._capture(key, inputs)
            if graph is None:
                return self.function(*inputs)
        else:
            for buffer, t in zip(graph.inputs, inputs, strict=True):
                buffer.copy_(t, non_blocking=True)
        graph.replay()
        return graph.output.clone()

    def _capture(self, key: tuple, inputs: tuple[torch.Tensor, ...]) -> _Graph | None:
        """The graph of this signature, captured on a copy of `inputs`; None when the capture
        failed here or on another process (then the step is eager from now on)."""
        # Buffers allocated here, outside the graph's pool, hold this batch already.
        static = tuple(t.clone(memory_format=torch.preserve_format) for t in inputs)
        error = None
        try:
            replay, output = self.capture(self.function, static)
        except Exception as failed:  # any failure of the capture; the step then runs eagerly
            error = (str(failed).strip().splitlines() or [type(failed).__name__])[0]
        if not self.agree(error is not None):
            self.graphs[key] = _Graph(static, replay, output)
            return self.graphs[key]
        self.failed = error or "the capture failed on another process"
        self.graphs.clear()
        self.log(f"warning: CUDA graph capture failed ({self.failed}); the training step runs "
                 "eagerly for the rest of this run (run.cuda_graph: false skips the capture)")
        return None
