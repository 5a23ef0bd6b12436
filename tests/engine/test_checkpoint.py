"""Checkpoints: atomic writes that fail cleanly, reads that catch damaged files, and --resume
falling back past them."""

import errno
import io
import os
import shutil

import pytest
import torch

from maskrcnn.engine import checkpoint as ckpt
from tests.tiny import run_module, tiny_flags

# The command-line runs: 1 epoch of 2 steps, a checkpoint after each.
SHORT = ["solver { epochs: 1 images_per_epoch: 4 warmup_steps: 1 lr_decay_epochs: [1] }",
         "run { checkpoint_period_steps: 1 }"]


def _state(step: int) -> dict:
    torch.manual_seed(step)
    return {"model": {"w": torch.randn(64, 64)}, "config": "", "step": step}


def _write(output_dir, step: int):
    return ckpt.save_atomic(_state(step), ckpt.checkpoint_path(output_dir, step))


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble_tensor(path, tensor: torch.Tensor) -> None:
    """Flips bytes inside the stored data of `tensor` (a zip record; torch.load alone would
    read the flipped numbers without noticing)."""
    data = bytearray(path.read_bytes())
    start = data.find(tensor.numpy().tobytes())
    assert start > 0
    for i in range(start + 100, start + 110):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """If this fails, a crash while writing a checkpoint can destroy the previous one, or the
    failure is not a CheckpointError (one line) naming the file."""
    path = _write(tmp_path, 1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(ckpt.CheckpointError, match=r"cannot write checkpoint .*step_00000001"
                       r"\.pt: disk full; the checkpoints written before are intact"):
        ckpt.save_atomic({"x": torch.zeros(2)}, path)
    assert torch.equal(ckpt.load(path)["model"]["w"], _state(1)["model"]["w"])
    assert ckpt.latest_checkpoint(tmp_path) == path


class _FullDisk(io.FileIO):
    """A file on a disk with ROOM bytes free: a write past them fails as on a full disk."""

    ROOM = 5000

    def write(self, data) -> int:
        if self.tell() + len(data) > self.ROOM:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(
        tmp_path, monkeypatch):
    """If this fails, a checkpoint write that runs out of space damages the previous
    checkpoint, leaves a half-written temporary file behind, or reports torch's reason-less
    error ("unexpected pos ...") instead of the disk being full."""
    previous = _write(tmp_path, 1)
    monkeypatch.setattr(ckpt, "open", lambda path, mode: _FullDisk(path, mode), raising=False)
    path = ckpt.checkpoint_path(tmp_path, 2)
    with pytest.raises(ckpt.CheckpointError, match=rf"cannot write checkpoint {path}: \[Errno "
                       rf"{errno.ENOSPC}\] No space left on device; the checkpoints written "
                       "before are intact"):
        ckpt.save_atomic(_state(2), path)
    assert sorted(p.name for p in path.parent.iterdir()) == [previous.name]
    assert ckpt.load(previous)["step"] == 1


NOT_A_ZIP = r"truncated or not a checkpoint \(File is not a zip file\)"
REASONS = {
    "truncated": NOT_A_ZIP,
    "garbled": r"corrupted \(record .*/data/0 fails its CRC check\)",
    "empty": NOT_A_ZIP,
    "text": NOT_A_ZIP,
    "foreign": r"not a checkpoint of maskrcnn-train \(no 'model', 'config', 'step'\)",
}


@pytest.mark.parametrize("damage", REASONS)
def test_a_damaged_checkpoint_is_one_line_with_the_reason(tmp_path, damage):
    """If this fails, reading a truncated, garbled or foreign file either loads it (a garbled
    tensor silently becomes other numbers) or fails with a traceback instead of one line
    naming the file and what is wrong with it."""
    path = _write(tmp_path, 1)
    if damage == "truncated":
        _truncate(path)
    elif damage == "garbled":
        _garble_tensor(path, _state(1)["model"]["w"])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":
        path.write_text("not a checkpoint")
    else:
        path.write_bytes(_saved({"weights": torch.ones(3)}))
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.load(path)
    assert "\n" not in str(error.value)
    assert error.match(rf"^cannot read checkpoint {path}: {REASONS[damage]}$")


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_load_latest_skips_an_unreadable_newest_checkpoint(tmp_path, damage):
    """If this fails, --resume stops at (or trains on from) a damaged newest checkpoint
    instead of falling back to the one before it and saying which it skipped and why."""
    older, newest = _write(tmp_path, 1), _write(tmp_path, 2)
    if damage == "truncated":
        _truncate(newest)
    else:
        _garble_tensor(newest, _state(2)["model"]["w"])
    lines = []
    path, state = ckpt.load_latest(tmp_path, lines.append)
    assert path == older and state["step"] == 1
    assert len(lines) == 1 and lines[0].startswith(f"--resume: cannot read checkpoint {newest}: ")
    assert lines[0].endswith("; skipping it")


def test_load_latest_stops_when_no_checkpoint_can_be_read(tmp_path):
    """If this fails, --resume with only unreadable checkpoints silently starts from scratch
    (and later writes over them) instead of stopping with one line; or an empty output dir
    is not a fresh start."""
    assert ckpt.load_latest(tmp_path, print) is None
    older, newest = _write(tmp_path, 1), _write(tmp_path, 2)
    _truncate(newest)
    older.write_text("garbage")
    lines = []
    with pytest.raises(ckpt.CheckpointError, match=r"--resume: none of the 2 checkpoint\(s\) in "
                       rf"{older.parent} can be read"):
        ckpt.load_latest(tmp_path, lines.append)
    assert [line.split(": ")[1] for line in lines] == [f"cannot read checkpoint {newest}",
                                                       f"cannot read checkpoint {older}"]


# ---------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, cache):
    """The checkpoints folder of a tiny 2-step run with a checkpoint after each step."""
    out = tmp_path_factory.mktemp("two_checkpoints")
    result = run_module("maskrcnn.train", *tiny_flags(out, *SHORT), cache_dir=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in ckpt.checkpoints(out)] == ["step_00000002.pt", "step_00000001.pt"]
    return out / ckpt.CHECKPOINT_DIR


def test_resume_falls_back_past_a_truncated_checkpoint(two_checkpoints, tmp_path, cache):
    """If this fails, `--resume` with a truncated newest checkpoint stops, starts from
    scratch, or falls back without saying which checkpoint it skipped; or the fallback does
    not continue exactly (the step it writes again differs from the original)."""
    shutil.copytree(two_checkpoints, tmp_path / ckpt.CHECKPOINT_DIR)
    newest = tmp_path / ckpt.CHECKPOINT_DIR / "step_00000002.pt"
    _truncate(newest)
    result = run_module("maskrcnn.train", *tiny_flags(tmp_path, *SHORT), "--resume",
                        cache_dir=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = [line for line in result.stdout.splitlines() if "skipping" in line]
    assert skipped == [f"--resume: cannot read checkpoint {newest}: truncated or not a "
                       "checkpoint (File is not a zip file); skipping it"]
    assert f"resumed from {newest.with_name('step_00000001.pt')} at step 1" in result.stdout
    again, original = ckpt.load(newest), ckpt.load(two_checkpoints / newest.name)
    for key, value in original["model"].items():
        assert torch.equal(again["model"][key], value), key


def test_resume_stops_when_no_checkpoint_can_be_read(two_checkpoints, tmp_path, cache):
    """If this fails, `--resume` with only unreadable checkpoints trains from scratch over
    them, ends in a traceback, or does not say in one line why it stopped."""
    folder = tmp_path / ckpt.CHECKPOINT_DIR
    shutil.copytree(two_checkpoints, folder)
    _truncate(folder / "step_00000002.pt")
    (folder / "step_00000001.pt").write_text("garbage")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    result = run_module("maskrcnn.train", *tiny_flags(tmp_path, *SHORT), "--resume",
                        cache_dir=cache)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"error: --resume: none of the 2 checkpoint(s) in {folder} can "
                               "be read")
    assert result.stdout.count("; skipping it") == 2
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_one_line(tmp_path, cache):
    """If this fails, a failed checkpoint write ends the command in a traceback, trains on
    without its checkpoint, or damages the checkpoint before it. The write fails on a folder
    in the way of its temporary file (as root, permissions would not stop it)."""
    folder = tmp_path / ckpt.CHECKPOINT_DIR
    (folder / ".step_00000002.pt.tmp").mkdir(parents=True)
    result = run_module("maskrcnn.train", *tiny_flags(tmp_path, *SHORT), cache_dir=cache)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0] == (f"error: cannot write checkpoint {folder / 'step_00000002.pt'}: "
                        f"[Errno {errno.EISDIR}] Is a directory: "
                        f"'{folder / '.step_00000002.pt.tmp'}'; the checkpoints written before "
                        "are intact")
    assert ckpt.load(folder / "step_00000001.pt")["step"] == 1
    assert ckpt.checkpoints(tmp_path) == [folder / "step_00000001.pt"]


# ---------------------------------------------------------------- --init_from

FOREIGN = {
    "missing": None,
    "garbage": b"not a torch file",
    "truncated": "truncated",
    "not tensors": {"model": 3},
    "torchvision, extra key": "tv-extra",
}


@pytest.fixture(scope="module")
def shapes_tiny(tmp_path_factory):
    """The checked-in shapes-tiny model (5 classes) as a checkpoint of maskrcnn-train."""
    from tests.shapes_checkpoint import write_checkpoint  # noqa: PLC0415

    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "step_1.pt")


def _tiny_model(num_classes: int) -> torch.nn.Module:
    """The shapes-tiny model's architecture with num_classes, freshly initialised."""
    from maskrcnn.model.maskrcnn import build_model  # noqa: PLC0415
    from tests.shapes_checkpoint import config  # noqa: PLC0415

    fitted = config()
    fitted.model.num_classes = num_classes
    torch.manual_seed(1)
    return build_model(fitted)


def test_init_from_loads_what_fits_and_starts_the_class_layers_afresh(shapes_tiny):
    """If this fails, fine-tuning from a checkpoint with 5 classes into a 3-class model either
    fails, loads a tensor of the wrong shape, leaves a fitting one out (e.g. the RPN), touches
    the class layers' fresh initialisation, or the one line miscounts or misnames them."""
    model = _tiny_model(3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    source = torch.load(shapes_tiny, weights_only=False)["model"]
    line = ckpt.load_init_weights(model, ckpt.read_init_weights(shapes_tiny))
    afresh = {f"roi_heads.box_head.{layer}.{leaf}" for layer in ("cls_score", "bbox_pred")
              for leaf in ("weight", "bias")}
    state = model.state_dict()
    for key, value in state.items():
        expected = fresh[key] if key in afresh else source[key]
        assert torch.equal(value, expected), key
    assert not torch.equal(fresh["rpn.head.conv.weight"], source["rpn.head.conv.weight"])
    assert "\n" not in line
    assert line == (f"--init_from={shapes_tiny} (a checkpoint of maskrcnn-train, step 1488): "
                    f"loaded {len(state) - 4} of the model's {len(state)} tensors; "
                    "initialised afresh: roi_heads.box_head.cls_score, "
                    "roi_heads.box_head.bbox_pred (the file has 5 classes, the model 3)")


def test_init_from_a_model_state_dict_names_what_has_no_place(shapes_tiny, tmp_path):
    """If this fails, a bare state dict (torch.save(model.state_dict())) with a tensor our
    model lacks loads silently or fails, instead of loading the rest and naming it."""
    state = dict(torch.load(shapes_tiny, weights_only=False)["model"])
    state["roi_heads.extra.weight"] = torch.zeros(2)
    path = tmp_path / "state.pth"
    torch.save(state, path)
    model = _tiny_model(5)
    line = ckpt.load_init_weights(model, ckpt.read_init_weights(path))
    total = len(model.state_dict())
    assert line == (f"--init_from={path} (a state dict of our MaskRCNN): loaded {total} of "
                    f"the model's {total} tensors; not in the model: roi_heads.extra")


@pytest.mark.parametrize("kind", FOREIGN)
def test_init_from_a_bad_file_is_one_line(shapes_tiny, tmp_path, kind):
    """If this fails, --init_from with a missing, damaged or foreign file ends in a traceback
    (or loads nothing without a word) instead of one line naming the file."""
    path = tmp_path / "init.pth"
    content = FOREIGN[kind]
    if content == "truncated":
        shutil.copy(shapes_tiny, path)
        _truncate(path)
    elif content == "tv-extra":
        torch.save({"roi_heads.box_predictor.cls_score.weight": torch.zeros(2, 4),
                    "roi_heads.box_head.fc8.weight": torch.zeros(1)}, path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.read_init_weights(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"--init_from={path}: "), message
