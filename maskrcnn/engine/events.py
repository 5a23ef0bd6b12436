"""TensorBoard event files, written by tensorboardX.

tensorboardX is a maintained writer of TensorBoard's event format that needs neither
TensorFlow nor TensorBoard, and its protobuf requirement (>= 3.20) fits ours. (The project
once wrote the few protobuf fields of a scalar event by hand; that encoder is gone.)
TensorBoard reads the folder: `tensorboard --logdir runs/NAME/events`.
"""

import itertools
import os
from pathlib import Path

from tensorboardX import SummaryWriter

_WRITERS = itertools.count()  # writers made by this process


class EventWriter:
    """Appends scalar summaries to a new event file in a folder."""

    def __init__(self, folder: Path):
        # tensorboardX names the file by the second and the host only; two writers of one
        # second (a run resumed at once) would share it, so each gets its own suffix.
        suffix = f".{os.getpid()}.{next(_WRITERS)}"
        self._writer = SummaryWriter(str(folder), filename_suffix=suffix)
        (self.path,) = Path(folder).glob(f"events.out.tfevents.*{suffix}")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
