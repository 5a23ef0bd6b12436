"""Compiles every Triton kernel of maskrcnn for GPUs, on a machine without one (CI).

    python tools/compile_kernels.py [--arch 90 80] [--only nms match roi_align]

Each case below calls a kernel's launcher on CPU tensors of the COCO recipe's sizes
(config/named/base/coco_r50_fpn.pbtxt with 8x4.pbtxt's 8 images per GPU, the bench's batch:
canvas 800x1344, RPN pre-NMS top-k 2000 per level in training and 1000 in tests, 1000 kept,
512 RoIs and 128 mask slots per image, poolers 7 and 14, 256 FPN channels in bfloat16,
channels-last, 100 ground-truth slots), with the kernel replaced by a stand-in: when the
launcher launches it, the stand-in hands the launch's arguments to triton.compile for each
target architecture, as JITFunction.run would before it compiles (its binder and
`_pack_args`: if this script fails in the stand-in itself, a Triton upgrade moved those
launch internals, not necessarily a kernel). Nothing runs; no GPU is needed.

Prints one line per (kernel, case, architecture): the kernel, the case, the architecture, the
cubin's size in bytes, the bytes of registers spilled (stores plus loads, from ptxas -v), the
PTX's count of fused multiply-adds (`fma.`) and of correctly rounded float32 divisions
(`div.rn.f32`). Exits 1 if a launch does not compile, a kernel spills registers (local
memory in the hot loop), or an exact kernel (NMS and matching: their IoUs must round as
torch's, see ops/match_triton.py) holds an FMA or no correctly rounded division.

Compiles into a fresh Triton cache each run (a cached kernel has no ptxas report to read).
"""

import argparse
import contextlib
import functools
import importlib
import io
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Callable

import torch

ARCHS = (90, 80)  # H100 (sm_90), A100 (sm_80)
# The kernels whose IoUs must round as torch's: no FMA, IEEE division.
EXACT = ("_greedy_nms_kernel", "_best_match_kernel", "_at_gt_best_kernel")

# The recipe's sizes (see the module docstring).
IMAGES = 8
CANVAS = (800, 1344)
LEVELS = 5  # RPN levels P2..P6
RPN_TOPK = {"train": 2000, "test": 1000}
RPN_KEEP = 1000
RPN_NMS = 0.7
BOX_NMS = 0.5
DETECTIONS = 100
GT_SLOTS = 100
ANCHORS_PER_PIXEL = 3
ROI_STRIDES = (4, 8, 16, 32)  # ROIAlign levels P2..P5
CHANNELS = 256
ROIS = {"box-head": (512, 7), "mask-head": (128, 14)}  # per image, pooler side


def _nms_cases(ops) -> dict[str, Callable[[], object]]:
    from maskrcnn.model.roi_heads import MAX_NMS_CANDIDATES  # noqa: PLC0415

    def nms(rows: int, k: int, threshold: float, keep: int) -> None:
        ops.greedy_nms_triton(torch.zeros(rows, k, 4), torch.zeros(rows, k, dtype=torch.int64),
                              torch.full((rows,), k), threshold, keep)

    # The RPN's per-level NMS is one call of LEVELS x IMAGES rows (ops/proposals.py).
    return {f"rpn-{stage}": functools.partial(nms, LEVELS * IMAGES, k, RPN_NMS, RPN_KEEP)
            for stage, k in RPN_TOPK.items()} | {
        "box-head": functools.partial(nms, IMAGES, MAX_NMS_CANDIDATES, BOX_NMS, DETECTIONS)}


def _match_cases(ops) -> dict[str, Callable[[], object]]:
    h, w = CANVAS
    anchors = sum(-(-h // (4 << level)) * -(-w // (4 << level)) * ANCHORS_PER_PIXEL
                  for level in range(LEVELS))  # 268,569
    gt = torch.zeros(IMAGES, GT_SLOTS, 4)
    gt_valid = torch.ones(IMAGES, GT_SLOTS, dtype=torch.bool)
    candidates = RPN_KEEP + GT_SLOTS  # the RoI heads match proposals and ground truth

    def rpn() -> None:
        ops.match_triton(torch.zeros(anchors, 4), torch.ones(anchors, dtype=torch.bool), gt,
                         gt_valid, True)

    def roi_heads() -> None:
        ops.match_triton(torch.zeros(IMAGES, candidates, 4),
                         torch.ones(IMAGES, candidates, dtype=torch.bool), gt, gt_valid, False)

    return {"rpn": rpn, "roi-heads": roi_heads}


def _roi_align_cases(ops) -> dict[str, Callable[[], object]]:
    h, w = CANVAS
    sizes = [(-(-h // s), -(-w // s)) for s in ROI_STRIDES]
    scales = [1.0 / s for s in ROI_STRIDES]

    def pool(per_image: int, side: int) -> None:
        r = IMAGES * per_image
        features = [torch.empty(IMAGES, CHANNELS, fh, fw, dtype=torch.bfloat16).to(
            memory_format=torch.channels_last) for fh, fw in sizes]
        rois, levels = torch.zeros(r, 5), torch.zeros(r, dtype=torch.int64)
        ops.roi_align_levels_triton(features, rois, levels, side, scales, 2, True)
        ops.roi_align_levels_triton_backward(
            torch.empty(r, CHANNELS, side, side, dtype=torch.bfloat16), rois, levels, IMAGES,
            [fh for fh, _ in sizes], [fw for _, fw in sizes], scales, 2, True)

    return {case: functools.partial(pool, n, p) for case, (n, p) in ROIS.items()}


# Module short name -> (module, its kernels, its cases).
MODULES = {
    "nms": ("maskrcnn.ops.nms_triton", ["_greedy_nms_kernel"], _nms_cases),
    "match": ("maskrcnn.ops.match_triton", ["_best_match_kernel", "_at_gt_best_kernel"],
              _match_cases),
    "roi_align": ("maskrcnn.ops.roi_align_triton",
                  ["_roi_align_forward_kernel", "_roi_align_backward_kernel"], _roi_align_cases),
}


class _Compiler:
    """Stands in for a kernel: `kernel[grid](*args)` compiles it for `target` and records."""

    def __init__(self, kernel, results: list[tuple], spills: dict[str, int]) -> None:
        self.kernel, self.results = kernel, results
        self.spills = spills  # by compiled kernel's hash: a cache hit has no ptxas report
        self.case, self.arch = "", 0

    def __getitem__(self, grid):
        return self.compile

    def compile(self, *args, **kwargs) -> None:
        from triton.backends.compiler import GPUTarget  # noqa: PLC0415
        from triton.compiler import ASTSource, compile, make_backend  # noqa: PLC0415
        from triton.runtime.jit import create_function_from_signature  # noqa: PLC0415

        fn, target = self.kernel, GPUTarget("cuda", self.arch, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, debug=False, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(
            backend, {"debug": False, **kwargs}, bound, specialization, options)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # ptxas -v's report (knobs.nvidia.dump_ptxas_log)
            compiled = compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                               options=options.__dict__)
        spills = [int(stores) + int(loads) for stores, loads in re.findall(
            r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())]
        if spills:
            self.spills[compiled.hash] = sum(spills)
        elif compiled.hash not in self.spills:
            raise RuntimeError(f"no spill report in ptxas's output:\n{log.getvalue()}")
        ptx = compiled.asm["ptx"]
        self.results.append((fn.__name__, self.case, f"sm_{self.arch}", len(compiled.asm["cubin"]),
                             self.spills[compiled.hash], len(re.findall(r"\bfma\.", ptx)),
                             len(re.findall(r"\bdiv\.rn\.f32", ptx))))


def compile_all(names: list[str], archs: list[int]) -> bool:
    """Compiles the cases of the named modules for each arch, printing one line per compiled
    kernel (and failures to stderr). Returns whether all compiled, without spills, and the
    exact kernels exactly."""
    import triton  # noqa: PLC0415

    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.cache.dir = tempfile.mkdtemp(prefix="triton-compile-")
    ok = True
    print(f"# Triton {triton.__version__}: kernel case arch cubin_bytes spill_bytes fma "
          "div.rn.f32", flush=True)
    for name in names:
        module_name, kernels, cases = MODULES[name]
        ops = importlib.import_module(module_name)
        results: list[tuple] = []
        spills: dict[str, int] = {}
        compilers = [_Compiler(getattr(ops, kernel), results, spills) for kernel in kernels]
        originals = {kernel: getattr(ops, kernel) for kernel in kernels}
        for kernel, compiler in zip(kernels, compilers, strict=True):
            setattr(ops, kernel, compiler)
        try:
            for case, launch in cases(ops).items():
                for arch in archs:
                    for compiler in compilers:
                        compiler.case, compiler.arch = case, arch
                    done = len(results)
                    try:
                        launch()
                    except Exception:  # noqa: BLE001 (reported, the other cases still run)
                        ok = False
                        print(f"FAILED {name} {case} sm_{arch}:\n{traceback.format_exc()}",
                              file=sys.stderr, flush=True)
                    for row in results[done:]:
                        print(*row, flush=True)
                        kernel, _, _, _, spills, fma, div_rn = row
                        if spills or (kernel in EXACT and (fma or not div_rn)):
                            ok = False
                            print(f"FAILED {kernel} {case} sm_{arch}: {spills} bytes spilled, "
                                  f"{fma} FMA, {div_rn} div.rn.f32", file=sys.stderr, flush=True)
        finally:
            for kernel, original in originals.items():
                setattr(ops, kernel, original)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS),
                        help="compute capabilities, as 90 for sm_90")
    parser.add_argument("--only", nargs="+", choices=list(MODULES), default=list(MODULES),
                        help="these kernel modules only")
    args = parser.parse_args(argv)
    # Triton decides at decoration time whether a kernel is interpreted: off before the kernel
    # modules are imported (compile_all imports them).
    os.environ.pop("TRITON_INTERPRET", None)
    return 0 if compile_all(args.only, args.arch) else 1


if __name__ == "__main__":
    sys.exit(main())
