"""Accuracy of bf16 inference against fp32 on the checked-in trained model
(tests/assets/shapes-tiny), eager and through the export path (BENCHMARKS.md).

Run from the repository root: PYTHONPATH=. .venv/bin/python tools/bf16_accuracy.py [aoti]
Prints COCO box and mask AP on 64 held-out synthetic val images (seed 1) for each variant, and
the agreement of each variant's detections (score >= 0.3) with fp32 eager's: the fraction
matched by a detection of the same class at box IoU >= 0.9, and the largest score change.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

from maskrcnn.config import config_pb2
from maskrcnn.data.synthetic import generate_synthetic_coco
from maskrcnn.engine import checkpoint as ckpt
from maskrcnn.engine import deploy
from maskrcnn.engine.evaluate import load_ground_truth, score
from maskrcnn.engine.predictions import predict
from maskrcnn.model.maskrcnn import build_model
from maskrcnn.runtime import Runtime
from tests.shapes_checkpoint import config, write_checkpoint

CANVAS = (96, 128)
THRESHOLD = 0.3


def box_iou(a, b):
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = w * h
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def agreement(reference, other):
    matched = total = 0
    worst = 0.0
    for ref, oth in zip(reference, other, strict=True):
        for r in [r for r in ref if r["score"] >= THRESHOLD]:
            total += 1
            best = max((o for o in oth if o["category_id"] == r["category_id"]),
                       key=lambda o: box_iou(r["bbox"], o["bbox"]), default=None)
            if best is not None and box_iou(r["bbox"], best["bbox"]) >= 0.9:
                matched += 1
                worst = max(worst, abs(best["score"] - r["score"]))
    return matched, total, worst


def main():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = generate_synthetic_coco(tmp / "data", seed=1, num_train=0, num_val=64,
                                       min_side=96, max_side=128)
        paths = sorted((root / "val2017").iterdir())
        gt_json = root / "annotations" / "instances_val2017.json"
        gt = load_ground_truth(gt_json)
        ids = {img["file_name"]: img["id"] for img in json.loads(gt_json.read_text())["images"]}
        state = ckpt.load(write_checkpoint(tmp / "step.pt"))
        fp32 = deploy.at_canvas(config(), CANVAS)
        fp32.run.precision = config_pb2.FP32
        bf16 = deploy.at_canvas(config(), CANVAS)
        bf16.run.precision = config_pb2.BF16
        cpu = torch.device("cpu")

        def results(model, cfg):
            out = predict(model, paths, cfg, cpu, state["category_ids"])
            per_image = []
            for path, (_, rs) in zip(paths, out, strict=True):
                for r in rs:
                    r["image_id"] = ids[path.name]
                per_image.append(rs)
            return per_image

        eager = build_model(fp32, Runtime.for_device(cpu))
        eager.load_state_dict(state["model"])
        variants = {"eager fp32": results(eager, fp32), "eager bf16": results(eager, bf16)}
        static = build_model(fp32, Runtime.gpu_path())
        static.load_state_dict(state["model"])
        inputs = deploy.example_inputs(fp32, CANVAS, 1, cpu)
        formats = ["pt2"] + (["aoti"] if "aoti" in sys.argv else [])
        for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            program = deploy.export_program(static, inputs, dtype)
            for fmt in formats:
                path = tmp / f"{precision}-{fmt}.pt2"
                deploy.save(program, fmt, path, inputs, freeze=True)
                Path(f"{path}.json").write_text(json.dumps(deploy.metadata(
                    fp32, fmt, 1, "cpu", state["category_ids"], state["class_names"])))
                variants[f"{fmt} {precision}"] = results(deploy.ExportedModel(path), fp32)
        reference = variants["eager fp32"]
        for name, per_image in variants.items():
            flat = [r for rs in per_image for r in rs]
            metrics = score(gt, flat, log=lambda *_: None)
            m, t, worst = agreement(reference, per_image)
            print(f"{name:<12} box AP {metrics['bbox/AP']:.4f}  mask AP {metrics['segm/AP']:.4f}"
                  f"  detections {len(flat)}  matched {m}/{t} fp32 eager detections (score >= "
                  f"{THRESHOLD}, same class, box IoU >= 0.9), largest score change {worst:.4f}",
                  flush=True)


if __name__ == "__main__":
    main()
