"""Running a command: absl parses the flags; bad input ends in one line, not a traceback."""

import sys
from collections.abc import Callable

from absl import app

from maskrcnn.config import ConfigError
from maskrcnn.data.coco import DatasetError
from maskrcnn.engine.checkpoint import CheckpointError
from maskrcnn.engine.distributed import DistributedError
from maskrcnn.engine.trainer import NonFiniteLossError


def _one_line(error: Exception) -> str:
    """The user's message of an error. An error raised in a DataLoader worker arrives wrapped
    with the worker's traceback; its last line is the original "module.Class: message"."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def run_command(main: Callable[[], None]) -> None:
    """Parses flags and runs main(); bad input (config, data, checkpoint), a non-finite loss
    and a failed collective (another rank died or hung) exit with one line."""

    def absl_main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        try:
            main()
        except (ConfigError, DatasetError, CheckpointError, NonFiniteLossError,
                DistributedError) as error:
            print(f"error: {_one_line(error)}", file=sys.stderr)
            sys.exit(2)

    app.run(absl_main)
