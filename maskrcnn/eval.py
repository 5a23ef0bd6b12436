"""`python -m maskrcnn.eval --checkpoint=PATH`: COCO box and mask AP of a saved model.

The checkpoint's config is the base (so the model is built as it was trained); data flags,
--config and --set change it. Results go to <output_dir>/coco_results.json.

Under torchrun (`torchrun --nproc_per_node=N -m maskrcnn.eval --checkpoint=PATH`) each process
evaluates its shard of the val set (run.images_per_gpu images per batch); rank 0 gathers,
scores and prints. Every process reads the checkpoint and the val set.
"""

from pathlib import Path

from absl import flags

from maskrcnn.cli import run_command
from maskrcnn.config.flags import FLAGS, config_from_flags
from maskrcnn.data.coco import DatasetError
from maskrcnn.data.loader import build_dataset, build_eval_loader, read_coco, resolve_data_paths
from maskrcnn.engine import checkpoint as ckpt
from maskrcnn.engine import distributed
from maskrcnn.engine.evaluate import evaluate
from maskrcnn.engine.trainer import autocast_dtype, load_model_state, resolve_device
from maskrcnn.model.maskrcnn import build_model

flags.DEFINE_bool("per_category", False, "Also print the AP of each category.")


def evaluate_checkpoint(process: distributed.Process) -> None:
    """This process's part of the evaluation (all of it with one process)."""
    say = print if process.is_main else (lambda *args: None)
    state = ckpt.load(Path(FLAGS.checkpoint))
    config = config_from_flags(state["config"], f"{FLAGS.checkpoint} (its config)")
    paths = distributed.node_main_first(process, lambda: resolve_data_paths(config))
    if paths.val_json is None:
        raise DatasetError("no val split: pass --data_dir, or --val_json and --val_images")
    coco = read_coco(paths.val_json, paths.val_images, train=False,
                     num_classes=config.model.num_classes)
    model = build_model(config)
    load_model_state(model, state["model"], FLAGS.checkpoint)
    model.to(process.device)
    loader = build_eval_loader(config, build_dataset(config, coco, train=False),
                               rank=process.rank, world_size=process.world_size)
    say(f"evaluating {FLAGS.checkpoint} (step {state['step']}) on {paths.val_json}"
        + (f" with {process.world_size} processes" if process.world_size > 1 else ""))
    metrics = evaluate(model, loader, paths.val_json, coco.category_ids,
                       Path(config.run.output_dir), process.device,
                       autocast_dtype(config), per_category=FLAGS.per_category, log=say)
    say(f"box AP {metrics['bbox/AP']:.3f}, mask AP {metrics['segm/AP']:.3f}")


def main() -> None:
    if not FLAGS.checkpoint:
        raise DatasetError("--checkpoint is required")
    process = distributed.init(resolve_device(FLAGS.device), FLAGS.dist_timeout_s)
    try:
        evaluate_checkpoint(process)
    finally:
        distributed.shutdown()


def run() -> None:
    """Console-script entry point (`maskrcnn-eval`)."""
    run_command(main)


if __name__ == "__main__":
    run()
