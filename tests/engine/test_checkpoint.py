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
