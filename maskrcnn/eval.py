"""`python -m maskrcnn.eval --checkpoint=PATH`: COCO box and mask AP of a saved model.

The checkpoint's config is the base (so the model is built as it was trained); data flags,
--config and --set change it. Results go to <output_dir>/coco_results.json.
"""

from pathlib import Path

from absl import flags

from maskrcnn.cli import run_command
from maskrcnn.config.flags import FLAGS, config_from_flags
from maskrcnn.data.coco import DatasetError
from maskrcnn.data.loader import build_dataset, build_eval_loader, read_coco, resolve_data_paths
from maskrcnn.engine import checkpoint as ckpt
from maskrcnn.engine.evaluate import evaluate
from maskrcnn.engine.trainer import autocast_dtype, load_model_state, resolve_device
from maskrcnn.model.maskrcnn import build_model

flags.DEFINE_bool("per_category", False, "Also print the AP of each category.")


def main() -> None:
    if not FLAGS.checkpoint:
        raise DatasetError("--checkpoint is required")
    state = ckpt.load(Path(FLAGS.checkpoint))
    config = config_from_flags(state["config"], f"{FLAGS.checkpoint} (its config)")
    paths = resolve_data_paths(config)
    if paths.val_json is None:
        raise DatasetError("no val split: pass --data_dir, or --val_json and --val_images")
    coco = read_coco(paths.val_json, paths.val_images, train=False,
                     num_classes=config.model.num_classes)
    device = resolve_device(FLAGS.device)
    model = build_model(config)
    load_model_state(model, state["model"], FLAGS.checkpoint)
    model.to(device)
    loader = build_eval_loader(config, build_dataset(config, coco, train=False))
    print(f"evaluating {FLAGS.checkpoint} (step {state['step']}) on {paths.val_json}")
    metrics = evaluate(model, loader, paths.val_json, coco.category_ids,
                       Path(config.run.output_dir), device,
                       autocast_dtype(config), per_category=FLAGS.per_category)
    print(f"box AP {metrics['bbox/AP']:.3f}, mask AP {metrics['segm/AP']:.3f}")


def run() -> None:
    """Console-script entry point (`maskrcnn-eval`)."""
    run_command(main)


if __name__ == "__main__":
    run()
