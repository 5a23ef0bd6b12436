"""Running a command: absl parses the flags; bad input ends in one line, not a traceback.

Exit statuses: 0 done; 2 an error of the input or the run (one line on stderr: a config,
dataset or checkpoint error, a checkpoint that cannot be written, a non-finite loss, a failed
collective or a failed rank); 130 / 143 training or evaluation stopped on SIGINT / SIGTERM
(128 + the signal's number; the trainer printed its line); absl's usage errors exit with 1.

With several processes a failure prints one line for the whole job, rank 0's (it names the
rank that failed first and its cause; distributed.end_failed_job).
"""

import signal
import sys
from collections.abc import Callable

from absl import app

from maskrcnn.config import ConfigError
from maskrcnn.data.coco import DatasetError
from maskrcnn.data.loader import user_message
from maskrcnn.engine import distributed
from maskrcnn.engine.checkpoint import CheckpointError
from maskrcnn.engine.distributed import DistributedError
from maskrcnn.engine.evaluate import EvaluationStopped
from maskrcnn.engine.hooks import NonFiniteLossError, TrainingStopped


def run_command(main: Callable[[], None]) -> None:
    """Parses flags and runs main(); bad input (config, data, checkpoint), a checkpoint that
    cannot be written, a non-finite loss and a failed collective or rank (another rank died,
    hung or failed) exit with one line; training or evaluation stopped on a signal exits
    with that signal's status."""

    def absl_main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        try:
            main()
        except (ConfigError, DatasetError, CheckpointError, NonFiniteLossError,
                DistributedError) as error:
            if distributed.end_failed_job():
                print(f"error: {user_message(error)}", file=sys.stderr)
            sys.exit(2)
        except TrainingStopped as stopped:
            sys.exit(stopped.exit_code)
        except EvaluationStopped as stopped:
            if distributed.rank() == 0:
                print(f"received {signal.Signals(stopped.signal_number).name}: evaluation "
                      "stopped, no results written", file=sys.stderr, flush=True)
            sys.exit(128 + stopped.signal_number)

    app.run(absl_main)
