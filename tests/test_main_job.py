"""A shorter run of the README's main job: the shapes config, trained and evaluated on the
synthetic data exactly as the README's first command does, for fewer epochs."""

import re

from tests.tiny import run_module

# 3 of the 20 epochs (about 190 steps), LR decayed for the last one.
SHORTER = "solver { epochs: 3 lr_decay_epochs: [2] }"
# Measured on this machine (2026-11-26): box AP 0.030, mask AP 0.031 (the CPU run is
# deterministic; the conv box head starts slowly, then overtakes: 0.574 / 0.523 after all 20
# epochs); the thresholds leave a 2x margin. A model that has not learned scores 0.000.
MIN_BOX_AP, MIN_MASK_AP = 0.015, 0.015


def test_shorter_main_job_learns(tmp_path, cache):
    """If this fails, training on the synthetic data no longer learns (a broken loss, target,
    schedule or evaluation), or the main job's path broke."""
    out = tmp_path / "run"
    result = run_module("maskrcnn.train", "--config=shapes", f"--output_dir={out}",
                        f"--set={SHORTER}", cache_dir=cache, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"box AP ([\d.]+), mask AP ([\d.]+)", result.stdout)
    box_ap, mask_ap = float(found.group(1)), float(found.group(2))
    assert box_ap >= MIN_BOX_AP and mask_ap >= MIN_MASK_AP, result.stdout[-2000:]
    assert (out / "predictions.png").is_file()
