"""Batch samplers: aspect-ratio grouping by canvas, seeded per epoch, sharded across ranks.

Training (`GroupedBatchSampler`): every rank computes the same global batches of
M x world_size images, all from one canvas, and takes its own M-slice of each, so ranks step in
lockstep on the same canvas and the shards never overlap. The order depends only on
(seed, epoch): changing the number of workers does not change it, and a resumed run can skip
to any step of an epoch. Items are (dataset index, epoch) pairs, which DetectionDataset takes.
"""

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class GroupedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Training batches of `batch_size` indices sharing a canvas.

    Args:
        groups: int[D] canvas of each dataset index.
        batch_size: M, images per rank and step.
        images_per_epoch: images in one epoch over all ranks (0 = D); rounded down to whole
            global batches. An epoch longer than D draws further shuffled passes.
        num_replicas, rank: world size and this process's rank.
        seed: base seed of the order.
    """

    def __init__(self, groups: Sequence[int], batch_size: int, *, images_per_epoch: int = 0,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.groups = np.asarray(groups, dtype=np.int64)
        if len(self.groups) == 0:
            raise ValueError("the training set is empty")
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.global_batch = batch_size * num_replicas
        self.steps_per_epoch = (images_per_epoch or len(self.groups)) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"an epoch of {images_per_epoch or len(self.groups)} images is "
                             f"shorter than one global batch of {self.global_batch}")
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Selects the epoch to iterate, starting at a step within it (for resuming)."""
        self.epoch = epoch
        self.start_step = start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's global batches: int[M x world] dataset indices each, one canvas each.

        Indices are taken in a shuffled order and collected per canvas; a canvas's batch is
        emitted as soon as it is full. Further shuffled passes are drawn until the epoch has
        its steps.
        """
        rng = np.random.default_rng([self.seed, epoch])
        pending: dict[int, list[int]] = {}
        batches: list[np.ndarray] = []
        while len(batches) < self.steps_per_epoch:
            for index in rng.permutation(len(self.groups)).tolist():
                bucket = pending.setdefault(int(self.groups[index]), [])
                bucket.append(index)
                if len(bucket) == self.global_batch:
                    batches.append(np.array(bucket))
                    bucket.clear()
                    if len(batches) == self.steps_per_epoch:
                        break
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for batch in self.global_batches(self.epoch)[self.start_step:]:
            yield [(int(i), self.epoch) for i in batch[lo:hi]]


def evaluation_batches(groups: Sequence[int], batch_size: int, *, num_replicas: int = 1,
                       rank: int = 0) -> list[list[tuple[int, int]]]:
    """Every index of this rank's shard (rank, rank + world, ...) once, in order, batched by
    canvas; the last batch of a canvas may be short. Items are (index, 0) pairs."""
    groups = np.asarray(groups, dtype=np.int64)
    shard = np.arange(rank, len(groups), num_replicas)
    batches = []
    for canvas in np.unique(groups[shard]).tolist():
        members = shard[groups[shard] == canvas].tolist()
        batches += [[(i, 0) for i in members[k:k + batch_size]]
                    for k in range(0, len(members), batch_size)]
    return batches
