"""Peak memory that the RPN losses add, with the tiled anchor matching and with the whole
N x G x A IoU matrix (`match_reference`), on the GPU's code path (all G ground-truth slots,
no CPU trimming), measured on the CPU as the rise in the process's peak resident memory.

    .venv/bin/python tools/bench_rpn_memory.py [--images=2] [--canvas=800x1344]

Each matcher runs in its own fresh process (peak RSS only rises); the inputs are the 8x4
recipe's anchors at the canvas, random head outputs and G = data.max_instances = 100
ground-truth slots of which 20 per image are used. Forward and backward of the two losses,
once (a first call: its time includes the allocations that a warm run would reuse).
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from maskrcnn.config import load_config
from maskrcnn.model import rpn as rpn_module
from maskrcnn.model.maskrcnn import build_model
from maskrcnn.model.sampling import match_reference
from maskrcnn.runtime import Runtime

USED_SLOTS = 20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(matcher: str, images: int, height: int, width: int) -> dict:
    config = load_config("8x4", [f"data {{ canvas {{ height: {height} width: {width} }} }}"])
    model = build_model(config, Runtime.gpu_path())
    if matcher == "whole":
        rpn_module.match = match_reference
    anchors = model.anchors((height, width))
    g = torch.Generator().manual_seed(0)
    objectness = [torch.randn(images, a.shape[0], generator=g).requires_grad_() for a in anchors]
    deltas = [(torch.randn(images, a.shape[0], 4, generator=g) * 0.1).requires_grad_()
              for a in anchors]
    slots = config.data.max_instances
    xy = torch.rand(images, slots, 2, generator=g) * torch.tensor([width - 200, height - 200])
    gt_boxes = torch.cat([xy, xy + 16 + torch.rand(images, slots, 2, generator=g) * 180], -1)
    gt_valid = torch.arange(slots)[None, :].expand(images, -1) < USED_SLOTS
    torch.manual_seed(0)  # the same sampling keys for both matchers
    before = peak_rss_mib()
    start = time.perf_counter()
    losses = model.rpn.losses(objectness, deltas, anchors, gt_boxes, gt_valid)
    sum(losses.values()).backward()
    seconds = time.perf_counter() - start
    return {"matcher": matcher, "images": images, "canvas": f"{height}x{width}",
            "anchors": sum(a.shape[0] for a in anchors), "gt_slots": slots,
            "added_peak_mib": peak_rss_mib() - before, "seconds": seconds,
            "losses": {k: v.item() for k, v in losses.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--canvas", default="800x1344")
    parser.add_argument("--matcher", choices=["tiled", "whole"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    height, width = map(int, args.canvas.split("x"))
    if args.matcher:
        print(json.dumps(measure(args.matcher, args.images, height, width)))
        return
    results = []
    for matcher in ("whole", "tiled"):
        out = subprocess.run([sys.executable, __file__, f"--matcher={matcher}",
                              f"--images={args.images}", f"--canvas={args.canvas}"],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.splitlines()[-1]))
        r = results[-1]
        print(f"{matcher:>5}: {r['added_peak_mib']:7.0f} MiB added by the RPN losses "
              f"({r['images']} images, {r['canvas']}, {r['anchors']} anchors, "
              f"{r['gt_slots']} ground-truth slots), {r['seconds']:.2f} s")
    assert results[0]["losses"] == results[1]["losses"], "the two matchers disagree"
    print(f"tiled / whole: {results[1]['added_peak_mib'] / results[0]['added_peak_mib']:.3f}; "
          "same losses")


if __name__ == "__main__":
    main()
