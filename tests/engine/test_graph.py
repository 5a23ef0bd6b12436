"""The CUDA-graph replayer's bookkeeping (engine/graph.py), driven on the CPU.

A CPU has no CUDA graph, so these tests pass GraphedStep a recorder that does what a capture
does to the program's state: it runs nothing when "capturing", and each replay runs the
function on the static input buffers it was captured with, writing the same static output
tensor. On a GPU, maskrcnn-check compares real replays with eager steps.
"""

import torch

from maskrcnn.bench.synthetic import synthetic_batch
from maskrcnn.engine.graph import GraphedStep
from maskrcnn.engine.step import LOSS_KEYS, model_inputs
from maskrcnn.runtime import Runtime
from tests.engine.test_step import _tiny_step


class Recorder:
    """A stand-in for CudaCapture: replay() re-runs the function on the captured inputs
    and copies its result into the one output tensor, as a graph's kernels would."""

    def __init__(self, output_size: int):
        self.output_size = output_size
        self.captures = []

    def __call__(self, function, inputs):
        self.captures.append(inputs)
        output = torch.full((self.output_size,), float("nan"))  # nothing ran yet

        def replay():
            output.copy_(function(*inputs))

        return replay, output


def test_graph_replays_each_canvas_after_its_warmup_and_trains_on_every_batch():
    """If this fails, the replayer skips or repeats a batch (the capture's batch must be
    trained on by the first replay), captures a canvas before its warm-up or more than once,
    reads a stale batch (not copied into the static buffers), or returns the graph's own
    output buffer (which the next replay overwrites)."""
    seen = []

    def step(images, sizes):
        seen.append(float(images.sum()))
        return torch.stack([images.sum(), sizes.sum()])

    recorder = Recorder(2)
    graphed = GraphedStep(step, torch.device("cpu"), warmup_steps=2, capture=recorder)
    wide, tall = torch.zeros(1, 2, 3), torch.zeros(1, 3, 2)
    sizes = torch.zeros(2)
    outputs = []
    order = [wide, wide, tall, wide, wide, tall, tall, tall, wide]
    for index, canvas in enumerate(order):
        outputs.append(graphed(canvas + index, sizes + index))
    expected = [float((canvas + i).sum()) for i, canvas in enumerate(order)]
    assert seen == expected  # every batch once, in order, with its own values
    assert [o[0].item() for o in outputs] == expected  # earlier results not overwritten
    assert len(recorder.captures) == 2 and len(graphed.graphs) == 2
    assert sorted(graphed.eager_steps.values()) == [2, 2]
    # The static buffers are copies, never the caller's tensors.
    first = recorder.captures[0][0]
    assert all(first.data_ptr() != canvas.data_ptr() for canvas in order)


def test_graphed_train_step_trains_as_the_eager_step():
    """If this fails, running the training step through the replayer's static buffers
    changes what it computes (a batch copied wrongly, a stride lost, the LR or momentum not
    carried from the eager warm-up into the replays): 5 steps over two canvases, with the
    recorder standing in for the graph, must give the eager steps' losses and weights."""
    eager, graphed = (_tiny_step(Runtime.gpu_path()) for _ in range(2))
    replayer = GraphedStep(graphed.step_function, torch.device("cpu"), warmup_steps=1,
                           capture=Recorder(len(LOSS_KEYS)))
    swapped = eager.config.__class__()
    swapped.CopyFrom(eager.config)
    swapped.data.canvas.reverse()  # synthetic_batch fills the first canvas
    batches = [synthetic_batch(c, seed=i) for i, c in enumerate((eager.config, swapped))]
    for index in range(5):
        inputs = model_inputs(batches[index % 2], eager.config.run.channels_last)
        torch.manual_seed(index)
        expected = eager.step_function(*inputs)
        torch.manual_seed(index)
        got = replayer(*inputs)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert len(replayer.graphs) == 2
    for a, b in zip(eager.model.parameters(), graphed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert int(graphed.lr.step) == 5


class FailingCapture:
    """A capture that raises as a driver would, after "recording" part of the step: like a
    real capture, it runs none of the step's kernels."""

    def __init__(self):
        self.calls = 0

    def __call__(self, function, inputs):
        self.calls += 1
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\n"
                           "CUDA kernel errors might be asynchronously reported")


def test_a_failed_capture_prints_one_line_and_the_step_runs_eagerly_on_every_batch():
    """If this fails, a capture that raises ends the run with a traceback, loses the batch it
    was captured on (a capture trains nothing), tries to capture again every step, or the
    ranks do not agree (one rank failing must make all of them run eagerly)."""
    seen, lines, agreed = [], [], []

    def step(images):
        seen.append(float(images.sum()))
        return images.sum().reshape(1)

    capture = FailingCapture()

    def agree(failed):
        agreed.append(failed)
        return failed

    graphed = GraphedStep(step, torch.device("cpu"), warmup_steps=1, capture=capture,
                          log=lines.append, agree=agree)
    outputs = [graphed(torch.full((2,), float(i))) for i in range(4)]
    assert seen == [0.0, 2.0, 4.0, 6.0]  # every batch once, the failed capture's included
    assert [float(o) for o in outputs] == seen
    assert capture.calls == 1 and agreed == [True] and graphed.graphs == {}
    assert len(lines) == 1 and "operation not permitted" in lines[0] \
        and "eagerly" in lines[0] and "\n" not in lines[0]


def test_a_capture_that_failed_on_another_rank_drops_this_ranks_graph():
    """If this fails, a rank whose own capture worked replays its graph while another rank,
    whose capture failed, runs eagerly: the ranks would no longer compute the same thing."""
    seen, lines = [], []

    def step(images):
        seen.append(float(images.sum()))
        return images.sum().reshape(1)

    recorder = Recorder(1)
    graphed = GraphedStep(step, torch.device("cpu"), warmup_steps=1, capture=recorder,
                          log=lines.append, agree=lambda failed: True)
    for i in range(3):
        graphed(torch.full((2,), float(i)))
    assert seen == [0.0, 2.0, 4.0] and graphed.graphs == {} and len(recorder.captures) == 1
    assert graphed.failed == "the capture failed on another process" and len(lines) == 1
