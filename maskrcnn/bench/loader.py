"""The input pipeline's throughput, without the model (`maskrcnn-benchmark --loader`).

Shape legend: M images per batch (run.images_per_gpu).

On the config's training images (--data_dir, or --train_json and --train_images) at the
config's sizes, the training sampler's first batches of an epoch (warm-up, then timed) are
measured three ways, one after another:
- stages: each step of a sample timed alone, image by image (decode, resize, flip and pad,
  targets: G slots with box-local masks), and collate per batch; the resize also by the PIL
  reference it replaced (data/transforms.py), in turn with the fast one, so a drift in the
  machine's speed hits both alike;
- in-process: whole samples (DetectionDataset[(index, epoch)]) collated into a Batch, in this
  process on one thread, as in a worker: the rate of one worker without the transfer;
- the training DataLoader itself (build_train_loader: collate in the workers, the transfer to
  this process, pinning when there is a GPU) with each worker count asked for: images/s from
  the arrival of the last warm-up batch to that of the last timed one (at least 2 warm-up
  batches per worker, so the workers' start and first prefetch are not timed).
The in-process and DataLoader measurements are repeated in rounds, taking turns, so that a drift
in the machine's speed (others' jobs on a shared machine) hits them alike; the report gives the
median round and the spread.
Then the workers one GPU consuming `gpu_images_per_s` needs at the per-worker rate of the first
worker count asked for (1 by default).
"""

import math
import os
import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch

from maskrcnn.config import Config
from maskrcnn.data.batch import collate
from maskrcnn.data.dataset import DetectionDataset
from maskrcnn.data.loader import build_dataset, build_train_loader, read_coco, resolve_data_paths
from maskrcnn.data.sampler import GroupedBatchSampler
from maskrcnn.data.transforms import (
    load_image,
    pad_to_canvas,
    resize_image,
    resize_image_pil,
)

# (name, what it covers) of the stages, in pipeline order.
STAGES = (
    ("decode", "read and decode the file to uint8 RGB"),
    ("resize", "resize to the config's size (uint8 bilinear)"),
    ("flip + pad", "mirror when flipped, copy into the zeroed canvas"),
    ("targets", "G slots: boxes, classes, box-local masks"),
    ("collate", "stack M samples into a Batch (per image)"),
)


def _with_epoch_length(config: Config, images: int, workers: int) -> Config:
    """A copy of config whose epoch is `images` long, loaded by `workers` workers."""
    copy = type(config)()
    copy.CopyFrom(config)
    copy.solver.images_per_epoch = images
    copy.data.num_workers = workers
    return copy


def _batches(dataset: DetectionDataset, config: Config, count: int) -> list[list[tuple]]:
    """The first `count` training batches of epoch 0 (lists of (index, epoch) keys), as the
    training loader's sampler yields them."""
    m = config.run.images_per_gpu
    sampler = GroupedBatchSampler(dataset.canvas_of, m, images_per_epoch=count * m,
                                  seed=config.run.seed)
    return list(sampler)


def _stage_times(dataset: DetectionDataset, batches: Sequence[list[tuple]]) -> dict:
    """Seconds per image of each stage (and of the PIL reference resize), the mean over the
    batches' images."""
    totals = dict.fromkeys([name for name, _ in STAGES] + ["resize reference"], 0.0)
    json_path = dataset.coco.json_path
    for batch in batches:
        samples = []
        for index, epoch in batch:
            record = dataset.coco.records[index]
            canvas, size, flip = dataset.geometry(index, epoch)
            start = time.perf_counter()
            image = load_image(record.path, json_path, record.height, record.width)
            decoded = time.perf_counter()
            resized = resize_image(image, size)
            resized_at = time.perf_counter()
            resize_image_pil(image, size)
            resized_reference = time.perf_counter()
            pad_to_canvas(resized, canvas, flip)
            padded = time.perf_counter()
            dataset.targets(record)
            done = time.perf_counter()
            for name, seconds in (("decode", decoded - start),
                                  ("resize", resized_at - decoded),
                                  ("resize reference", resized_reference - resized_at),
                                  ("flip + pad", padded - resized_reference),
                                  ("targets", done - padded)):
                totals[name] += seconds
            samples.append(dataset[(index, epoch)])
        start = time.perf_counter()
        collate(samples)
        totals["collate"] += time.perf_counter() - start
    images = sum(len(batch) for batch in batches)
    return {name: seconds / images for name, seconds in totals.items()}


def _in_process(dataset: DetectionDataset, batches: Sequence[list[tuple]]) -> float:
    """images/s of making the batches' samples and collating them, in this process."""
    start = time.perf_counter()
    for batch in batches:
        collate([dataset[key] for key in batch])
    return sum(len(batch) for batch in batches) / (time.perf_counter() - start)


def _loader_rate(config: Config, dataset: DetectionDataset, workers: int, warmup: int,
                 steps: int) -> float:
    """images/s of the training DataLoader with `workers` workers over `steps` batches after
    `warmup` (at least 2 per worker)."""
    m = config.run.images_per_gpu
    loader, sampler = build_train_loader(
        _with_epoch_length(config, (warmup + steps) * m, workers), dataset)
    sampler.set_epoch(0)
    arrivals = [time.perf_counter() for _ in loader]
    del loader  # stops the persistent workers
    return steps * m / (arrivals[-1] - arrivals[warmup - 1])


def _spread(rates: list[float]) -> dict[str, float]:
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def run_loader_benchmark(config: Config, *, steps: int, warmup: int, rounds: int,
                         workers: Sequence[int], gpu_images_per_s: float) -> dict:
    """Every measurement of `--loader`, as the JSON report (without the command line)."""
    paths = resolve_data_paths(config)
    coco = read_coco(paths.train_json, paths.train_images, train=True,
                     num_classes=config.model.num_classes)
    dataset = build_dataset(config, coco, train=True)
    m = config.run.images_per_gpu
    batches = _batches(dataset, config, warmup + steps)
    timed = batches[warmup:]
    data = config.data
    report = {
        "environment": {"cpus": os.cpu_count(), "load_average_start": os.getloadavg()[0],
                        "torch": torch.__version__, "cuda": torch.cuda.is_available()},
        "setup": {
            "train_json": str(paths.train_json), "dataset_images": len(dataset),
            "canvases": [[c.height, c.width] for c in data.canvas],
            "short_side": data.short_side, "max_long_side": data.max_long_side,
            "gt_slots": data.max_instances, "gt_mask_size": data.gt_mask_size,
            "flip_prob": data.flip_prob, "images_per_batch": m, "steps": steps,
            "warmup": warmup, "rounds": rounds,
            "instances_per_image": float(np.mean([
                min(len(coco.records[i].classes), data.max_instances)
                for batch in timed for i, _ in batch])),
        },
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        _stage_times(dataset, batches[:warmup])
        stages = _stage_times(dataset, timed)
        _in_process(dataset, batches[:warmup])
        in_process, loaders = [], {w: [] for w in workers}
        for _ in range(rounds):  # the variants take turns, so a drift hits them alike
            in_process.append(_in_process(dataset, timed))
            for w in workers:
                loaders[w].append(_loader_rate(config, dataset, w, max(warmup, 2 * w), steps))
    finally:
        torch.set_num_threads(threads)
    report["stages"] = [
        {"stage": name, "covers": covers, "ms": stages[name] * 1e3,
         "reference_ms": stages["resize reference"] * 1e3 if name == "resize" else None}
        for name, covers in STAGES]
    report["in_process"] = {"images_per_s": _spread(in_process)}
    report["loader"] = [
        {"workers": w, "warmup_batches": max(warmup, 2 * w), "images_per_s": _spread(rates),
         "images_per_s_per_worker": statistics.median(rates) / w}
        for w, rates in loaders.items()]
    per_worker = report["loader"][0]["images_per_s_per_worker"]
    report["gpu"] = {"images_per_s": gpu_images_per_s,
                     "workers_needed": math.ceil(gpu_images_per_s / per_worker),
                     "at_workers": workers[0]}
    report["environment"]["load_average_end"] = os.getloadavg()[0]
    return report


def format_loader_report(report: dict) -> str:
    """The report as the text the command prints."""
    env, setup = report["environment"], report["setup"]
    canvases = ", ".join(f"{h}x{w}" for h, w in setup["canvases"])
    lines = [
        f"maskrcnn input pipeline: {setup['dataset_images']} training images of "
        f"{setup['train_json']}",
        f"sizes: short side {setup['short_side']}, long side <= {setup['max_long_side']}, "
        f"canvases {canvases}; G = {setup['gt_slots']} slots, {setup['gt_mask_size']}x"
        f"{setup['gt_mask_size']} masks, flip {setup['flip_prob']:g}; "
        f"{setup['instances_per_image']:.1f} instances per timed image",
        f"batches of {setup['images_per_batch']}: {setup['warmup']} warm-up, then "
        f"{setup['steps']} timed, the training sampler's; {env['cpus']} CPUs, load average "
        f"{env['load_average_start']:.2f} at the start, {env['load_average_end']:.2f} at the end",
        "",
        "stages, in this process on one thread (ms per image, mean over the timed images):",
        f"  {'stage':<12}{'ms':>8}{'PIL ref':>9}{'speed-up':>10}  covers",
    ]
    for row in report["stages"]:
        ref = row["reference_ms"]
        lines.append(f"  {row['stage']:<12}{row['ms']:>8.2f}"
                     + (f"{ref:>9.2f}{ref / row['ms']:>9.2f}x" if ref is not None
                        else f"{'':>9}{'':>10}") + f"  {row['covers']}")
    total = sum(row["ms"] for row in report["stages"])
    with_reference = sum(row["reference_ms"] or row["ms"] for row in report["stages"])
    lines.append(f"  {'sum':<12}{total:>8.2f}{with_reference:>9.2f}"
                 f"{with_reference / total:>9.2f}x  (the PIL column: with the reference "
                 f"resize)")
    ips = report["in_process"]["images_per_s"]
    lines += [
        "",
        f"images/s, median of {setup['rounds']} rounds (min..max), the variants in turn:",
        f"  in-process samples + collate, one thread: {ips['median']:>7.1f} "
        f"({ips['min']:.1f}..{ips['max']:.1f})",
    ]
    for row in report["loader"]:
        ips = row["images_per_s"]
        lines.append(f"  training DataLoader, {row['workers']} worker"
                     f"{'s' if row['workers'] > 1 else ' '}:    {ips['median']:>7.1f} "
                     f"({ips['min']:.1f}..{ips['max']:.1f}), "
                     f"{row['images_per_s_per_worker']:.1f} per worker "
                     f"({row['warmup_batches']} warm-up batches)")
    gpu = report["gpu"]
    lines.append(f"one GPU at {gpu['images_per_s']:g} images/s needs {gpu['workers_needed']} "
                 f"workers at the {gpu['at_workers']}-worker rate per worker on this CPU")
    return "\n".join(lines)
