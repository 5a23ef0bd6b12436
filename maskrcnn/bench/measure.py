"""Measuring steps: wall time with the device synchronised, peak memory, counted FLOPs, and the
peak FLOP rate that model FLOP utilisation (MFU) is stated against."""

import ctypes
import os
import statistics
import threading
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from maskrcnn.config.config_pb2 import BF16, FP16

# CPU peak memory: the process's resident size is sampled this often (seconds).
RSS_SAMPLE_PERIOD = 0.005
# CPU peak FLOP/s: the achieved rate of an n x n matrix product (the best of a few), n = this.
MATMUL_SIDE = 2048
MATMUL_RUNS = 5

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets, by GPU and the
# precision the convolutions run in; "tf32" is FP32 training, as PyTorch lets cuDNN use TF32
# for convolutions by default (torch.backends.cudnn.allow_tf32). Matched against the device
# name in order, the first whose words all occur in it.
GPU_PEAK_TFLOPS = [
    (("H100", "PCIe"), {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (("H100", "NVL"), {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (("H100",), {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    (("H200", "NVL"), {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (("H200",), {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    (("A100",), {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(steps: list[Callable[[], object]], device: torch.device,
                rounds: int) -> list[list[float]]:
    """Seconds of each call of each step() over `rounds` rounds, a round calling every step
    once in turn, each call timed from a synchronised device to a synchronised device (a CPU
    runs synchronously). Taking turns exposes the steps alike to changes in the machine's
    speed (a shared VM's can drift by a fifth within a minute). Warm up before."""
    seconds = [[] for _ in steps]
    synchronize(device)
    for _ in range(rounds):
        for step, times in zip(steps, seconds, strict=True):
            start = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - start)
    return seconds


def throughput(seconds: list[float], images: int) -> dict[str, dict[str, float]]:
    """images/s and step time (ms) of timed steps. images/s is computed from the step time, so
    images/s median x step time median = images exactly (min images/s is the slowest step)."""
    median = statistics.median(seconds)
    return {
        "images_per_s": {"median": images / median, "min": images / max(seconds),
                         "max": images / min(seconds)},
        "step_ms": {"median": median * 1e3, "min": min(seconds) * 1e3,
                    "max": max(seconds) * 1e3},
    }


def _rss_bytes() -> int:
    """The process's resident memory now (Linux: /proc/self/statm, in pages)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_heap() -> None:
    """Returns freed heap memory to the OS (glibc's malloc_trim), so that what an earlier
    section freed is not counted as resident at the start of the next."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


class PeakMemory:
    """Peak memory while the `with` block runs: `.mib` (after exit) and `.kind` (its meaning).

    CUDA: torch.cuda.max_memory_allocated (tensors) while the block ran, less what was
    allocated when it began (another model set up before does not count). CPU: the peak of
    the process's resident memory (sampled every RSS_SAMPLE_PERIOD by a thread) above its
    level when the block began.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.mib = 0.0
        if device.type == "cuda":
            self.kind = "CUDA max_memory_allocated (tensors) above the section start"
        else:
            self.kind = (f"CPU resident memory above the section start (RSS sampled every "
                         f"{RSS_SAMPLE_PERIOD * 1e3:g} ms)")
        self._stop = threading.Event()
        self._peak = 0
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_PERIOD):
            self._peak = max(self._peak, _rss_bytes())

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_heap()
            self._start = self._peak = _rss_bytes()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.mib = (max(self._peak, _rss_bytes()) - self._start) / 2**20


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the operations fn() runs, as torch.utils.flop_counter counts them (matrix
    products and convolutions, forward and backward; other ops count 0)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _precision_name(precision: int) -> str:
    if precision == BF16:
        return "bf16"
    if precision == FP16:
        return "fp16"
    return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"


def _matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Achieved TFLOP/s of an n x n matrix product in dtype: the best of MATMUL_RUNS."""
    a = torch.randn(MATMUL_SIDE, MATMUL_SIDE, device=device).to(dtype)
    b = torch.randn(MATMUL_SIDE, MATMUL_SIDE, device=device).to(dtype)
    a @ b  # warm-up
    seconds = time_rounds([lambda: a @ b], device, MATMUL_RUNS)[0]
    return 2 * MATMUL_SIDE**3 / min(seconds) / 1e12


def peak_tflops(device: torch.device, precision: int, override: float) -> tuple[float, str]:
    """The peak TFLOP/s MFU is stated against, and where it comes from.

    override > 0: that value. CUDA: GPU_PEAK_TFLOPS for the device and precision. A CPU, or a
    GPU not in the table: measured, the best achieved rate of a large matrix product (in
    bfloat16 or float16 when the run uses it, else float32).
    """
    name = _precision_name(precision)
    if override > 0:
        return override, f"--peak_tflops={override:g}"
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        for words, peaks in GPU_PEAK_TFLOPS:
            if all(word in gpu for word in words):
                return peaks[name], f"{gpu}: datasheet dense {name} peak"
    else:
        gpu = None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name, torch.float32)
    measured = _matmul_tflops(device, dtype)
    where = (f"{gpu} (not in the table)" if gpu
             else f"CPU, torch threads: {torch.get_num_threads()}")
    return measured, (f"{where}: measured, best of {MATMUL_RUNS} {MATMUL_SIDE}x{MATMUL_SIDE} "
                      f"{str(dtype).removeprefix('torch.')} matrix products")
