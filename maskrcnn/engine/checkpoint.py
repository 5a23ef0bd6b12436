"""Checkpoints: written atomically, checked when read, found again by step.

A checkpoint is one file `<output_dir>/checkpoints/step_<step>.pt` holding everything a run
needs to continue exactly where it stopped: model, optimiser, LR schedule, loss scaler, epoch
and step (which is also the sampler's position), RNG states, the resolved config and the class
names. It is written to a temporary file in the same folder, flushed to disk and renamed over
the final name, so a crash or a failed write (a full disk) leaves the previous checkpoints
intact and never a half-written file; a failed write removes its temporary file and stops the
run with one line (CheckpointError).

Reading checks the file first: torch.save writes a zip archive with a CRC32 of every record,
which torch.load does not verify (a garbled tensor loads as different numbers), so `load`
verifies them. `load_latest` is what --resume reads: the newest checkpoint that can be read,
saying which newer ones it skipped and why (`load_latest_on_rank_0` for every rank of a job).

`training_state` is what the trainer writes; `restore_training_state` puts it back into a
TrainStep (also at another global batch); `load_model_state` puts a checkpoint's weights into
a model (eval, predict). Each stops with one line when the checkpoint does not fit.
`read_init_weights` and `load_init_weights` start a new run from another run's weights
(--init_from: our checkpoint or a torchvision maskrcnn_resnet50_fpn state dict), taking
whatever fits.
"""

import os
import pickle
import random
import re
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskrcnn.config import Config, to_text
from maskrcnn.engine import distributed
from maskrcnn.engine.step import TrainStep, unwrap
from maskrcnn.model.convert import CLASS_LAYERS, convert_torchvision_maskrcnn
from maskrcnn.model.frozen_bn import FrozenBatchNorm2d

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d+)\.pt$")
# What every reader of a checkpoint needs (eval and predict: the model and its config).
REQUIRED_KEYS = ("model", "config", "step")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written, or does not fit the model."""


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


class _Writer:
    """A file's write and flush, keeping the OSError a write raised: torch.save turns it into a
    RuntimeError without the reason ("unexpected pos 704 vs 598" for a full disk)."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def save_atomic(state: dict[str, Any], path: Path) -> Path:
    """torch.save to a temporary file next to path, flushed to disk, then renamed onto it.

    A failure (no space left, no permission, a folder in the way) removes the temporary file,
    leaves whatever was at path before, and raises CheckpointError naming path and the reason.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            writer = _Writer(f)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        # The rename itself on disk too, so that a power loss cannot bring the old state back.
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except (OSError, RuntimeError) as error:
        if writer is not None:  # the temporary file is ours (not, e.g., a folder in the way)
            tmp.unlink(missing_ok=True)
        reason = writer.error if writer is not None and writer.error else error
        raise CheckpointError(f"cannot write checkpoint {path}: {_first_line(reason)}; "
                              "the checkpoints written before are intact") from None
    return path


def checkpoints(output_dir: Path) -> list[Path]:
    """The checkpoints in output_dir, newest (highest step) first."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt")
             if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint with the highest step in output_dir, or None."""
    found = checkpoints(output_dir)
    return found[0] if found else None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _problem(path: Path) -> str | None:
    """Why the file at path is not an intact zip archive, or None if it is."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every record and compares its CRC32
    except zipfile.BadZipFile as error:  # also what a truncated archive raises
        return f"truncated or not a checkpoint ({error})"
    except (OSError, EOFError, ValueError, RuntimeError) as error:
        return _first_line(error)
    return f"corrupted (record {bad} fails its CRC check)" if bad else None


def load(path: Path) -> dict[str, Any]:
    """Reads a checkpoint onto the CPU, or stops with one line naming the file and the reason
    (a truncated, garbled or foreign file; the whole file is read twice, once to check it)."""
    problem = _problem(path)
    if problem is None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
            problem = _first_line(error)
        else:
            if isinstance(state, dict) and all(key in state for key in REQUIRED_KEYS):
                return state
            problem = "not a checkpoint of maskrcnn-train (no " + ", ".join(
                f"'{key}'" for key in REQUIRED_KEYS) + ")"
    raise CheckpointError(f"cannot read checkpoint {path}: {problem}")


def load_latest(output_dir: Path, log: Callable[[str], None]) -> tuple[Path, dict] | None:
    """The newest checkpoint in output_dir that can be read, and its state (what --resume
    continues from); None when there is no checkpoint.

    Each newer one that cannot be read is skipped with one line (log); the run then goes on
    from an older one and writes the skipped steps again. When there are checkpoints but none
    can be read, CheckpointError: the run stops rather than train from scratch and write over
    them (moving them away is the way to start again).
    """
    found = checkpoints(output_dir)
    for path in found:
        try:
            return path, load(path)
        except CheckpointError as error:
            log(f"--resume: {error}; skipping it")
    if found:
        raise CheckpointError(
            f"--resume: none of the {len(found)} checkpoint(s) in {found[0].parent} can be read "
            "(each named above); stopping rather than training from scratch over them (move "
            "them away to start again)")
    return None


def load_latest_on_rank_0(output_dir: Path, log: Callable[[str], None]
                          ) -> tuple[Path, dict] | None:
    """load_latest on rank 0, sent to every rank (so only rank 0's node needs output_dir);
    its CheckpointError, if any, is raised on every rank. Every rank calls this."""
    found: tuple[Path, dict] | str | None = None
    if distributed.rank() == 0:
        try:
            found = load_latest(output_dir, log)
        except CheckpointError as error:
            found = str(error)
    found = distributed.broadcast_from_main(found, "sending the checkpoint from rank 0")
    if isinstance(found, str):
        raise CheckpointError(found)
    return found


def training_state(train_step: TrainStep, step: int, world_size: int,
                   category_ids: Sequence[int], class_names: Sequence[str]) -> dict[str, Any]:
    """What a checkpoint of a run at `step` (steps done) holds; see restore_training_state."""
    schedule = train_step.schedule
    return {
        "model": unwrap(train_step.model).state_dict(),
        "optimizer": train_step.optimizer.state_dict(),
        "lr": train_step.lr.state_dict(),
        "scaler": train_step.scaler.state_dict(),
        "step": step,
        "epoch": schedule.epoch_of(step),
        # What a run with another number of processes needs to find its place (resume).
        "world_size": world_size,
        "global_batch": schedule.global_batch,
        "steps_per_epoch": schedule.steps_per_epoch,
        "rng": rng_states(),
        "config": to_text(train_step.config),
        "category_ids": list(category_ids),
        "class_names": list(class_names),
    }


def restore_training_state(train_step: TrainStep, state: dict[str, Any], path: Path,
                           log: Callable[[str], None]) -> int:
    """Puts a checkpoint's model, momentum, loss scaler and RNG states into train_step and
    returns the step of train_step's schedule to continue from: the checkpoint's with the
    same global batch; with another (another number of processes), the same epoch and, within
    it, as many whole global batches as the images the checkpoint had seen in it fill (a
    line says so). The LR follows train_step's schedule from there (its base LR). A config
    that differs from the checkpoint's is a warning; a checkpoint that does not fit the
    model, CheckpointError."""
    schedule = train_step.schedule
    try:
        unwrap(train_step.model).load_state_dict(state["model"])
        train_step.optimizer.load_state_dict(state["optimizer"])
        train_step.scaler.load_state_dict(state["scaler"])
        same_batch = state["global_batch"] == schedule.global_batch
        step = (state["step"] if same_batch else
                schedule.equivalent_step(state["step"], state["global_batch"],
                                         state["steps_per_epoch"]))
        train_step.lr.set_step(step)
        same_config = written_with(state, train_step.config)
    except (KeyError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} does not fit this config: "
                              f"{str(error).splitlines()[0]}") from None
    set_rng_states(state["rng"])
    if not same_config:
        log(f"warning: the config differs from the one {path} was written with")
    if not same_batch:
        log(f"{path} was written at step {state['step']} of global batch "
            f"{state['global_batch']} ({state['world_size']} process(es)); this run has "
            f"global batch {schedule.global_batch}: continuing at step {step}, "
            f"LR {train_step.lr.current():.3g}")
    return step


def load_model_state(model: torch.nn.Module, weights: dict, source) -> None:
    """Loads a checkpoint's model weights (its state["model"]) into model (not wrapped in
    DDP or torch.compile), or stops with one line naming the checkpoint (source)."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {source} does not fit this config's model: "
                              f"{str(error).splitlines()[1].strip()}") from None


@dataclass(frozen=True)
class InitWeights:
    """The weights a new run starts from (--init_from), in our MaskRCNN's names (frozen batch
    norms possibly in torchvision's four-tensor form, which FrozenBatchNorm2d folds on load).
    what: what the file is, for the log line."""

    path: Path
    what: str
    state: dict[str, torch.Tensor]


# A key only torchvision's maskrcnn_resnet50_fpn has (ours: roi_heads.box_head.cls_score).
_TORCHVISION_KEY = "roi_heads.box_predictor.cls_score.weight"


def read_init_weights(path: Path) -> InitWeights:
    """Reads --init_from's file: a checkpoint of maskrcnn-train, a torchvision
    maskrcnn_resnet50_fpn state dict (as its weights API or torch.save(model.state_dict())
    writes it, also inside torchvision's references' {"model": ...} checkpoints), or a state
    dict of our MaskRCNN. A missing, damaged or foreign file stops with one line
    (CheckpointError)."""
    path = Path(path)
    where = f"--init_from={path}"
    if not path.is_file():
        raise CheckpointError(f"{where}: no such file")
    problem = _problem(path) if zipfile.is_zipfile(path) else None
    if problem is not None:
        raise CheckpointError(f"{where}: {problem}")
    try:
        found = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Not weights-only: one of our checkpoints (it holds RNG states), or not a torch file.
        try:
            found = load(path)
        except CheckpointError:
            raise CheckpointError(f"{where}: not a torch checkpoint or state dict file") from None
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(f"{where}: cannot read it: {_first_line(error)}") from None
    if isinstance(found, dict) and all(key in found for key in REQUIRED_KEYS):
        return InitWeights(path, f"a checkpoint of maskrcnn-train, step {found['step']}",
                           found["model"])
    if isinstance(found, dict) and isinstance(found.get("model"), dict):
        found = found["model"]  # torchvision's references save {"model": ..., "optimizer": ...}
    if not (isinstance(found, dict) and found
            and all(isinstance(v, torch.Tensor) for v in found.values())):
        raise CheckpointError(f"{where}: not a checkpoint of maskrcnn-train or a state dict "
                              "of tensors")
    if _TORCHVISION_KEY not in found:
        return InitWeights(path, "a state dict of our MaskRCNN", found)
    try:
        converted = convert_torchvision_maskrcnn(found)
    except ValueError as error:
        raise CheckpointError(f"{where}: {error}") from None
    return InitWeights(path, "a torchvision maskrcnn_resnet50_fpn state dict", converted)


def _loadable_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """Every key model.load_state_dict takes, with its shape: the state dict's, and each
    FrozenBatchNorm2d's torchvision form (weight, running_mean, running_var beside bias)."""
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, FrozenBatchNorm2d):
            for leaf in ("weight", "running_mean", "running_var"):
                shapes[f"{name}.{leaf}"] = module.scale.shape
    return shapes


def _modules(keys: Iterable[str], most: int = 8) -> str:
    """The modules (key without its leaf) of keys, in order; with more than `most`, their
    first two name parts with a count of tensors ("backbone.body (60 tensors)")."""
    keys = list(keys)
    modules = list(dict.fromkeys(key.rsplit(".", 1)[0] for key in keys))
    if len(modules) <= most:
        return ", ".join(modules)
    counts: dict[str, int] = {}
    for key in keys:
        prefix = ".".join(key.split(".")[:2])
        counts[prefix] = counts.get(prefix, 0) + 1
    return ", ".join(f"{prefix} ({n} tensors)" for prefix, n in counts.items())


def load_init_weights(model: torch.nn.Module, init: InitWeights) -> str:
    """Loads every tensor of init whose name and shape fit model (not wrapped in DDP or
    torch.compile); every other tensor of the model keeps its fresh initialisation (the class
    layers, CLASS_LAYERS, when the number of classes differs). Returns the one line that says
    what was loaded and what not: counts, the modules initialised afresh, the file's tensors
    that have no place in the model."""
    shapes = _loadable_shapes(model)
    fitting = {key: value for key, value in init.state.items()
               if key in shapes and value.shape == shapes[key]}
    unused = [key for key in init.state if key not in shapes]
    missing, _ = model.load_state_dict(fitting, strict=False)
    total = len(model.state_dict())
    line = (f"--init_from={init.path} ({init.what}): loaded {total - len(missing)} of the "
            f"model's {total} tensors")
    if missing:
        line += f"; initialised afresh: {_modules(missing)}"
        cls = f"{CLASS_LAYERS[0]}bias"
        if cls in missing and cls in init.state:
            line += (f" (the file has {init.state[cls].shape[0] - 1} classes, the model "
                     f"{shapes[cls][0] - 1})")
    if unused:
        line += f"; not in the model: {_modules(unused)}"
    return line


def written_with(state: dict[str, Any], config: Config) -> bool:
    """Whether the checkpoint was written with this config, but for run.num_gpus (the number
    of processes that wrote it, state["world_size"], which may differ from this run's)."""
    fitted = Config()
    fitted.CopyFrom(config)
    fitted.run.num_gpus = state["world_size"]
    return state["config"] == to_text(fitted)


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
