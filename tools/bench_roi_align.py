"""CPU micro-benchmark: our multi-level ROIAlign against torchvision's, forward and backward.

torchvision's side is what its Mask R-CNN runs: MultiScaleRoIAlign (level assignment, one
roi_align per level, results scattered back). Both sides pool with aligned=False and sampling
ratio 2, as that model does, from leaf features that require grad; "backward" is the time of
`pooled.backward(grad)` until every level's .grad is filled. Each number is the median of
--runs timed runs after two warm-up runs.

Usage: python tools/bench_roi_align.py [--runs 7] [--threads 2]
"""

import argparse
import statistics
import time

import torch
from torchvision.ops import MultiScaleRoIAlign

from maskrcnn.ops.roi_align import multilevel_roi_align

STRIDES = [4, 8, 16, 32]  # P2..P5
# name, N images, C channels, canvas (H, W), R RoIs in all, output side P
CONFIGS = [
    ("box head", 2, 256, (800, 1344), 1024, 7),
    ("mask head", 2, 256, (800, 1344), 256, 14),
    ("small CPU", 4, 128, (256, 320), 512, 7),
]


def random_rois(n: int, r: int, canvas: tuple[int, int], generator: torch.Generator):
    """float[R, 5] (batch index, x1, y1, x2, y2): R / N boxes per image inside the canvas, sides
    uniform in [16, min(600, canvas side)] px."""
    height, width = canvas
    limits = torch.tensor([min(600.0, width), min(600.0, height)])
    size = 16 + torch.rand(r, 2, generator=generator) * (limits - 16)
    corner = torch.rand(r, 2, generator=generator) * (torch.tensor([width, height]) - size)
    batch = torch.arange(n).repeat_interleave(r // n).float()
    return torch.cat([batch[:, None], corner, corner + size], dim=1)


def timed(fn, runs: int) -> float:
    """Median milliseconds of `fn()` (which returns the seconds it measured) after 2 warm-ups."""
    for _ in range(2):
        fn()
    return statistics.median(fn() for _ in range(runs)) * 1e3


def bench(name, n, c, canvas, r, p, runs):
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(n, c, canvas[0] // s, canvas[1] // s, generator=g).requires_grad_()
                for s in STRIDES]
    rois = random_rois(n, r, canvas, g)
    grad = torch.randn(r, c, p, p, generator=g)
    names = [f"p{i}" for i in range(2, 6)]
    tv_pooler = MultiScaleRoIAlign(names, p, sampling_ratio=2)
    tv_features = dict(zip(names, features, strict=True))
    tv_boxes = list(rois[:, 1:].split(r // n))
    image_shapes = [canvas] * n

    def ours():
        return multilevel_roi_align(features, rois, p, STRIDES, 2, aligned=False)

    def theirs():
        return tv_pooler(tv_features, tv_boxes, image_shapes)

    results = {}
    for side, pool in (("ours", ours), ("torchvision", theirs)):
        def forward(pool=pool):
            start = time.perf_counter()
            with torch.no_grad():
                pool()
            return time.perf_counter() - start

        def backward(pool=pool):
            for f in features:
                f.grad = None
            pooled = pool()
            start = time.perf_counter()
            pooled.backward(grad)
            return time.perf_counter() - start

        results[side] = (timed(forward, runs), timed(backward, runs))
    with torch.no_grad():
        diff = (ours() - theirs()).abs().max().item()
    (fo, bo), (ft, bt) = results["ours"], results["torchvision"]
    print(f"| {name:9} | {n} | {c} | {canvas[0]}x{canvas[1]} | {r} | {p} | {fo:8.1f} | {ft:8.1f} "
          f"| {bo:8.1f} | {bt:8.1f} | {bt / bo:5.1f}x | {diff:.1e} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per number (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.runs} runs, ms; aligned=False, sampling ratio 2")
    print("| config | N | C | canvas | R | P | fwd ours | fwd tv | bwd ours | bwd tv "
          "| bwd speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for config in CONFIGS:
        bench(*config, args.runs)


if __name__ == "__main__":
    main()
