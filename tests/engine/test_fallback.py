"""Automatic fallback (engine/fallback.py): a Triton kernel that raises or computes wrong values
before the first step is replaced by its PyTorch path, with one line, on every rank.

The kernels run under Triton's interpreter on CPU tensors (tests/conftest.py), so these tests
drive the real comparisons of engine/kernel_check.py at their small sizes, with a kernel of
ours replaced by a stand-in that raises (as a compile error would) or writes wrong values.
"""

import os
import socket

import torch
import torch.multiprocessing as mp

from maskrcnn.engine import distributed
from maskrcnn.engine.fallback import verify_kernels
from maskrcnn.engine.kernel_check import Comparison
from maskrcnn.ops import nms_triton, roi_align_triton
from maskrcnn.runtime import Runtime

ALL_TRITON = Runtime.gpu_path(nms="triton", roi_align="triton", match="triton")
CPU = torch.device("cpu")


class RaisingKernel:
    """Stands in for a Triton kernel (`kernel[grid](...)`) whose compilation fails."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("PassManager::run failed\nthe rest of a long compiler log")
        return launch


class WrongKernel:
    """Stands in for a Triton kernel that runs but writes 7 into its output (argument 0)."""

    def __getitem__(self, grid):
        def launch(out, *args, **kwargs):
            out.fill_(7.0)
        return launch


def test_working_kernels_are_kept_and_nothing_is_printed():
    """If this fails, the small check fails a kernel that is right (every run on a GPU would
    then lose that kernel), or it prints when nothing fell back."""
    lines = []
    assert verify_kernels(ALL_TRITON, CPU, lines.append, always=True) == ALL_TRITON
    assert lines == []


def test_a_kernel_that_raises_falls_back_to_its_pytorch_path_with_one_line(monkeypatch):
    """If this fails, a Triton NMS kernel that cannot compile ends the run in a traceback,
    or takes the other kernels with it, or the line does not name the kernel and the error."""
    monkeypatch.setattr(nms_triton, "_greedy_nms_kernel", RaisingKernel())
    lines = []
    runtime = verify_kernels(ALL_TRITON, CPU, lines.append, always=True)
    assert runtime == ALL_TRITON.replace(nms="torch")
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("warning: the Triton nms kernel raised RuntimeError: "
                            "PassManager::run failed;")
    assert "nms runs its PyTorch path (torch)" in lines[0]


def test_a_kernel_with_wrong_values_falls_back_with_the_largest_difference(monkeypatch):
    """If this fails, a Triton ROIAlign that computes wrong numbers (a miscompiled kernel)
    stays in use, silently training on wrong features."""
    monkeypatch.setattr(roi_align_triton, "_roi_align_forward_kernel", WrongKernel())
    lines = []
    runtime = verify_kernels(ALL_TRITON, CPU, lines.append, always=True)
    assert runtime == ALL_TRITON.replace(roi_align="gather")
    assert len(lines) == 1 and "the Triton roi_align kernel differs from gather by" in lines[0]


def test_no_check_off_a_gpu_or_without_a_triton_kernel():
    """If this fails, CPU runs (which select no Triton kernel) or a GPU run with every kernel
    switched to TORCH pay for comparisons they do not need."""
    def compare(*args):
        raise AssertionError("compared")

    cpu = Runtime.for_device("cpu")
    assert verify_kernels(cpu, CPU, compare=compare, always=True) is cpu
    assert verify_kernels(ALL_TRITON, CPU, compare=compare) is ALL_TRITON


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, port: int, out: str) -> None:
    """Rank `rank` of 2: rank 1's NMS check fails, rank 0's passes; saves the runtime."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init(CPU, 120)
    try:
        def compare(op, method, device, sizes):
            broken = rank == 1 and op == "nms"
            return [Comparison(op, method, "torch", float("inf") if broken else 0.0, 0.0, 1.0,
                               "boom" if broken else None)]

        lines = []
        runtime = verify_kernels(ALL_TRITON.replace(rank=rank, world_size=2), CPU,
                                 lines.append, compare=compare, always=True)
        torch.save({"runtime": runtime, "lines": lines}, f"{out}/rank{rank}.pt")
    finally:
        distributed.shutdown()


def test_ranks_agree_a_kernel_that_fails_on_one_runs_its_pytorch_path_on_all(tmp_path):
    """If this fails, one rank runs the PyTorch NMS while the others run the kernel that
    failed there: the ranks would no longer compute the same step."""
    mp.spawn(_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for rank, state in enumerate(saved):
        assert state["runtime"] == ALL_TRITON.replace(nms="torch", rank=rank, world_size=2)
    assert saved[0]["lines"] == []
    assert saved[1]["lines"] == ["rank 1: warning: the Triton nms kernel raised boom; nms runs "
                                 "its PyTorch path (torch) for this run (run.kernels.nms: TORCH "
                                 "skips the check)"]
