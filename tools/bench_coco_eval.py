"""Times COCO scoring with pycocotools against faster-coco-eval on a results file of COCO
val2017's size, and checks that both give the same 12 numbers.

    python tools/bench_coco_eval.py [--copies=50] [--per_result=14] [--rounds=2]

The cocoapi's demo ground truth (100 val2014 images, 839 annotations) and its fake bbox and
segm results (734 each) in tests/assets/cocoapi-eval are tiled `copies` times under new image
and annotation ids (50 copies: 5000 images and 41,950 annotations, val2017 has 5000 and
36,781), and every fake result is repeated `per_result` times with its box jittered and its
score lowered (14: about 100 detections an image, as a Mask R-CNN at
detections_per_image = 100 writes). Both implementations score the same files through
maskrcnn.engine.evaluate.score, taking turns for `rounds` rounds.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from maskrcnn.config.config_pb2 import FASTER_COCO_EVAL, PYCOCOTOOLS
from maskrcnn.engine.evaluate import STAT_NAMES, coco_api, load_ground_truth, score

ASSETS = Path(__file__).resolve().parents[1] / "tests" / "assets" / "cocoapi-eval"


def tile(copies: int, per_result: int, out: Path) -> tuple[Path, dict[str, Path]]:
    """Writes the tiled ground truth and results under out; returns their paths."""
    gt = json.loads((ASSETS / "instances_val2014_100.json").read_text())
    stride = max(image["id"] for image in gt["images"]) + 1
    images, annotations = [], []
    for copy in range(copies):
        images += [{**image, "id": image["id"] + copy * stride} for image in gt["images"]]
        annotations += [{**ann, "id": len(annotations) + k + 1,
                         "image_id": ann["image_id"] + copy * stride}
                        for k, ann in enumerate(gt["annotations"])]
    gt_path = out / "gt.json"
    gt_path.write_text(json.dumps({**gt, "images": images, "annotations": annotations}))
    rng = np.random.default_rng(0)
    results = {}
    for iou_type in ("bbox", "segm"):
        fake = json.loads((ASSETS / f"instances_val2014_fake{iou_type}100_results.json")
                          .read_text())
        tiled = []
        for copy in range(copies):
            for r in fake:
                for k in range(per_result):
                    result = {**r, "image_id": r["image_id"] + copy * stride,
                              "score": r["score"] * (0.9 ** k)}
                    if "bbox" in r and k:
                        x, y, w, h = r["bbox"]
                        dx, dy = rng.normal(0, 0.1, 2) * [w, h]
                        result["bbox"] = [x + dx, y + dy, w, h]
                    tiled.append(result)
        results[iou_type] = out / f"{iou_type}.json"
        results[iou_type].write_text(json.dumps(tiled))
    return gt_path, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=50)
    parser.add_argument("--per_result", type=int, default=14)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        gt_path, results = tile(args.copies, args.per_result, Path(folder))
        backends = {"pycocotools": coco_api(PYCOCOTOOLS),
                    "faster-coco-eval": coco_api(FASTER_COCO_EVAL)}
        gts = {name: load_ground_truth(gt_path, api) for name, api in backends.items()}
        sizes = {t: len(json.loads(p.read_text())) for t, p in results.items()}
        print(f"{len(gts['pycocotools'].imgs)} images, {len(gts['pycocotools'].anns)} "
              f"annotations; results: " + ", ".join(f"{t} {n}" for t, n in sizes.items()))
        for iou_type, path in results.items():
            detections = json.loads(path.read_text())
            times: dict[str, list[float]] = {name: [] for name in backends}
            stats = {}
            for _ in range(args.rounds):
                for name, api in backends.items():
                    start = time.perf_counter()
                    metrics = score(gts[name], detections, (iou_type,), api=api,
                                    log=lambda text: None)
                    times[name].append(time.perf_counter() - start)
                    stats[name] = np.array([metrics[f"{iou_type}/{n}"] for n in STAT_NAMES])
            difference = np.abs(stats["pycocotools"] - stats["faster-coco-eval"]).max()
            slow, fast = (np.median(times[n]) for n in backends)
            print(f"{iou_type}: pycocotools {slow:.1f} s, faster-coco-eval {fast:.1f} s "
                  f"(median of {args.rounds}; {slow / fast:.1f}x), "
                  f"AP {stats['pycocotools'][0]:.6f}, largest difference of the 12 numbers "
                  f"{difference:.1e}")


if __name__ == "__main__":
    main()
