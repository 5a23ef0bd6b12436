"""`python -m maskrcnn.predict --checkpoint=PATH --input=IMAGE_OR_FOLDER`: draw predictions.
`--model=FILE` instead of --checkpoint: the same from a program of maskrcnn-export (its
FILE.json gives the config, canvas and classes; images are resized onto its one canvas).

For each image it writes <output_dir>/<image name>.png with the boxes, class names, scores and
masks drawn at the image's own resolution, and all detections together in
<output_dir>/predictions.json, a COCO-format file (images, categories, and annotations with
scores and RLE masks). With --val_json, an image listed there (matched by file name) is drawn
with its ground truth on the left and the predictions on the right, each under a title.
"""

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from absl import flags
from pycocotools import mask as mask_utils

from maskrcnn.cli import run_command
from maskrcnn.config import Config, config_pb2
from maskrcnn.config.flags import FLAGS, config_from_flags
from maskrcnn.data.coco import DatasetError
from maskrcnn.engine import checkpoint as ckpt
from maskrcnn.engine.deploy import ExportedModel
from maskrcnn.engine.fallback import verify_kernels
from maskrcnn.engine.predictions import (
    draw_ground_truth,
    draw_predictions,
    drawn_results,
    ground_truth_by_file,
    predict,
)
from maskrcnn.model.maskrcnn import build_model
from maskrcnn.runtime import Runtime, resolve_device
from maskrcnn.visualize import side_by_side, titled

flags.DEFINE_multi_string("input", [], "An image file or a folder of images. Repeatable.")
flags.DEFINE_string("model", None, "A program written by maskrcnn-export (pt2, aoti or onnx), "
                    "instead of --checkpoint.")
flags.DEFINE_float("draw_threshold", 0.5, "Only detections scoring at least this are drawn.")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def find_images(inputs: Sequence[str]) -> list[Path]:
    """The image files named, and those inside the folders named (sorted)."""
    paths = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            paths.append(path)
        else:
            raise DatasetError(f"--input={name}: no such file or folder")
    if not paths:
        raise DatasetError(f"no images found in {', '.join(inputs) or '(no --input)'}")
    return paths


def load_model(args) -> tuple[torch.nn.Module, Config, torch.device, list[int], list[str]]:
    """The model of --checkpoint or --model, its config, device, category ids and names."""
    if args.model:
        model = ExportedModel(Path(args.model))
        info = model.info
        config = config_from_flags(info["config"], f"{args.model}.json (its config)")
        config.run.precision = config_pb2.FP32  # the program computes in its own precision
        device = torch.device(info["device"])
        print(f"on {device}: the {info['format']} program {args.model}, {info['batch']} "
              f"images of {info['canvas'][0]}x{info['canvas'][1]} per call")
        return model, config, device, info["category_ids"], info["class_names"]
    if not args.checkpoint:
        raise DatasetError("--checkpoint (or --model) is required")
    state = ckpt.load(Path(args.checkpoint))
    config = config_from_flags(state["config"], f"{args.checkpoint} (its config)")
    device = resolve_device(args.device)
    runtime = verify_kernels(Runtime.for_config(config, device), device)
    print(f"on {device}: {runtime.describe()}")
    model = build_model(config, runtime)
    ckpt.load_model_state(model, state["model"], args.checkpoint)
    model.to(device)
    return model, config, device, state["category_ids"], state["class_names"]


def main() -> None:
    model, config, device, category_ids, class_names = load_model(FLAGS)
    paths = find_images(FLAGS.input)
    output_dir = Path(FLAGS.output_dir or Path(config.run.output_dir) / "predictions")
    ground_truth, names = ground_truth_by_file(FLAGS.val_json) if FLAGS.val_json else ({}, {})
    output_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for path, (image, results) in zip(paths, predict(model, paths, config, device,
                                                     category_ids), strict=True):
        picture = output_dir / f"{path.stem}.png"
        drawn = draw_predictions(image, results, category_ids, class_names, FLAGS.draw_threshold)
        shown = len(drawn_results(results, FLAGS.draw_threshold))  # one per object, as drawn
        if path.name in ground_truth:
            entry, instances = ground_truth[path.name]
            if [entry["height"], entry["width"]] != list(image.shape[:2]):
                raise DatasetError(f"image {path} is {image.shape[1]}x{image.shape[0]} but "
                                   f"{FLAGS.val_json} says {entry['width']}x{entry['height']}")
            truth = draw_ground_truth(image, instances, category_ids, names)
            drawn = side_by_side([titled(truth, f"ground truth: {len(instances)} instances"),
                                  titled(drawn, f"predictions: {shown} scoring >= "
                                                f"{FLAGS.draw_threshold:g}")])
        elif FLAGS.val_json:
            print(f"{path}: not in {FLAGS.val_json}; predictions drawn alone")
        drawn.save(picture)
        image_id = len(images)
        images.append({"id": image_id, "file_name": str(path), "height": image.shape[0],
                       "width": image.shape[1]})
        for r in results:
            annotations.append({**r, "id": len(annotations) + 1, "iscrowd": 0,
                                "area": float(mask_utils.area(r["segmentation"]))})
        print(f"{path}: {shown} detections scoring >= {FLAGS.draw_threshold} drawn in {picture}")
    categories = [{"id": c, "name": n} for c, n in zip(category_ids, class_names, strict=True)]
    path = output_dir / "predictions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))
    print(f"{len(annotations)} detections written to {path}")


def run() -> None:
    """Console-script entry point (`maskrcnn-predict`)."""
    run_command(main)


if __name__ == "__main__":
    run()
