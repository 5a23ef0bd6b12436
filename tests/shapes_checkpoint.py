"""A small trained Mask R-CNN for the tests that need a model scoring well above AP 0: the
checked-in tests/assets/shapes-tiny/ and how to turn it into a checkpoint of maskrcnn-train.

A whole ResNet-18 weighs 45 MB, too much to check in. So the checkpoint was trained with its
backbone body frozen (backbone.frozen_stages 5) at weights drawn from a seeded generator
(`frozen_body`) rather than torch's initialisation; the asset holds the rest (FPN, RPN and
RoI heads, 0.2 M weights), the config, the class names and the AP training printed, and
`write_checkpoint` draws the body again and writes the full checkpoint
(engine/checkpoint.py's format) that eval and predict read.

Made on the CPU with `--make` (24 epochs: box AP 0.307, mask AP 0.217; 2 min 23 s with
OMP_NUM_THREADS=1 on the 2-core machine; tests/assets/README.md gives the command).
`--from_checkpoint` writes the asset from an earlier checkpoint of such a run instead.
"""

import argparse
import json
import math
import re
import tempfile
from pathlib import Path

import torch

from maskrcnn.config import Config, load_config, to_text
from maskrcnn.config.loader import parse_text
from maskrcnn.engine import checkpoint as ckpt
from maskrcnn.model.maskrcnn import build_model

ASSET = Path(__file__).resolve().parent / "assets" / "shapes-tiny"
WEIGHTS = ASSET / "model.pt"  # everything but the backbone body's weights
SCORES = ASSET / "scores.json"  # the AP training printed for this checkpoint
BODY = "backbone.body."
BODY_SEED = 0



def frozen_body(state: dict[str, torch.Tensor], seed: int = BODY_SEED) -> dict[str, torch.Tensor]:
    """The backbone body's weights, by name, for a model state of that shape: each conv weight
    uniform in +-sqrt(6 / fan_in) (He's bound for ReLU), drawn in sorted name order from one
    torch.Generator (Mersenne Twister, the same numbers on every torch version); each group
    norm's shift 0 and scale 1, but 0 for a residual block's last norm, as the model
    initialises a body from scratch (every block starts as the identity: a frozen body of
    random blocks at full scale garbles the image, and the heads learnt nothing on it)."""
    generator = torch.Generator().manual_seed(seed)
    body = {}
    for name in sorted(k for k in state if k.startswith(BODY)):
        shape = state[name].shape
        if len(shape) == 4:  # conv (out, in, kh, kw)
            bound = math.sqrt(6 / math.prod(shape[1:]))
            body[name] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        elif name.endswith(".weight"):  # ResNet-18's BasicBlock: conv1, bn1, conv2, bn2
            last = re.fullmatch(r".*layer\d\.\d+\.bn2\.weight", name)
            body[name] = torch.zeros(shape) if last else torch.ones(shape)
        elif name.endswith(".bias"):
            body[name] = torch.zeros(shape)
        else:
            raise ValueError(f"{name}: not a conv or group norm weight")
    return body


def scores() -> tuple[float, float]:
    """(box AP, mask AP) that training printed (3 decimals) for the checked-in checkpoint."""
    recorded = json.loads(SCORES.read_text())
    return recorded["box AP"], recorded["mask AP"]


def config() -> Config:
    """The config the checked-in model was trained with."""
    return parse_text(_state()["config"], str(WEIGHTS))


def _state() -> dict:
    return torch.load(WEIGHTS, map_location="cpu", weights_only=True)


def write_checkpoint(path: Path) -> Path:
    """Writes the checked-in model as a full checkpoint of maskrcnn-train to path."""
    state = _state()
    shapes = build_model(parse_text(state["config"], str(WEIGHTS))).state_dict()
    state["model"] = {**frozen_body(shapes), **state["model"]}
    assert state["model"].keys() == shapes.keys(), "the asset does not fit this model"
    return ckpt.save_atomic(state, path)


def make(output_dir: Path) -> None:
    """Trains the model with a frozen seeded body, and writes the asset from its last
    checkpoint and the AP training printed."""
    from maskrcnn.engine import distributed  # noqa: PLC0415
    from maskrcnn.train import build_trainer  # noqa: PLC0415
    from tests.tiny import TINY  # noqa: PLC0415 (the helper is also loaded outside the repo)

    # TINY's model with a frozen body, trained on 256 synthetic images of TINY's size; 16 val
    # images (the shapes in them are what the predict test looks for).
    overrides = [
        TINY[0],
        "model { backbone { frozen_stages: 5 } }",
        "data { synthetic { num_train: 256 num_val: 16 min_side: 96 max_side: 128 } "
        "short_side: 96 max_long_side: 128 canvas { height: 96 width: 128 } "
        "canvas { height: 128 width: 96 } max_instances: 8 gt_mask_size: 16 num_workers: 1 }",
        "solver { epochs: 24 warmup_steps: 20 lr_decay_epochs: [20] }",
        "run { images_per_gpu: 4 log_period_steps: 62 eval_period_epochs: 6 "
        "checkpoint_period_epochs: 6 }",
    ]
    config = load_config("shapes", [*overrides, f"run {{ output_dir: '{output_dir}' }}"])
    trainer = build_trainer(config, distributed.init(torch.device("cpu"), 60))
    model = trainer.model
    model.load_state_dict({**model.state_dict(), **frozen_body(model.state_dict())})
    result = trainer.train()
    write_asset(result.checkpoint, *(f"{result.metrics[k]:.3f}" for k in ("bbox/AP", "segm/AP")))


def write_asset(checkpoint: Path, box_ap: str, mask_ap: str) -> None:
    """Writes the asset from a checkpoint of `make`'s run and the AP training printed for it."""
    state = ckpt.load(checkpoint)
    for name, value in frozen_body(state["model"]).items():
        assert torch.equal(state["model"][name], value), f"{name} changed in training"
    saved = parse_text(state["config"], str(checkpoint))
    saved.run.output_dir = ""
    ASSET.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {k: v for k, v in state["model"].items() if not k.startswith(BODY)},
                "config": to_text(saved), "step": state["step"],
                "category_ids": state["category_ids"], "class_names": state["class_names"]},
               WEIGHTS)
    SCORES.write_text(json.dumps({"box AP": float(box_ap), "mask AP": float(mask_ap),
                                  "step": state["step"]}) + "\n")
    print(f"{WEIGHTS}: {WEIGHTS.stat().st_size} bytes, step {state['step']}, "
          f"box AP {box_ap}, mask AP {mask_ap}")

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make", action="store_true", help="train and write the asset")
    parser.add_argument("--from_checkpoint", type=Path, help="write the asset from this "
                        "checkpoint of --make's run (an earlier one than its last)")
    parser.add_argument("--ap", help="with --from_checkpoint: BOX,MASK AP training printed")
    args = parser.parse_args()
    if args.from_checkpoint:
        write_asset(args.from_checkpoint, *args.ap.split(","))
    elif args.make:
        with tempfile.TemporaryDirectory() as tmp:
            make(Path(tmp))


if __name__ == "__main__":
    main()
