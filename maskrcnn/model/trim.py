"""Skipping padded slots where the host can read a count for free.

The model pads per-image sets to static sizes (ground-truth slots G, RoIs R, mask slots F) so that
a GPU step has one shape and no host synchronisation. On a CPU there is no queue of device work
that a host read would drain, so the forward cuts those sets to the slots that are used in some
image of the batch: ground-truth slots in anchor matching, RoI slots (fewer candidates than
RoIs per image, as with a random-weight RPN) in training, detection slots in the mask head at
inference; and the mask head in training runs on the foreground slots only, gathered across
the images. Padded slots are invalid (ground truth, detections) or background (mask slots), so
they add 0 to every loss and gradient and get zero masks: the maths is the same either way
(tests run both). Whether a model trims is its Runtime's `trim_slots` (maskrcnn/runtime.py):
on for a CPU; GPUs, and a compiled step on any device, keep the static sizes.

Shape legend: N images, S slots per image.
"""

import torch


def trimming(trim_slots: bool) -> bool:
    """Whether the forward trims here: asked for (a CPU runtime) and not being compiled."""
    return trim_slots and not torch.compiler.is_compiling()


def used_slots(used: torch.Tensor) -> int:
    """bool[N, S] -> 1 + the last slot used in any image (at least 1, so no set is empty).

    Reads the count on the host: call only where `trimming` is true."""
    position = torch.arange(1, used.shape[1] + 1, device=used.device)
    return max(1, int((used.any(0) * position).max())) if used.shape[1] else 1


def foreground_slots(used: torch.Tensor) -> torch.Tensor:
    """bool[S] -> int64[U] the indices of the used slots (U >= 1: where none is used, slot 0,
    whose weight is then 0, so that the heads still run and every parameter gets a
    gradient). Reads the count on the host: call only where `trimming` is true."""
    index = used.nonzero().squeeze(1)
    return index if index.numel() else torch.zeros(1, dtype=torch.int64, device=used.device)
