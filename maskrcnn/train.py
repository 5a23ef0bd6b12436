"""`python -m maskrcnn.train --config=shapes`: the main job.

Until the model and trainer exist (issues 3 and 4), it resolves the config, prepares the data
(generating the built-in synthetic set on first use), prints the data statistics and writes a
picture of one training batch with its ground truth to <output_dir>/train_batch.png.
"""

from pathlib import Path

from absl import logging

from maskrcnn.cli import run_command
from maskrcnn.config import Config, to_text
from maskrcnn.config.flags import config_from_flags
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.loader import build_dataset, build_train_loader, read_coco, resolve_data_paths
from maskrcnn.visualize import draw_batch


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

    paths = resolve_data_paths(config)
    num_classes = config.model.num_classes
    train_coco = read_coco(paths.train_json, paths.train_images, train=True,
                           num_classes=num_classes)
    print(describe("train", train_coco))
    if paths.val_json:
        val_coco = read_coco(paths.val_json, paths.val_images, train=False,
                             num_classes=num_classes)
        print(describe("val", val_coco))

    dataset = build_dataset(config, train_coco, train=True)
    loader, sampler = build_train_loader(config, dataset)
    canvases = [f"{c.height}x{c.width}" for c in config.data.canvas]
    per_canvas = {canvases[i]: int((dataset.canvas_of == i).sum()) for i in range(len(canvases))}
    print(f"canvases (images each): {per_canvas}; {sampler.steps_per_epoch} steps per epoch of "
          f"{sampler.global_batch} images")

    sampler.set_epoch(0)
    batch = next(iter(loader))
    picture = output_dir / "train_batch.png"
    draw_batch(batch, train_coco.class_names).save(picture)
    print(f"one training batch: images {tuple(batch.images.shape)}, gt_boxes "
          f"{tuple(batch.gt_boxes.shape)}, gt_masks {tuple(batch.gt_masks.shape)}, "
          f"{int(batch.gt_valid.sum())} instances, {int(batch.num_dropped.sum())} beyond "
          f"G={config.data.max_instances} dropped")
    print(f"wrote {picture}")
    logging.info("done")


def run() -> None:
    """Console-script entry point (`maskrcnn-train`)."""
    run_command(main)


if __name__ == "__main__":
    run()
