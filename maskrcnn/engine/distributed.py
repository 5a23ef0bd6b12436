"""Data parallelism: the process group from torchrun's environment, its teardown, and the few
collectives the engine runs besides DDP's gradient all-reduce.

torchrun (`python -m torch.distributed.run`) starts one process per device and sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init` reads them. Without them, or with a
world size of 1, there is no process group and every function here is the identity, so a
single process runs the same code.

A collective that fails (a peer died, so Gloo sees its connection close) or waits longer than
the timeout becomes a `DistributedError` naming this rank and the operation, e.g.
"rank 1: all_reduce of the loss normalisers timed out after 30 s (another rank may have died
or hung)". NCCL reports its timeouts from a watchdog thread, which ends the process with a
message naming the rank and the operation ("[Rank 1] Watchdog caught collective operation
timeout: WorkNCCL(SeqNum=..., OpType=ALLREDUCE, ...)"); torchrun then stops the other ranks
and names the one that failed first.

When a rank fails on its own (a corrupt image, an out-of-memory error, a failed kernel) it
publishes "rank R: cause" in the job's store (`publish_failure`) and ends. Its end closes its
Gloo connections (leaving the group does not while DDP holds it), so the others' next
collective fails at once rather than at the timeout, and they read the cause from the store
(`first_failure`); rank 0 prints the job's one line (`end_failed_job`). Under torchrun the
store is the agent's and outlives every rank. NCCL does not notice a peer's end (its kernels
wait on the GPU until the timeout, while the host may be anywhere), so with NCCL each rank
also runs a watcher thread (`watch_for_failures`) that polls the store and ends its process
with the job's one line as soon as another rank has published a failure; the checkpoints
written before stay on disk.
"""

import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from maskrcnn.config import ConfigError

# What Gloo's errors say when a peer is gone or a wait timed out (it raises plain
# RuntimeErrors); NCCL raises DistBackendError.
_PEER_ERRORS = ("gloo", "pair closure", "connection closed", "connection reset", "timed out")
_timeout_s = 0.0  # set by init
_store: dist.Store | None = None  # the process group's store, kept past its teardown
_rank = 0  # this process's rank, also after the teardown
_FIRST_FAILURE = "maskrcnn/first_failure"  # "R\ncause" of the first rank that failed
T = TypeVar("T")


class DistributedError(RuntimeError):
    """A collective failed or timed out: another rank died or hung."""


@dataclass(frozen=True)
class Process:
    """This process's place in the job, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def init(device: torch.device, timeout_s: float) -> Process:
    """Joins the job torchrun started (a no-op for a single process).

    device: the resolved --device; on CUDA each process takes cuda:LOCAL_RANK (backend NCCL),
    on the CPU the backend is Gloo. timeout_s: how long any collective may wait.
    """
    global _timeout_s, _store, _rank
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return Process(0, 1, 0, device)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if timeout_s <= 0:
        raise ConfigError(f"--dist_timeout_s={timeout_s:g}: must be > 0")
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(f"--device={device} names one GPU, but each of the {world_size} "
                              "processes needs its own: use --device=cuda or auto")
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise ConfigError(f"LOCAL_RANK={local_rank} but this node has {visible} visible "
                              f"GPUs: start at most {visible} processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    _timeout_s = float(timeout_s)
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    except dist.DistError as error:  # e.g. the rendezvous store timed out
        raise DistributedError(f"rank {rank}: joining the process group failed: "
                               f"{_summary(error)}") from None
    _store, _rank = dist.distributed_c10d._get_default_store(), rank
    if device.type == "cuda":
        watch_for_failures()
    return Process(rank, world_size, local_rank, device)


def shutdown() -> None:
    """Leaves the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def publish_failure(cause: str) -> None:
    """Records in the job's store that this rank failed, and why (one line), unless another
    rank's failure was recorded first; nothing without a process group."""
    if _store is None:
        return
    try:
        _store.compare_set(_FIRST_FAILURE, "", f"{dist.get_rank()}\n{cause}")
    except (RuntimeError, dist.DistError):
        pass  # the store is gone (its host ended): the collectives fail on their own


def first_failure() -> tuple[int, str] | None:
    """(rank, cause) of the first rank that published a failure, or None."""
    if _store is None:
        return None
    try:
        if not _store.check([_FIRST_FAILURE]):
            return None
        rank, cause = _store.get(_FIRST_FAILURE).decode().split("\n", 1)
    except (RuntimeError, dist.DistError, ValueError):
        return None
    return int(rank), cause


# How often the watcher reads the store: a peer's failure ends this rank within about this.
WATCH_INTERVAL_S = 0.5


def watch_for_failures(interval_s: float = WATCH_INTERVAL_S, end=os._exit) -> threading.Thread:
    """Starts a daemon thread that, once another rank has published a failure, prints the
    job's one line (rank 0; the others end silently, as with Gloo) and ends this process with
    exit status 2 by `end` (tests pass another). For NCCL, whose ranks would otherwise wait
    for the collective timeout: a hard end, since the main thread may be blocked in CUDA."""

    def watch() -> None:
        while True:
            failed = first_failure()
            if failed is not None and failed[0] != _rank:
                if _rank == 0:
                    print(f"error: rank {failed[0]} failed: {failed[1]}; stopping all ranks "
                          "(the checkpoints written before are kept; continue with --resume)",
                          file=sys.stderr, flush=True)
                end(2)
                return
            time.sleep(interval_s)

    thread = threading.Thread(target=watch, name="maskrcnn-failure-watcher", daemon=True)
    thread.start()
    return thread


def rank() -> int:
    """This process's rank (0 without a process group), also after shutdown()."""
    return _rank


def end_failed_job() -> bool:
    """Whether this process prints its one line on a failure that ends the job: always
    without a process group; with one, rank 0, and the others only when no rank published a
    failure (a rank was killed or hung), since rank 0's line names the one that failed."""
    return _store is None or _rank == 0 or first_failure() is None


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _is_peer_error(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(s in text for s in _PEER_ERRORS)


def _summary(error: BaseException) -> str:
    """The first sentence of an error, without Gloo's source-file prefix."""
    lines = str(error).strip().splitlines()
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else type(error).__name__
    return text.split(". ")[0]


@contextmanager
def collective(operation: str) -> Iterator[None]:
    """Turns a failed or timed-out collective inside the block into a DistributedError that
    names this rank and the operation. Other errors, and any without a process group, pass
    through unchanged."""
    try:
        yield
    except RuntimeError as error:
        if world_size() == 1 or not _is_peer_error(error):
            raise
        rank = dist.get_rank()
        text = _summary(error)
        if "timed out" in text.lower() or "timeout" in text.lower():
            message = (f"rank {rank}: {operation} timed out after {_timeout_s:g} s "
                       "(another rank may have died or hung)")
        else:
            message = f"rank {rank}: {operation} failed (another rank may have died): {text}"
        raise DistributedError(message) from None


def all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType, operation: str) -> None:
    """In-place all-reduce of tensor over the ranks (nothing with one process)."""
    if world_size() > 1:
        with collective(operation):
            dist.all_reduce(tensor, op)


def gather_to_main(obj: T, operation: str) -> list[T] | None:
    """Every rank's obj (picklable), in rank order, on rank 0; None on the other ranks."""
    if world_size() == 1:
        return [obj]
    objects = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    with collective(operation):
        dist.gather_object(obj, objects, dst=0)
    return objects


def broadcast_from_main(obj: T, operation: str) -> T:
    """Rank 0's obj (picklable) on every rank; the others pass anything, e.g. None."""
    if world_size() == 1:
        return obj
    box = [obj]
    with collective(operation):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(operation: str) -> None:
    if world_size() > 1:
        with collective(operation):
            dist.barrier()


def node_main_first(process: Process, fn: Callable[[], T]) -> T:
    """fn() on each node's first process, then on the others (e.g. filling a node-local cache
    once instead of racing on it)."""
    if process.local_rank != 0:
        barrier("waiting for the node's first process to prepare the data")
    result = fn()
    if process.local_rank == 0:
        barrier("waiting for the node's first process to prepare the data")
    return result

