"""Automatic fallback: before the first step on a GPU, each Triton kernel the runtime selected
is compiled and run once on a small input and compared with its PyTorch path; one that raises
(a compile error, a missing C compiler or libcuda) or disagrees is replaced by its PyTorch path
for the whole run, with one line naming the kernel and the reason. The maths is the same
either way (every method is tested against the same reference), so only the speed changes.

With several processes the ranks agree: a kernel that fails on any rank runs its PyTorch path
on all of them, so every rank computes the same thing. The comparisons themselves are
engine/kernel_check.py's, the ones `maskrcnn-check` runs at full size.
"""

from collections.abc import Callable

import torch

from maskrcnn.engine import distributed
from maskrcnn.engine.kernel_check import Comparison, Sizes, compare_op
from maskrcnn.runtime import KERNEL_OPS, Runtime

Compare = Callable[[str, str, torch.device, Sizes], list[Comparison]]


def _reason(comparisons: list[Comparison]) -> str | None:
    """Why the kernel cannot be used, or None if every comparison passed."""
    for c in comparisons:
        if c.error is not None:
            return f"raised {c.error}"
        if not c.ok:
            return (f"differs from {c.reference} by {c.max_diff:.3g} in {c.op} (tolerance "
                    f"{c.tolerance:.3g})")
    return None


def verify_kernels(runtime: Runtime, device: torch.device, log: Callable[[str], None] = print,
                   *, compare: Compare = compare_op, sizes: Sizes | None = None,
                   always: bool = False) -> Runtime:
    """`runtime` with each selected Triton kernel that fails its small check (on this or any
    other rank) replaced by the op's PyTorch path. Runs on a CUDA device only (elsewhere Triton
    is not selected), unless `always` (tests, which run the kernels interpreted on a CPU).

    log: prints each failure's line (on every rank: a failure may be one rank's alone).
    compare, sizes: the comparison and its input sizes (kernel_check's; tests inject others).
    """
    ops = [op for op in KERNEL_OPS if getattr(runtime, op) == "triton"]
    if not ops or (device.type != "cuda" and not always):
        return runtime
    sizes = sizes or Sizes.small()
    failed = torch.zeros(len(ops), dtype=torch.int64)
    for index, op in enumerate(ops):
        reason = _reason(compare(op, "triton", device, sizes))
        if reason is not None:
            failed[index] = 1
            prefix = f"rank {runtime.rank}: " if runtime.world_size > 1 else ""
            log(f"{prefix}warning: the Triton {op} kernel {reason}; {op} runs its PyTorch path "
                f"({runtime.torch_method(op)}) for this run (run.kernels.{op}: TORCH skips "
                "the check)")
    if runtime.world_size > 1:
        failed = failed.to(device)
        distributed.all_reduce_(failed, torch.distributed.ReduceOp.MAX,
                                "all_reduce of the Triton kernels' checks")
        failed = failed.cpu()  # read once at start-up, before any step
    changes = {op: runtime.torch_method(op) for op, bad in zip(ops, failed.tolist(), strict=True)
               if bad}
    return runtime.replace(**changes) if changes else runtime
