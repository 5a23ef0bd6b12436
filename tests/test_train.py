"""The main job as a user runs it: flags, one-line errors, outputs."""

import json

import pytest
import torch
from PIL import Image

from maskrcnn.config import load_config
from maskrcnn.engine.distributed import Process
from maskrcnn.train import build_trainer
from tests.tiny import REPO, TINY, run_module

SHORT = "solver { epochs: 1 images_per_epoch: 4 warmup_steps: 1 lr_decay_epochs: [1] }"
# With data workers, so that errors raised inside a worker are exercised.
SMALL = [*TINY, SHORT, "data { num_workers: 2 }"]


def run_train(tmp_path, *flags, overrides=()):
    return run_module("maskrcnn.train", *flags, *(f"--set={s}" for s in overrides),
                      cache_dir=tmp_path / "cache")


def test_main_job_on_synthetic_data(tmp_path):
    """If this fails, the README's first command breaks: no data, config, AP or picture."""
    out = tmp_path / "run"
    result = run_train(tmp_path, "--config=shapes", f"--output_dir={out}", overrides=SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "instances per class" in result.stdout and "box AP" in result.stdout
    config = (out / "config.pbtxt").read_text()
    assert "num_train: 16" in config and "base_lr_per_image" in config
    with Image.open(out / "predictions.png") as picture:
        assert picture.width > 4 * 96


@pytest.mark.parametrize("flags, message", [
    (["--set=solver { bse_lr: 1 }"], "error: --set #1"),
    (["--config=8x5"], "error: unknown config '8x5'"),
    (["--config=8x4", "--backbone_weights=random"], "error: no training data: pass --data_dir"),
    (["--config=8x4"], "error: --config=8x4: model.backbone.weights_path is empty"),
    (["--config=8x4", "--backbone_weights=/nonexistent.pth"],
     "error: backbone weights /nonexistent.pth: no such file"),
    (["--init_from=/nonexistent.pt"], "error: --init_from=/nonexistent.pt: no such file"),
    (["--data_dir=/nonexistent"], "error: --data_dir=/nonexistent: no such folder"),
    (["--set=run { images_per_gpu: -1 }"], "run.images_per_gpu = -1: must be > 0"),
])
def test_bad_input_is_one_line(tmp_path, monkeypatch, flags, message):
    """If this fails, a user's mistake produces a traceback or a zero exit status."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no ImageNet file cached
    result = run_train(tmp_path, f"--output_dir={tmp_path / 'run'}", *flags)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]


def test_unknown_flag_fails(tmp_path):
    """If this fails, a misspelt flag is silently ignored."""
    result = run_train(tmp_path, "--confg=shapes")
    assert result.returncode != 0 and "confg" in result.stderr


def test_corrupt_image_in_a_worker_is_named(tmp_path):
    """If this fails, an image that cannot be decoded inside a DataLoader worker ends in a
    worker traceback instead of one line naming the image and its annotation file."""
    out = tmp_path / "run"
    assert run_train(tmp_path, f"--output_dir={out}", overrides=SMALL).returncode == 0
    root = next((tmp_path / "cache").glob("synthetic-*"))
    data = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    for image in data["images"]:
        (root / "train2017" / image["file_name"]).write_bytes(b"corrupt")
    result = run_train(tmp_path, f"--output_dir={out}", f"--data_dir={root}", overrides=SMALL)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "cannot read image" in lines[0] and "instances_train2017.json" in lines[0]


REAL = REPO / "tests" / "assets" / "coco2017-tiny"


def _garble_rle(data: dict) -> None:
    """Gives the fourth annotation a compressed RLE of its image's size with garbage counts."""
    ann = data["annotations"][3]
    image = next(i for i in data["images"] if i["id"] == ann["image_id"])
    ann["segmentation"] = {"counts": "not RLE: ~~~", "size": [image["height"], image["width"]]}


@pytest.mark.parametrize("mutate, message, setting", [
    # A garbled RLE is dropped by default (tests/test_bad_annotations.py); ERROR stops on it.
    (_garble_rle, "RLE counts string is malformed", "data { bad_annotations: ERROR }"),
    (lambda d: [a.update(iscrowd=1) for a in d["annotations"]], "nothing to train on", None),
])
def test_malformed_real_annotation_file_is_one_line(tmp_path, mutate, message, setting):
    """If this fails, the two malformed files a user met (a garbled RLE counts string, a file
    with no usable annotation) end in pycocotools' or the sampler's traceback again."""
    data = json.loads((REAL / "annotations" / "instances_val2017.json").read_text())
    mutate(data)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    result = run_train(tmp_path, f"--output_dir={tmp_path / 'run'}", f"--train_json={path}",
                       f"--train_images={REAL / 'val2017'}",
                       overrides=[*SMALL, *([setting] if setting else [])])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"error: annotation file {path}") and message in lines[0]


def test_corrupt_image_mid_run_keeps_the_steps_done(tmp_path, monkeypatch):
    """If this fails, an image that turns out corrupt in the middle of a run throws away the
    steps trained since the last checkpoint (here: none was due), or --resume cannot go on
    from them once the image is fixed."""
    schedule = "solver { epochs: 2 images_per_epoch: 8 warmup_steps: 1 lr_decay_epochs: [1] }"
    overrides = [*TINY, schedule, "data { num_workers: 2 }"]
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    config = load_config("shapes", [*overrides, f"run {{ output_dir: '{out}' }}"])
    monkeypatch.setenv("MASKRCNN_CACHE", str(cache))
    trainer = build_trainer(config, Process(0, 1, 0, torch.device("cpu")),
                            log=lambda text: None)
    seen = set()
    for epoch in (0, 1):
        trainer.sampler.set_epoch(epoch)
        order = [index for batch in trainer.sampler for index, _ in batch]
        if epoch == 0:
            seen = set(order)
    # The first image of epoch 1 (steps 4 to 7) that epoch 0 did not read, and the steps
    # done before its batch.
    position = next(k for k, i in enumerate(order) if i not in seen)
    victim = trainer.train_coco.records[order[position]].path
    steps = 4 + position // 2
    original = victim.read_bytes()
    victim.write_bytes(b"corrupt")
    result = run_train(tmp_path, f"--output_dir={out}", overrides=overrides)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert f"cannot read image {victim}" in lines[0]
    assert f"the {steps} steps done are in" in lines[0] and f"step_{steps:08d}.pt" in lines[0]
    victim.write_bytes(original)
    resumed = run_train(tmp_path, f"--output_dir={out}", "--resume", overrides=overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and f"at step {steps}" in resumed.stdout
