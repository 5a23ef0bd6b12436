"""Where a training run's weights come from: the backbone's ImageNet file (required for a
frozen-batch-norm body, found in torch hub's cache, or asked to be random) and --init_from
(fine-tuning from our checkpoint or a torchvision state dict on one's own categories)."""

import json
import re

import pytest
import torch
import torchvision

from maskrcnn.config import ConfigError, config_pb2, load_config, named_configs, to_text
from maskrcnn.config.flags import FLAGS, config_from_flags
from maskrcnn.engine import checkpoint as ckpt
from maskrcnn.model.backbone import IMAGENET_FILES
from maskrcnn.train import starting_weights
from tests.shapes_checkpoint import write_checkpoint
from tests.tiny import REPO, TINY, run_module

PHOTOS = REPO / "tests" / "assets" / "coco2017-tiny"
# TINY's model with frozen batch norm, the recipe's frozen stages: it needs ImageNet weights.
FROZEN_BN = "model { backbone { norm: FROZEN_BN frozen_stages: 2 } }"
SHORT = ["solver { epochs: 1 images_per_epoch: 4 warmup_steps: 1 lr_decay_epochs: [1] }",
         "data { num_workers: 0 }"]
# COCO categories of the fine-tune: person, car, book (123, 34 and 23 instances in the photos).
CATEGORIES = [1, 3, 84]


@pytest.fixture
def parsed_flags():
    """Parses maskrcnn-train's flags in this process; restores them after."""
    def parse(*args: str) -> None:
        FLAGS(["maskrcnn-train", *args])
    yield parse
    FLAGS.unparse_flags()


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """(torchvision resnet18 with random weights and BN statistics, the path of its state dict
    saved as torchvision's ImageNet file is, under a fresh torch hub folder's checkpoints)."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    hub = tmp_path_factory.mktemp("torch_home") / "hub"
    path = hub / "checkpoints" / IMAGENET_FILES[18]
    path.parent.mkdir(parents=True)
    torch.save(tv.state_dict(), path)
    return tv, path


def test_backbone_weights_flag_sets_the_field_in_the_resolved_config(parsed_flags):
    """If this fails, --backbone_weights does not reach model.backbone.weights_path (or the
    resolved config the run writes does not record it), or a --set no longer wins over it."""
    parsed_flags("--config=8x4", "--backbone_weights=/weights/resnet50-0676ba61.pth")
    config = config_from_flags()
    assert config.model.backbone.weights_path == "/weights/resnet50-0676ba61.pth"
    assert 'weights_path: "/weights/resnet50-0676ba61.pth"' in to_text(config)
    FLAGS.unparse_flags()
    parsed_flags("--config=8x4", "--backbone_weights=/a.pth",
                 "--set=model { backbone { weights_path: '/b.pth' } }")
    assert config_from_flags().model.backbone.weights_path == "/b.pth"


@pytest.mark.parametrize("name", named_configs())
def test_only_a_frozen_bn_run_from_scratch_needs_imagenet_weights(name, tmp_path, monkeypatch):
    """If this fails, a COCO config (frozen batch norm) trains from random weights without a
    word, `random` does not let it, --init_from (which brings the backbone) or a group-norm
    config such as shapes is stopped, or the line does not say where the file comes from."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    config = load_config(name)
    if config.model.backbone.norm == config_pb2.FROZEN_BN:
        depth = config.model.backbone.depth
        with pytest.raises(ConfigError) as info:
            starting_weights(config, None, f"--config={name}")
        line = str(info.value)
        assert "\n" not in line and line.startswith(f"--config={name}: ")
        assert f"https://download.pytorch.org/models/{IMAGENET_FILES[depth]}" in line
        assert "nothing is downloaded" in line and "--backbone_weights=random" in line
        assert str(tmp_path / "hub" / "checkpoints") in line
        random = load_config(name, ["model { backbone { weights_path: 'random' } }"])
        _, start = starting_weights(random, None, name)
        assert start.imagenet is None
    else:
        resolved, start = starting_weights(config, None, name)
        assert start.imagenet is None and resolved.model.backbone.weights_path == ""


def test_init_from_brings_the_backbone(tmp_path, monkeypatch):
    """If this fails, fine-tuning a COCO config from a full model is stopped for lacking the
    ImageNet file it does not need."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    init = write_checkpoint(tmp_path / "step_1.pt")
    config, start = starting_weights(load_config("8x1"), str(init), "--config=8x1")
    assert start.imagenet is None and start.init.path == init
    assert config.model.backbone.weights_path == ""


def test_frozen_bn_run_takes_torchvision_file_from_torch_hub_cache(tmp_path, resnet18_file,
                                                                  monkeypatch):
    """If this fails, a frozen-BN run with weights_path empty does not use torchvision's
    ImageNet file in torch hub's cache (TORCH_HOME), does not say which file it took or record
    it in the resolved config, or the body does not start from it (the frozen stem and res2
    must still hold the file's weights after training)."""
    tv, path = resnet18_file
    out = tmp_path / "run"
    monkeypatch.setenv("TORCH_HOME", str(path.parents[2]))  # torch hub's folder: TORCH_HOME/hub
    result = run_module("maskrcnn.train", "--config=shapes", f"--output_dir={out}",
                        *(f"--set={s}" for s in [*TINY, FROZEN_BN, *SHORT]),
                        cache_dir=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"model.backbone.weights_path is empty: using {path}, torchvision's ResNet-18 "
            "ImageNet file in torch hub's cache") in result.stdout
    assert f"backbone body: ImageNet weights from {path}" in result.stdout
    assert f'weights_path: "{path}"' in (out / "config.pbtxt").read_text()
    state = ckpt.load(ckpt.latest_checkpoint(out))["model"]
    for name in ("conv1.weight", "layer1.1.conv2.weight"):
        assert torch.equal(state[f"backbone.body.{name}"], tv.state_dict()[name]), name


def _three_categories(tmp_path, images: int) -> str:
    """A COCO json of the photos of tests/assets with only CATEGORIES' annotations, on the
    first `images` photos that have one; returns its path."""
    data = json.loads((PHOTOS / "annotations" / "instances_val2017.json").read_text())
    annotations = [a for a in data["annotations"] if a["category_id"] in CATEGORIES]
    keep = list(dict.fromkeys(a["image_id"] for a in annotations))[:images]
    data["images"] = [i for i in data["images"] if i["id"] in keep]
    data["annotations"] = [a for a in annotations if a["image_id"] in keep]
    data["categories"] = [c for c in data["categories"] if c["id"] in CATEGORIES]
    path = tmp_path / f"three_categories_{images}.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture(scope="module")
def finetune(tmp_path_factory):
    """A fine-tune of the shapes-tiny checkpoint (5 classes) on 3 categories of the photos,
    through `maskrcnn-train --init_from`: (the checkpoint, the run dir, the command's flags,
    the CompletedProcess)."""
    tmp_path = tmp_path_factory.mktemp("finetune")
    init = write_checkpoint(tmp_path / "shapes-tiny.pt")
    out = tmp_path / "run"
    flags = ["--config=shapes", f"--init_from={init}", f"--output_dir={out}",
             f"--train_json={_three_categories(tmp_path, 20)}",
             f"--train_images={PHOTOS / 'val2017'}",
             f"--val_json={_three_categories(tmp_path, 6)}", f"--val_images={PHOTOS / 'val2017'}",
             *(f"--set={s}" for s in [
                 *TINY, "model { num_classes: 3 backbone { frozen_stages: 5 } }", *SHORT,
                 "solver { images_per_epoch: 8 }"])]
    result = run_module("maskrcnn.train", *flags, cache_dir=tmp_path / "cache")
    return init, out, flags, result


def test_finetune_on_three_categories_from_a_five_class_checkpoint(finetune):
    """If this fails, `maskrcnn-train --init_from` cannot fine-tune a checkpoint on one's own
    categories: it stops, resumes the old run instead of starting a new one at step 0, does
    not load the fitting tensors (the frozen body must still be the checkpoint's), keeps a
    class layer of the wrong shape, does not say what it loaded, or does not evaluate."""
    init, out, _, result = finetune
    assert result.returncode == 0, result.stderr[-3000:]
    source = ckpt.load(init)["model"]
    total = len(source)
    assert (f"--init_from={init} (a checkpoint of maskrcnn-train, step 1488): loaded "
            f"{total - 4} of the model's {total} tensors; initialised afresh: "
            "roi_heads.box_head.cls_score, roi_heads.box_head.bbox_pred (the file has 5 "
            "classes, the model 3)") in result.stdout
    assert "training 4 steps of 2 images" in result.stdout
    assert re.search(r"box AP \d\.\d{3}, mask AP \d\.\d{3} on .*three_categories_6\.json",
                     result.stdout)
    final = ckpt.load(ckpt.latest_checkpoint(out))
    assert final["step"] == 4 and final["class_names"] == ["person", "car", "book"]
    state = final["model"]
    assert state["roi_heads.box_head.cls_score.weight"].shape[0] == 4
    assert state["roi_heads.box_head.bbox_pred.weight"].shape[0] == 16
    for key in ("backbone.body.conv1.weight", "backbone.body.layer4.1.conv2.weight"):
        assert torch.equal(state[key], source[key]), key


def test_resume_wins_over_init_from(finetune):
    """If this fails, restarting a preempted fine-tune with the same command (--resume added)
    starts again from --init_from's weights instead of continuing from its checkpoint."""
    _, out, flags, first = finetune
    assert first.returncode == 0, first.stderr[-3000:]
    result = run_module("maskrcnn.train", *flags, "--resume", cache_dir=out.parent / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    last = ckpt.latest_checkpoint(out)
    assert f"resumed from {last} at step 4" in result.stdout
    assert f"--resume continues from {last}: --init_from's weights are replaced" in result.stdout
