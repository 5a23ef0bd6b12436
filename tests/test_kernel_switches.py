"""run.kernels as the commands honour it: train, eval, predict and the benchmark all build
their Runtime from the config's switches, say what each op runs, and refuse a kernel that
cannot run here with one line.

A CPU has no Triton kernel to run except under Triton's interpreter (TRITON_INTERPRET=1, which
tests/conftest.py sets): the training run below uses the Triton anchor matching interpreted,
and the other commands, run without the interpreter, must refuse that choice in its
checkpoint's config (proving they read it) and accept it switched to TORCH by --set.
"""

import os
import subprocess
import sys

import pytest

from tests.tiny import REPO, tiny_flags

SHORT = ("solver { epochs: 1 images_per_epoch: 4 warmup_steps: 1 lr_decay_epochs: [1] } "
         "run { kernels { match: TRITON } }")
REFUSED = ("error: run.kernels.match: TRITON needs a CUDA GPU with Triton installed; this run "
           "is on cpu (use AUTO or TORCH)")


def _run(module: str, *flags: str, cache, interpret: bool):
    env = {**os.environ, "MASKRCNN_CACHE": str(cache), "CUDA_VISIBLE_DEVICES": "",
           "TRITON_INTERPRET": "1" if interpret else "0"}
    return subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    """(output dir, stdout) of a 2-step tiny run with the Triton anchor matching."""
    out = tmp_path_factory.mktemp("switched")
    result = _run("maskrcnn.train", *tiny_flags(out, SHORT), cache=cache, interpret=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_train_runs_the_chosen_kernel_and_says_so(trained):
    """If this fails, maskrcnn-train ignores run.kernels, or its first lines and the resolved
    config no longer say what each op ran on this device."""
    out, stdout = trained
    assert "on cpu: nms per_cell, roi_align gather, match triton, cuda graph off" in stdout
    written = (out / "config.pbtxt").read_text()
    assert "match: TRITON" in written  # the choice itself, portable to another device
    assert written.endswith("# this run: nms per_cell, roi_align gather, match triton, "
                            "cuda graph off\n")


@pytest.mark.parametrize("module, flags", [
    ("maskrcnn.eval", []),
    ("maskrcnn.predict", ["--input={images}"]),
])
def test_eval_and_predict_honour_the_checkpoints_switches(trained, cache, tmp_path, module,
                                                          flags):
    """If this fails, eval or predict builds its model with the device's defaults instead of
    the config's run.kernels (refusing TRITON without Triton proves the config was read), or
    --set cannot switch a kernel for them."""
    out, _ = trained
    checkpoint = out / "checkpoints" / "step_00000002.pt"
    images = next(cache.glob("synthetic-*")) / "val2017"
    args = [f"--checkpoint={checkpoint}", f"--output_dir={tmp_path}",
            *(f.format(images=images) for f in flags)]
    refused = _run(module, *args, cache=cache, interpret=False)
    assert refused.returncode == 2 and refused.stderr.strip() == REFUSED
    switched = _run(module, *args, "--set=run { kernels { match: TORCH } }", cache=cache,
                    interpret=False)
    assert switched.returncode == 0, switched.stderr[-3000:]
    assert "on cpu: nms per_cell, roi_align gather, match tiled, cuda graph off" in \
        switched.stdout


def test_benchmark_flags_are_the_same_setting(cache):
    """If this fails, --match is no longer run.kernels.match (the benchmark would time other
    kernels than training runs), or a bad choice is not refused."""
    refused = _run("maskrcnn.benchmark", "--config=shapes", "--device=cpu", "--match=triton",
                   "--steps=1", "--warmup=0", cache=cache, interpret=False)
    assert refused.returncode == 2 and refused.stderr.strip() == REFUSED
    bad = _run("maskrcnn.benchmark", "--nms=fast", cache=cache, interpret=False)
    assert bad.returncode == 1 and "--nms" in bad.stderr
