"""COCO evaluation: batched inference, results in COCO format, scoring with pycocotools.

Shape legend: N images per batch, D detections per image, M mask side, H x W an image's size
as stored on disk.
"""

import contextlib
import io
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn.data.batch import Batch
from maskrcnn.engine import distributed
from maskrcnn.ops.paste_masks import paste_masks

IOU_TYPES = ("bbox", "segm")
# pycocotools' 12 summary numbers, in its order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
MASK_THRESHOLD = 0.5  # a pixel belongs to the instance where its probability is at least this


def detections_to_coco(detections: dict[str, torch.Tensor], batch: Batch,
                       category_ids: Sequence[int], with_masks: bool = True) -> list[dict]:
    """One batch's detections as COCO result dicts, in each image's original pixels.

    detections: the model's inference output (boxes float[N, D, 4] in canvas pixels, scores,
    classes int64[N, D] in 1..K, valid bool[N, D], masks float[N, D, M, M] probabilities).
    Masks are pasted at the original resolution on the model's device and RLE-encoded.
    """
    results = []
    valid = detections["valid"].cpu()
    for i in range(len(batch)):
        keep = int(valid[i].sum())  # detections are sorted: the valid ones come first
        if keep == 0:
            continue
        height, width = (int(v) for v in batch.orig_sizes[i])
        resized_h, resized_w = (int(v) for v in batch.image_sizes[i])
        scale = torch.tensor([width / resized_w, height / resized_h] * 2,
                             device=detections["boxes"].device)
        boxes = detections["boxes"][i, :keep] * scale  # (keep, 4) in original pixels
        boxes_cpu = boxes.cpu().numpy()
        scores = detections["scores"][i, :keep].cpu().tolist()
        classes = detections["classes"][i, :keep].cpu().tolist()
        rles = []
        if with_masks:
            pasted = paste_masks(detections["masks"][i:i + 1, :keep], boxes[None], height, width)
            binary = (pasted[0] >= MASK_THRESHOLD).to(torch.uint8).cpu().numpy()  # (keep, H, W)
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        image_id = int(batch.image_ids[i])
        for d in range(keep):
            x1, y1, x2, y2 = (float(v) for v in boxes_cpu[d])
            result = {"image_id": image_id, "category_id": int(category_ids[classes[d] - 1]),
                      "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(scores[d])}
            if with_masks:
                result["segmentation"] = {"size": [height, width],
                                          "counts": rles[d]["counts"].decode("ascii")}
            results.append(result)
    return results


def _quiet(fn, *args):
    """Runs a pycocotools call without its prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def score_results(gt: COCO, results: list[dict], iou_type: str,
                  image_ids: Iterable[int] | None = None) -> tuple[np.ndarray, COCOeval | None]:
    """pycocotools' 12 summary numbers for one IoU type (all -1 when there is nothing to
    score), and the COCOeval for per-category numbers."""
    if not results:
        return np.full(len(STAT_NAMES), -1.0), None
    if iou_type == "bbox":  # loadRes would otherwise turn segmentations into the boxes' areas
        results = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    detections = _quiet(gt.loadRes, results)
    evaluator = COCOeval(gt, detections, iou_type)
    if image_ids is not None:
        evaluator.params.imgIds = sorted(image_ids)
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    _quiet(evaluator.summarize)
    return np.asarray(evaluator.stats, dtype=np.float64), evaluator


def per_category_ap(evaluator: COCOeval, gt: COCO) -> dict[str, float]:
    """AP (IoU 0.50:0.95, all areas, 100 detections) of each category, by name."""
    precision = evaluator.eval["precision"]  # (T iou, R recall, K categories, A areas, M dets)
    out = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[gt.cats[category_id]["name"]] = float(p.mean()) if p.size else float("nan")
    return out


def format_table(stats: dict[str, np.ndarray]) -> str:
    """The 12 numbers of each IoU type as a table, one row per type."""
    header = "       " + " ".join(f"{name:>6}" for name in STAT_NAMES)
    rows = [f"{iou_type:<6} " + " ".join(f"{v:6.3f}" for v in values)
            for iou_type, values in stats.items()]
    return "\n".join([header, *rows])


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable[Batch], gt_json: Path,
             category_ids: Sequence[int], output_dir: Path | None, device: torch.device,
             autocast_dtype: torch.dtype | None = None, per_category: bool = False,
             log=print) -> dict[str, float]:
    """Scores the model on every image of the loader against gt_json.

    Data parallel (a process group with several ranks): every rank calls this with the loader
    of its own shard; results are gathered on rank 0, which writes and scores them once, and
    every rank returns rank 0's metrics. Writes the results (bbox and segm in one COCO results
    file, ordered by image id) to output_dir/coco_results.json when output_dir is given.
    Returns {"bbox/AP": ..., ...}.
    """
    was_training = model.training
    model.eval()
    results: list[dict] = []
    image_ids: list[int] = []
    start = time.perf_counter()
    try:
        for batch in loader:
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                detections = model(batch.images, batch.image_sizes)
            detections = {k: v.float() if v.is_floating_point() else v
                          for k, v in detections.items()}
            results += detections_to_coco(detections, batch, category_ids)
            image_ids += batch.image_ids.tolist()
    finally:
        model.train(was_training)
    shards = distributed.gather_to_main((results, image_ids),
                                        "gathering the COCO results on rank 0")
    if shards is None:  # not rank 0
        return distributed.broadcast_from_main(None, "receiving the metrics from rank 0")
    results = sorted((r for shard, _ in shards for r in shard), key=lambda r: r["image_id"])
    image_ids = [i for _, shard_ids in shards for i in shard_ids]
    seconds = time.perf_counter() - start
    log(f"inference: {len(image_ids)} images in {seconds:.1f} s "
        f"({len(image_ids) / max(seconds, 1e-9):.1f} images/s"
        f"{f' over {len(shards)} ranks' if len(shards) > 1 else ''}), "
        f"{len(results)} detections")
    if output_dir is not None:
        path = Path(output_dir) / "coco_results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(results))
        tmp.replace(path)
        log(f"results written to {path}")
    gt = _quiet(COCO, str(gt_json))
    stats, metrics = {}, {}
    for iou_type in IOU_TYPES:
        stats[iou_type], evaluator = score_results(gt, results, iou_type, image_ids)
        metrics.update({f"{iou_type}/{n}": float(v)
                        for n, v in zip(STAT_NAMES, stats[iou_type], strict=True)})
        if per_category and evaluator is not None:
            for name, ap in per_category_ap(evaluator, gt).items():
                metrics[f"{iou_type}/AP-{name}"] = ap
    log(format_table(stats))
    if per_category:
        for iou_type in IOU_TYPES:
            names = sorted(k for k in metrics if k.startswith(f"{iou_type}/AP-"))
            log(f"{iou_type} AP per category: " + ", ".join(
                f"{k.split('/AP-', 1)[1]} {metrics[k]:.3f}" for k in names))
    return distributed.broadcast_from_main(metrics, "sending the metrics from rank 0")
