"""`python -m maskrcnn.eval --checkpoint=PATH`: COCO box and mask AP of a saved model.

The checkpoint's config is the base (so the model is built as it was trained); data flags,
--config and --set change it. Results go to <output_dir>/coco_results.json.

`python -m maskrcnn.eval --results=FILE --val_json=GT [--iou_type=bbox,segm]` scores an
existing COCO results file (anyone's) with the same scoring code that training uses; the IoU
types default to those the file holds (boxes, masks).

Under torchrun (`torchrun --nproc_per_node=N -m maskrcnn.eval --checkpoint=PATH`) each process
evaluates its shard of the val set (run.images_per_gpu images per batch); rank 0 gathers,
scores and prints. Every process reads the checkpoint and the val set.
"""

import time
from pathlib import Path

from absl import flags

from maskrcnn.cli import run_command
from maskrcnn.config import ConfigError
from maskrcnn.config.flags import FLAGS, config_from_flags, data_flag_paths
from maskrcnn.data.coco import DatasetError, describe, read_annotation_file
from maskrcnn.data.loader import build_dataset, build_eval_loader, read_coco, resolve_data_paths
from maskrcnn.engine import checkpoint as ckpt
from maskrcnn.engine import distributed
from maskrcnn.engine.evaluate import (
    IOU_TYPES,
    Evaluator,
    coco_api,
    load_ground_truth,
    read_results,
    score,
)
from maskrcnn.engine.fallback import verify_kernels
from maskrcnn.engine.hooks import StopSignals, workers_ignore_stop_signals
from maskrcnn.engine.step import autocast_dtype
from maskrcnn.model.maskrcnn import build_model
from maskrcnn.runtime import Runtime, resolve_device

flags.DEFINE_bool("per_category", False, "Also print the AP of each category.")
flags.DEFINE_string("results", None, "Score this COCO results file (a json list of "
                    "detections) against --val_json instead of evaluating a checkpoint.")
flags.DEFINE_list("iou_type", [], "With --results: bbox, segm or bbox,segm (default: the "
                  "types the file holds: boxes, masks).")


def score_results_file() -> None:
    """`--results`: scores a COCO results file against the val json, on this process."""
    config = config_from_flags(data=False)  # for run.coco_eval
    gt_json = data_flag_paths().get("val_json")
    if not gt_json:
        raise DatasetError("--results needs the ground truth: pass --val_json (or --data_dir)")
    api = coco_api(config.run.coco_eval)
    annotations = read_annotation_file(Path(gt_json), config.data.bad_annotations)
    for line in annotations.warnings():
        print(line)
    gt = load_ground_truth(annotations.data, api)
    results, iou_types = read_results(Path(FLAGS.results), gt)
    if FLAGS.iou_type:
        unknown = [t for t in FLAGS.iou_type if t not in IOU_TYPES]
        if unknown:
            raise ConfigError(f"--iou_type={','.join(FLAGS.iou_type)}: {unknown[0]} is not "
                              f"one of {', '.join(IOU_TYPES)}")
        if "segm" in FLAGS.iou_type and "segm" not in iou_types:
            raise ConfigError(f"--iou_type=segm: the results in {FLAGS.results} have no "
                              "'segmentation'")
        iou_types = tuple(FLAGS.iou_type)  # bbox works from masks too (their bounding boxes)
    start = time.perf_counter()
    print(f"scoring {len(results)} detections of {FLAGS.results} against "
          f"{gt_json} ({len(gt.imgs)} images) with {api.name}")
    metrics = score(gt, results, iou_types, api=api, per_category=FLAGS.per_category)
    print(f"scored in {time.perf_counter() - start:.2f} s: " + ", ".join(
        f"{t} AP {metrics[f'{t}/AP']!r}" for t in iou_types))


def evaluate_checkpoint(process: distributed.Process) -> None:
    """This process's part of the evaluation (all of it with one process)."""
    say = print if process.is_main else (lambda *args: None)
    state = ckpt.load(Path(FLAGS.checkpoint))
    config = config_from_flags(state["config"], f"{FLAGS.checkpoint} (its config)")
    paths = distributed.node_main_first(process, lambda: resolve_data_paths(config))
    if paths.val_json is None:
        raise DatasetError("no val split: pass --data_dir, or --val_json and --val_images")
    coco = read_coco(paths.val_json, paths.val_images, train=False,
                     num_classes=config.model.num_classes,
                     bad_annotations=config.data.bad_annotations)
    say(describe("val", coco))
    runtime = verify_kernels(Runtime.for_config(config, process.device, process.rank,
                                                process.world_size), process.device)
    say(f"on {process.device}: {runtime.describe()}")
    model = build_model(config, runtime)
    ckpt.load_model_state(model, state["model"], FLAGS.checkpoint)
    model.to(process.device)
    loader = workers_ignore_stop_signals(build_eval_loader(
        config, build_dataset(config, coco, train=False), rank=process.rank,
        world_size=process.world_size))
    evaluator = Evaluator(model, loader, coco, Path(config.run.output_dir), process.device,
                          autocast_dtype=autocast_dtype(config),
                          per_category=FLAGS.per_category, coco_eval=config.run.coco_eval,
                          log=say)
    # SIGTERM or SIGINT stops the evaluation before its next batch, with nothing written;
    # caught from before the line that says it has started.
    with StopSignals() as signals:
        say(f"evaluating {FLAGS.checkpoint} (step {state['step']}) on {paths.val_json}"
            + (f" with {process.world_size} processes" if process.world_size > 1 else ""))
        metrics = evaluator(stop=lambda: signals.received)
    say(f"box AP {metrics['bbox/AP']:.3f}, mask AP {metrics['segm/AP']:.3f}")


def main() -> None:
    if FLAGS.results:
        if FLAGS.checkpoint:
            raise ConfigError("pass --checkpoint (evaluate a model) or --results (score a "
                              "results file), not both")
        score_results_file()
        return
    if not FLAGS.checkpoint:
        raise DatasetError("--checkpoint (or --results) is required")
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
