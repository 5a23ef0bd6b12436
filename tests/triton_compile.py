"""Compiling our Triton kernels for a GPU on a machine without one (tests only).

`compile_for_gpu(module)` runs tools/compile_kernels.py (see there) for one kernel module, in a
fresh process without TRITON_INTERPRET, and returns its lines: one per compiled (kernel, case
of the COCO recipe's sizes, architecture), sm_90 only unless told. .ci/run compiles them all
for sm_90 and sm_80 with each Triton we support.
"""

import os
import subprocess
import sys

from tests.tiny import REPO

# kernel, case, arch ("sm_90"), cubin bytes, spilled bytes, fma count, div.rn.f32 count
Compiled = tuple[str, str, str, int, int, int, int]


def compile_for_gpu(module: str, archs: tuple[int, ...] = (90,)) -> list[Compiled]:
    """The compiled kernels of `module` ("nms", "match" or "roi_align"); fails the test when
    the script fails (a launch does not compile, a kernel spills, an exact kernel has FMA)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "tools/compile_kernels.py", "--only", module,
                             "--arch", *map(str, archs)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return [(kernel, case, arch, int(cubin), int(spills), int(fma), int(div))
            for kernel, case, arch, cubin, spills, fma, div in
            (line.split() for line in result.stdout.splitlines() if not line.startswith("#"))]
