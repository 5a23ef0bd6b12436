"""Compiling our Triton kernels for a GPU on a machine without one (tests only).

`compile_for_gpu(module, kernels, calls)` runs, in a fresh process without TRITON_INTERPRET,
a script that replaces each named kernel of `module` by a stand-in: when the module's launcher
launches it, the stand-in hands the launch's arguments to triton.compile for an sm_90 target
(the binder and `_pack_args` are the steps of triton's JITFunction.run before it compiles)
and prints one line per kernel: its name, the cubin's size in bytes, and the PTX's count of
fused multiply-adds (`fma.`) and of correctly rounded float32 divisions (`div.rn.f32`).
`calls` is the code that calls the launchers. If a test fails in this helper itself, a
Triton upgrade moved the launch internals it uses, not necessarily a kernel.
"""

import os
import subprocess
import sys

from tests.tiny import REPO

_PREAMBLE = """
import re

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile, make_backend
from triton.runtime.jit import create_function_from_signature

import {module} as ops

TARGET = GPUTarget("cuda", 90, 32)


class Compiler:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def compile_for_target(*args, **kwargs):
            fn, backend = self.kernel, make_backend(TARGET)
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound, specialization, options = binder(*args, debug=False, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(
                backend, {{"debug": False, **kwargs}}, bound, specialization, options)
            compiled = compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET,
                               options=options.__dict__)
            ptx = compiled.asm["ptx"]
            print(fn.__name__, len(compiled.asm["cubin"]),
                  len(re.findall(r"\\bfma\\.", ptx)), len(re.findall(r"\\bdiv\\.rn\\.f32", ptx)))
        return compile_for_target

"""


def compile_for_gpu(module: str, kernels: list[str], calls: str) -> list[tuple[str, int, int,
                                                                              int]]:
    """(kernel name, cubin bytes, fma count, div.rn.f32 count) per compiled launch."""
    script = (_PREAMBLE.format(module=module)
              + "".join(f"ops.{k} = Compiler(ops.{k})\n" for k in kernels) + calls)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return [(name, int(size), int(fma), int(div)) for name, size, fma, div in
            (line.split() for line in result.stdout.splitlines())]
