"""Building datasets and DataLoaders from a config: the one place data config becomes objects."""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from maskrcnn.config import Config, ConfigError
from maskrcnn.config.config_pb2 import DROP
from maskrcnn.data.batch import collate
from maskrcnn.data.coco import CocoDataset, DatasetError
from maskrcnn.data.dataset import DetectionDataset
from maskrcnn.data.sampler import GroupedBatchSampler, evaluation_batches
from maskrcnn.data.synthetic import ensure_synthetic_coco


@dataclass(frozen=True)
class DataPaths:
    train_json: Path
    train_images: Path
    val_json: Path | None
    val_images: Path | None


def cache_dir() -> Path:
    """Where generated data lives: $MASKRCNN_CACHE, else ~/.cache/maskrcnn."""
    return Path(os.environ.get("MASKRCNN_CACHE", Path.home() / ".cache" / "maskrcnn"))


def resolve_data_paths(config: Config) -> DataPaths:
    """The COCO files to read: the configured ones, or the synthetic set (generated once)."""
    data = config.data
    if data.train_json:
        val = (Path(data.val_json), Path(data.val_images)) if data.val_json else (None, None)
        return DataPaths(Path(data.train_json), Path(data.train_images), *val)
    if not data.use_synthetic:
        raise DatasetError("no training data: pass --data_dir, or --train_json and "
                           "--train_images (or use a config with data.use_synthetic)")
    spec = {name: getattr(data.synthetic, name)
            for name in ("seed", "num_train", "num_val", "min_side", "max_side")}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    try:
        root = ensure_synthetic_coco(cache_dir() / f"synthetic-{digest}", **spec)
    except OSError as error:  # e.g. FileExistsError: a foreign folder in the way
        raise DatasetError(f"cannot prepare the synthetic dataset: {error}") from None
    # An explicit val file (e.g. maskrcnn-eval --val_json on a shapes checkpoint) replaces
    # the synthetic val split rather than being ignored.
    val = ((Path(data.val_json), Path(data.val_images)) if data.val_json else
           (root / "annotations" / "instances_val2017.json", root / "val2017"))
    return DataPaths(root / "annotations" / "instances_train2017.json", root / "train2017",
                     *val)


def read_coco(json_path: Path, image_dir: Path, *, train: bool, num_classes: int,
              bad_annotations: int = DROP) -> CocoDataset:
    """Parses an annotation file (bad_annotations: data.bad_annotations, what a faulty
    annotation does) and checks it against the model's class count."""
    coco = CocoDataset(json_path, image_dir, train=train, bad_annotations=bad_annotations)
    if coco.num_classes != num_classes:
        raise DatasetError(f"{json_path} has {coco.num_classes} categories but the config's "
                           f"model.num_classes is {num_classes}")
    coco.check_images_exist()
    return coco


def build_dataset(config: Config, coco: CocoDataset, *, train: bool) -> DetectionDataset:
    data = config.data
    return DetectionDataset(
        coco,
        canvases=[(c.height, c.width) for c in data.canvas],
        short_side=data.short_side,
        max_long_side=data.max_long_side,
        max_instances=data.max_instances,
        gt_mask_size=data.gt_mask_size,
        flip_prob=data.flip_prob if train else 0.0,
        seed=config.run.seed,
    )


def _loader(dataset: DetectionDataset, batch_sampler, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # Its own generator: creating an iterator draws a seed from it, which must not consume
        # the global RNG that the training step samples from (a resumed run starts its
        # iterator at another step, and would then draw different sampling keys).
        generator=torch.Generator().manual_seed(0),
    )


def build_train_loader(config: Config, dataset: DetectionDataset, *, rank: int = 0,
                       world_size: int = 1) -> tuple[DataLoader, GroupedBatchSampler]:
    """This rank's training loader and its sampler (call sampler.set_epoch before each epoch)."""
    images = config.solver.images_per_epoch or len(dataset)
    global_batch = config.run.images_per_gpu * world_size
    if 0 < images < global_batch:
        raise ConfigError(f"an epoch of {images} images (solver.images_per_epoch, 0 = the "
                          f"training set) is shorter than one global batch of {global_batch} "
                          f"(run.images_per_gpu {config.run.images_per_gpu} x {world_size} "
                          "processes)")
    sampler = GroupedBatchSampler(
        dataset.canvas_of,
        config.run.images_per_gpu,
        images_per_epoch=config.solver.images_per_epoch,
        num_replicas=world_size,
        rank=rank,
        seed=config.run.seed,
    )
    return _loader(dataset, sampler, config.data.num_workers), sampler


def build_eval_loader(config: Config, dataset: DetectionDataset, *, rank: int = 0,
                      world_size: int = 1) -> DataLoader:
    """This rank's shard of an evaluation set, each image once."""
    batches = evaluation_batches(dataset.canvas_of, config.run.images_per_gpu,
                                 num_replicas=world_size, rank=rank)
    return _loader(dataset, batches, config.data.num_workers)


def user_message(error: Exception) -> str:
    """The user's one-line message of an error (cli.py prints it; the trainer words a bad
    image's with it). An error raised in a DataLoader worker arrives wrapped with the worker's
    traceback; its last line is the original "module.Class: message"."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text
