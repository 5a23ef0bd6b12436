"""A tiny run configuration for tests that train: small images, model and schedule."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "model { backbone { depth: 18 norm: GROUP_NORM frozen_stages: 0 } fpn_channels: 32 "
    "rpn { batch_size_per_image: 64 pre_nms_topk_train: 200 post_nms_topk_train: 100 "
    "pre_nms_topk_test: 100 post_nms_topk_test: 50 } "
    "roi_heads { box_head_dim: 64 mask_head_channels: 16 batch_size_per_image: 32 "
    "max_fg_masks_per_image: 8 detections_per_image: 20 head_group_norm: false } }",
    "data { synthetic { num_train: 16 num_val: 4 min_side: 96 max_side: 128 } short_side: 96 "
    "max_long_side: 128 canvas { height: 96 width: 128 } canvas { height: 128 width: 96 } "
    "max_instances: 8 gt_mask_size: 16 num_workers: 0 }",
    "solver { epochs: 2 images_per_epoch: 8 warmup_steps: 2 lr_decay_epochs: [1] }",
    "run { images_per_gpu: 2 log_period_steps: 2 eval_period_epochs: 0 "
    "checkpoint_period_epochs: 0 }",
]


def run_module(module: str, *flags: str, cache_dir: Path, timeout: int = 600):
    """Runs `python -m module flags` as a user would, on the CPU (the tests check CPU
    behaviour; --device=auto would pick a GPU where there is one); returns the
    CompletedProcess."""
    env = {**os.environ, "MASKRCNN_CACHE": str(cache_dir), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def tiny_flags(output_dir: Path, *extra: str) -> list[str]:
    return [f"--output_dir={output_dir}", *(f"--set={s}" for s in [*TINY, *extra])]


def run_tiny_benchmark(*flags: str) -> subprocess.CompletedProcess:
    """maskrcnn-benchmark on the CPU at TINY's sizes. One thread: the 2-core machine is shared,
    and oversubscribed OpenMP threads can slow a run tenfold; the report's consistency does
    not depend on the thread count."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "maskrcnn.benchmark", "--config=shapes",
                           *(f"--set={s}" for s in TINY), "--device=cpu", *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
