"""Grouped, seeded, sharded batch samplers."""

import numpy as np
import pytest

from maskrcnn.data.sampler import GroupedBatchSampler, evaluation_batches

GROUPS = np.array([0, 1] * 20 + [0] * 11)  # 51 images on two canvases, unevenly


def _indices(sampler):
    return [[i for i, _ in batch] for batch in sampler]


def test_batches_share_a_canvas_and_carry_the_epoch():
    """If this fails, a batch mixes canvases (shapes would not stack) or loses its epoch."""
    sampler = GroupedBatchSampler(GROUPS, 4, seed=3)
    sampler.set_epoch(5)
    batches = list(sampler)
    assert len(batches) == sampler.steps_per_epoch == 51 // 4
    for batch in batches:
        assert len(batch) == 4 and {e for _, e in batch} == {5}
        assert len({int(GROUPS[i]) for i, _ in batch}) == 1


def test_order_depends_on_seed_and_epoch_only():
    """If this fails, data order is not reproducible, or every epoch repeats the same order."""
    a, b = GroupedBatchSampler(GROUPS, 4, seed=3), GroupedBatchSampler(GROUPS, 4, seed=3)
    a.set_epoch(1)
    b.set_epoch(1)
    assert _indices(a) == _indices(b)
    b.set_epoch(2)
    assert _indices(a) != _indices(b)
    assert _indices(GroupedBatchSampler(GROUPS, 4, seed=4)) != _indices(a)


def test_ranks_take_disjoint_slices_of_the_same_global_batches():
    """If this fails, ranks overlap, drift out of step, or differ from one process running
    the whole global batch (sharding would change the data)."""
    single = GroupedBatchSampler(GROUPS, 6, seed=0)
    ranks = [GroupedBatchSampler(GROUPS, 2, num_replicas=3, rank=r, seed=0) for r in range(3)]
    per_rank = [_indices(s) for s in ranks]
    assert all(len(p) == len(single) for p in per_rank)
    for step, whole in enumerate(_indices(single)):
        assert sum((p[step] for p in per_rank), []) == whole


def test_resume_mid_epoch_continues_the_same_order():
    """If this fails, a resumed run would see different batches than an uninterrupted one."""
    sampler = GroupedBatchSampler(GROUPS, 4, seed=0)
    sampler.set_epoch(2)
    full = _indices(sampler)
    sampler.set_epoch(2, start_step=5)
    assert len(sampler) == len(full) - 5 and _indices(sampler) == full[5:]


def test_epoch_length_in_images():
    """If this fails, epochs are not counted in images as the configs say."""
    long = GroupedBatchSampler(GROUPS, 4, images_per_epoch=200)
    assert len(list(long)) == 50  # more than one pass over 51 images
    short = GroupedBatchSampler(GROUPS, 4, images_per_epoch=20, num_replicas=2)
    assert len(short) == 2
    with pytest.raises(ValueError, match="shorter than one global batch"):
        GroupedBatchSampler(GROUPS, 4, images_per_epoch=3)


def test_within_one_pass_no_image_repeats():
    """If this fails, an epoch no longer than the data set shows some images twice."""
    sampler = GroupedBatchSampler(GROUPS, 4, seed=9)
    seen = sum(_indices(sampler), [])
    assert len(seen) == len(set(seen))


def test_evaluation_batches_cover_every_image_once():
    """If this fails, evaluation would skip or double-count images."""
    for world in (1, 2, 3):
        seen = []
        for rank in range(world):
            for batch in evaluation_batches(GROUPS, 4, num_replicas=world, rank=rank):
                assert 1 <= len(batch) <= 4
                assert len({int(GROUPS[i]) for i, _ in batch}) == 1
                seen += [i for i, _ in batch]
        assert sorted(seen) == list(range(len(GROUPS)))
