"""`python -m maskrcnn.train --config=shapes`: train, evaluate, and draw some predictions.

With no data flags the `shapes` config generates the built-in synthetic dataset once (into
$MASKRCNN_CACHE or ~/.cache/maskrcnn), trains on it, evaluates box and mask AP on its val split
and writes <output_dir>/predictions.png. `--resume` continues from the latest checkpoint in the
output dir.
"""

from pathlib import Path

from absl import flags

from maskrcnn.cli import run_command
from maskrcnn.config import Config, to_text
from maskrcnn.config.flags import FLAGS, config_from_flags
from maskrcnn.data.coco import CocoDataset
from maskrcnn.engine import checkpoint as ckpt
from maskrcnn.engine.predictions import draw_dataset_predictions
from maskrcnn.engine.trainer import Trainer, resolve_device

flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in the output dir.")
flags.DEFINE_integer("debug_exit_after_step", 0, "Testing: end the process abruptly (as if "
                     "killed) right after this step.")
PREVIEW_IMAGES = 4  # val images drawn with their predictions at the end


def write_config(config: Config, output_dir: Path) -> Path:
    """Writes the resolved config (every field explicit) atomically to output_dir."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "config.pbtxt"
    tmp = path.with_suffix(".pbtxt.tmp")
    tmp.write_text(to_text(config))
    tmp.replace(path)
    return path


def describe(name: str, coco: CocoDataset) -> str:
    s = coco.stats
    classes = ", ".join(f"{k}: {v}" for k, v in sorted(s.instances_per_class.items()))
    return (f"{name}: {coco.json_path}\n"
            f"  {s.images} images, {s.annotations} annotations, {len(coco.records)} images used\n"
            f"  crowd annotations (not training targets): {s.crowd}\n"
            f"  boxes clipped to the image: {s.clipped_boxes}, dropped as degenerate: "
            f"{s.dropped_boxes}\n"
            f"  images without targets: {s.images_without_targets}\n"
            f"  instances per class: {classes}")


def main() -> None:
    config = config_from_flags()
    output_dir = Path(config.run.output_dir)
    print(f"resolved config written to {write_config(config, output_dir)}")
    trainer = Trainer(config, resolve_device(FLAGS.device))
    print(describe("train", trainer.train_coco))
    if trainer.val_coco is not None:
        print(describe("val", trainer.val_coco))
    if FLAGS.resume:
        latest = ckpt.latest_checkpoint(output_dir)
        if latest is None:
            print(f"--resume: no checkpoint in {output_dir / ckpt.CHECKPOINT_DIR}; "
                  "starting from scratch")
        else:
            trainer.resume(latest)
    result = trainer.train(exit_after_step=FLAGS.debug_exit_after_step)
    if result.metrics:
        print(f"box AP {result.metrics['bbox/AP']:.3f}, mask AP {result.metrics['segm/AP']:.3f} "
              f"on {trainer.val_json}")
    if trainer.val_coco is not None:
        picture = output_dir / "predictions.png"
        draw_dataset_predictions(trainer, PREVIEW_IMAGES).save(picture)
        print(f"predictions on {PREVIEW_IMAGES} val images drawn in {picture}")


def run() -> None:
    """Console-script entry point (`maskrcnn-train`)."""
    run_command(main)


if __name__ == "__main__":
    run()
