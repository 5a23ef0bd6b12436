"""Checkpoints: written atomically, found again by step.

A checkpoint is one file `<output_dir>/checkpoints/step_<step>.pt` holding everything a run
needs to continue exactly where it stopped: model, optimiser, LR schedule, loss scaler, epoch
and step (which is also the sampler's position), RNG states, the resolved config and the class
names. It is written to a temporary file in the same folder and renamed over the final name, so
a crash while writing leaves the previous checkpoints intact and never a half-written file.
"""

import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def save_atomic(state: dict[str, Any], path: Path) -> Path:
    """torch.save to a temporary file next to path, flushed to disk, then renamed onto it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint with the highest step in output_dir, or None."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt")
             if (m := _NAME.match(p.name))]
    return max(found)[1] if found else None


def load(path: Path) -> dict[str, Any]:
    """Reads a checkpoint onto the CPU, or stops with one line naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None


def rng_states() -> dict[str, Any]:
    """Every random generator a training step draws from. On CUDA that is the current
    device's (each rank's own GPU; identical on every rank, so rank 0's fits any of them)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if isinstance(states["cuda"], torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
