"""TensorBoard event files, written by tensorboardX.

tensorboardX is a maintained writer of TensorBoard's event format that needs neither
TensorFlow nor TensorBoard, and its protobuf requirement (>= 3.20) fits ours. (The project
once wrote the few protobuf fields of a scalar event by hand; that encoder is gone.)
TensorBoard reads the folder: `tensorboard --logdir runs/NAME/events`.
"""

from pathlib import Path

from tensorboardX import SummaryWriter


class EventWriter:
    """Appends scalar summaries to a new event file in a folder."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        before = set(folder.glob("events.out.tfevents.*"))
        self._writer = SummaryWriter(str(folder))
        # The file the writer created (at most one new one per writer).
        self.path = max(set(folder.glob("events.out.tfevents.*")) - before,
                        key=lambda p: p.stat().st_mtime)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
