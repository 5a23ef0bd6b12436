"""COCO evaluation: batched inference, results in COCO format, scoring with pycocotools.

`evaluate` scores a model on a loader's images; an `Evaluator` keeps a model, its val split and
that split's loader (built once) for the evaluations of a run.

Shape legend: N images per batch, D detections per image, M mask side, H x W an image's size
as stored on disk.
"""

import contextlib
import io
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn.config import ConfigError
from maskrcnn.config.config_pb2 import FASTER_COCO_EVAL, PYCOCOTOOLS
from maskrcnn.data.batch import Batch
from maskrcnn.data.coco import (
    CocoDataset,
    DatasetError,
    is_number,
    read_annotations,
    rle_string_counts,
)
from maskrcnn.engine import distributed
from maskrcnn.engine.hooks import end_workers
from maskrcnn.ops.paste_masks import paste_masks

IOU_TYPES = ("bbox", "segm")
# pycocotools' 12 summary numbers, in its order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
MASK_THRESHOLD = 0.5  # a pixel belongs to the instance where its probability is at least this


class EvaluationStopped(Exception):
    """Evaluation stopped on a signal between two batches; nothing was written or scored.

    signal_number: the signal's number (SIGTERM 15); images: those this rank had done."""

    def __init__(self, signal_number: int, images: int):
        super().__init__(f"evaluation stopped on signal {signal_number} after {images} images")
        self.signal_number, self.images = signal_number, images


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


@dataclass(frozen=True)
class CocoApi:
    """One implementation of the COCO API: its COCO class (ground truth and results) and its
    COCOeval. faster-coco-eval's follow pycocotools' interface."""

    name: str
    coco: type
    cocoeval: type


def coco_api(backend: int = PYCOCOTOOLS) -> CocoApi:
    """The implementation `run.coco_eval` names; faster-coco-eval is an optional package."""
    if backend == FASTER_COCO_EVAL:
        try:
            import faster_coco_eval  # noqa: PLC0415 (optional dependency)
        except ImportError:
            raise ConfigError("run.coco_eval = FASTER_COCO_EVAL needs the faster-coco-eval "
                              "package: pip install faster-coco-eval") from None
        # It logs every stage and its own summary at INFO; ours prints the table.
        logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
        return CocoApi("faster-coco-eval", faster_coco_eval.COCO, faster_coco_eval.COCOeval_faster)
    return CocoApi("pycocotools", COCO, COCOeval)


def load_ground_truth(ground_truth: Path | dict, api: CocoApi | None = None):
    """The ground truth as the implementation's COCO object: a cleaned dict
    (CocoDataset.ground_truth, AnnotationFile.data), or a file, read and cleaned by the
    training reader (faulty annotations dropped, data.bad_annotations' default)."""
    gt = (api or coco_api()).coco()
    gt.dataset = (ground_truth if isinstance(ground_truth, dict)
                  else read_annotations(Path(ground_truth)))
    _quiet(gt.createIndex)
    return gt


def _no_detections(gt):
    """An empty result set for gt: scoring it gives 0 wherever there is ground truth (and
    pycocotools' -1 only where a category or area range has none), where loadRes would
    fail on an empty list."""
    empty = type(gt)()
    empty.dataset = {"images": list(gt.dataset["images"]), "annotations": [],
                     "categories": list(gt.dataset["categories"])}
    _quiet(empty.createIndex)
    return empty


def _for_iou_type(results: list[dict], iou_type: str) -> list[dict]:
    """The results as scored for one IoU type. loadRes takes a result's area, which decides
    its small/medium/large range, from its box whenever it has one; for masks that must be the
    mask's area, so segm scoring drops the boxes (as Detectron2 does), and bbox scoring drops
    the masks of results that have boxes (loadRes would derive the box from the mask
    otherwise)."""
    if iou_type == "segm":
        return [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    return [{k: v for k, v in r.items() if k != "segmentation" or "bbox" not in r}
            for r in results]


def score_results(gt, results: list[dict], iou_type: str,
                  image_ids: Iterable[int] | None = None,
                  api: CocoApi | None = None) -> tuple[np.ndarray, COCOeval]:
    """pycocotools' 12 summary numbers for one IoU type, and the COCOeval for per-category
    numbers.

    gt: the ground truth, a COCO object of `api` (default pycocotools). results: COCO result
    dicts. image_ids: the images scored (default: every image of gt). No results score 0
    (every ground-truth instance missed), not pycocotools' -1 placeholder.
    """
    api = api or coco_api()
    detections = (_quiet(gt.loadRes, _for_iou_type(results, iou_type)) if results
                  else _no_detections(gt))
    evaluator = api.cocoeval(gt, detections, iou_type)
    if image_ids is not None:
        evaluator.params.imgIds = sorted(image_ids)
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    _quiet(evaluator.summarize)
    return np.asarray(evaluator.stats[:len(STAT_NAMES)], dtype=np.float64), evaluator


def _result_problem(result, gt) -> str | None:
    """The reason a COCO result dict does not fit the ground truth gt, or None."""
    if not isinstance(result, dict):
        return "is not an object"
    for key in ("image_id", "category_id", "score"):
        if key not in result:
            return f"missing '{key}'"
    if result["image_id"] not in gt.imgs:
        return f"image_id {result['image_id']!r} is not in the ground truth"
    if result["category_id"] not in gt.cats:
        return f"category_id {result['category_id']!r} is not in the ground truth"
    if not is_number(result["score"]):
        return f"score must be a finite number, not {result['score']!r}"
    if "bbox" not in result and "segmentation" not in result:
        return "has neither 'bbox' nor 'segmentation'"
    bbox = result.get("bbox", [0, 0, 0, 0])
    if not (isinstance(bbox, list) and len(bbox) == 4
            and all(is_number(v) for v in bbox)):
        return f"bbox must be 4 finite numbers [x, y, w, h], not {bbox!r}"
    if "segmentation" in result:
        segm, image = result["segmentation"], gt.imgs[result["image_id"]]
        if not (isinstance(segm, dict) and isinstance(segm.get("counts"), str)):
            return "segmentation must be a compressed RLE ({'size': [h, w], 'counts': str})"
        if segm.get("size") != [image["height"], image["width"]]:
            return (f"segmentation size {segm.get('size')} differs from the image's "
                    f"[{image['height']}, {image['width']}]")
        runs = rle_string_counts(segm["counts"])
        if runs is None or sum(runs) != image["height"] * image["width"]:
            return "segmentation counts are not a valid RLE of the image's size"
    return None


def read_results(path: Path, gt) -> tuple[list[dict], tuple[str, ...]]:
    """A COCO results file (a json list of detections), checked against gt, and the IoU
    types it can be scored for as it is: bbox if its results have boxes, segm if they have
    masks. A malformed file stops with one line naming it and the result."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"results file {path} does not exist")
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"results file {path} is not readable JSON: {error}") from None
    if not isinstance(results, list):
        raise DatasetError(f"results file {path} must hold a list of detections, not "
                           f"a {type(results).__name__}")
    for index, result in enumerate(results):
        reason = _result_problem(result, gt)
        if reason is None and any((key in result) != (key in results[0])
                                  for key in ("bbox", "segmentation")):
            reason = "has other fields than the first result (bbox, segmentation)"
        if reason:
            raise DatasetError(f"results file {path}: result {index}: {reason}")
    if not results:
        return results, IOU_TYPES
    return results, tuple(t for t, key in zip(IOU_TYPES, ("bbox", "segmentation"), strict=True)
                          if key in results[0])


def per_category_ap(evaluator: COCOeval, gt: COCO) -> dict[str, float]:
    """AP (IoU 0.50:0.95, all areas, 100 detections) of each category, by name."""
    precision = evaluator.eval["precision"]  # (T iou, R recall, K categories, A areas, M dets)
    out = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[gt.cats[category_id]["name"]] = float(p.mean()) if p.size else float("nan")
    return out


def score(gt, results: list[dict], iou_types: Sequence[str] = IOU_TYPES,
          image_ids: Iterable[int] | None = None, api: CocoApi | None = None,
          per_category: bool = False, log=print) -> dict[str, float]:
    """Scores results for each IoU type, logs pycocotools' 12 numbers as a table (and the AP
    of each category), and returns them as {"bbox/AP": ..., "segm/AP50": ...}. The scoring
    of training, of `maskrcnn-eval --checkpoint` and of `maskrcnn-eval --results`."""
    image_ids = None if image_ids is None else sorted(image_ids)
    if not results:
        scored = len(image_ids) if image_ids is not None else len(gt.imgs)
        log(f"no detections on the {scored} images scored: every AP and AR is 0 (-1 only for "
            "an area range without ground truth)")
    stats, metrics = {}, {}
    for iou_type in iou_types:
        stats[iou_type], evaluator = score_results(gt, results, iou_type, image_ids, api)
        metrics.update({f"{iou_type}/{n}": float(v)
                        for n, v in zip(STAT_NAMES, stats[iou_type], strict=True)})
        if per_category:
            for name, ap in per_category_ap(evaluator, gt).items():
                metrics[f"{iou_type}/AP-{name}"] = ap
    log(format_table(stats))
    if per_category:
        for iou_type in iou_types:
            names = sorted(k for k in metrics if k.startswith(f"{iou_type}/AP-"))
            log(f"{iou_type} AP per category: " + ", ".join(
                f"{k.split('/AP-', 1)[1]} {metrics[k]:.3f}" for k in names))
    return metrics


def format_table(stats: dict[str, np.ndarray]) -> str:
    """The 12 numbers of each IoU type as a table, one row per type."""
    header = "       " + " ".join(f"{name:>6}" for name in STAT_NAMES)
    rows = [f"{iou_type:<6} " + " ".join(f"{v:6.3f}" for v in values)
            for iou_type, values in stats.items()]
    return "\n".join([header, *rows])


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable[Batch], ground_truth: Path | dict,
             category_ids: Sequence[int], output_dir: Path | None, device: torch.device,
             autocast_dtype: torch.dtype | None = None, per_category: bool = False,
             coco_eval: int = PYCOCOTOOLS, log=print,
             stop: Callable[[], int] | None = None) -> dict[str, float]:
    """Scores the model on every image of the loader against the ground truth (a file, or
    a cleaned dict: see load_ground_truth).

    Data parallel (a process group with several ranks): every rank calls this with the loader
    of its own shard; results are gathered on rank 0, which writes and scores them once, and
    every rank returns rank 0's metrics. Writes the results (bbox and segm in one COCO results
    file, ordered by image id) to output_dir/coco_results.json when output_dir is given.
    coco_eval: the COCOeval implementation (run.coco_eval). Returns {"bbox/AP": ..., ...}.
    stop: the number of a signal that asks to stop (0: go on), e.g. StopSignals.received;
    read before each batch and before the results are gathered (a Python read, no device
    wait). When it is set, this raises EvaluationStopped: no results file is written, nothing
    is scored. Each rank reads its own (torchrun passes a SIGTERM to every rank); a rank left
    evaluating fails at the gather, naming the one that stopped.
    """
    was_training = model.training
    model.eval()
    results: list[dict] = []
    image_ids: list[int] = []
    start = time.perf_counter()
    stop = stop or (lambda: 0)
    try:
        for batch in loader:
            if number := stop():
                raise EvaluationStopped(number, len(image_ids))
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                detections = model(batch.images, batch.image_sizes)
            detections = {k: v.float() if v.is_floating_point() else v
                          for k, v in detections.items()}
            results += detections_to_coco(detections, batch, category_ids)
            image_ids += batch.image_ids.tolist()
        if number := stop():
            raise EvaluationStopped(number, len(image_ids))
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
    api = coco_api(coco_eval)
    metrics = score(load_ground_truth(ground_truth, api), results, IOU_TYPES, image_ids, api,
                    per_category, log)
    return distributed.broadcast_from_main(metrics, "sending the metrics from rank 0")


class Evaluator:
    """Scores a model on a val split (evaluate), each call on the same loader.

    Args:
        model: the model to score (the MaskRCNN itself, not a DDP or compiled wrapper); it is
            put in eval mode during a call and back after.
        loader: this rank's shard of the split (data/loader.py: build_eval_loader); its
            workers are ended after each call (they may ignore SIGTERM,
            hooks.workers_ignore_stop_signals, and must not outlive the evaluation).
        coco: the split (its cleaned annotations are the ground truth, its category ids
            the results').
        output_dir, device, autocast_dtype, per_category, coco_eval, log: as evaluate()'s.
    """

    def __init__(self, model: torch.nn.Module, loader: Iterable[Batch], coco: CocoDataset,
                 output_dir: Path | None, device: torch.device, *,
                 autocast_dtype: torch.dtype | None = None, per_category: bool = False,
                 coco_eval: int = PYCOCOTOOLS, log=print):
        self.model, self.loader, self.coco = model, loader, coco
        self.output_dir, self.device, self.autocast_dtype = output_dir, device, autocast_dtype
        self.per_category, self.coco_eval, self.log = per_category, coco_eval, log

    def __call__(self, stop: Callable[[], int] | None = None) -> dict[str, float]:
        """{"bbox/AP": ..., ...} on every rank; stop: as evaluate()'s (EvaluationStopped)."""
        try:
            return evaluate(self.model, self.loader, self.coco.ground_truth(),
                            self.coco.category_ids, self.output_dir, self.device,
                            self.autocast_dtype, self.per_category, self.coco_eval, self.log,
                            stop)
        finally:
            end_workers(self.loader)
