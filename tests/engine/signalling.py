"""Running a command in a subprocess and sending it a signal once training has started."""

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

from tests.tiny import REPO


def signal_once_started(args: list[str], env: dict[str, str],
                        send: Callable[[subprocess.Popen], None], *, started: str = "step 2/",
                        timeout_s: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """Runs `python args` in its own session; at the first stdout line that starts with
    `started` (a step's log line: training is under way), calls send(process) once; returns
    the CompletedProcess and the seconds from send to the end. A run still going after
    timeout_s is killed with its whole process group (returncode -9), so a hang fails the test
    instead of stalling it."""
    with tempfile.TemporaryFile("w+") as stderr:  # a file: a full stderr pipe cannot block it
        process = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=stderr,
                                   start_new_session=True)
        watchdog = threading.Timer(timeout_s, os.killpg, (process.pid, signal.SIGKILL))
        watchdog.start()
        lines, sent_at = [], None
        try:
            for line in process.stdout:
                lines.append(line)
                if sent_at is None and line.startswith(started):
                    send(process)
                    sent_at = time.monotonic()
            process.wait()
        finally:
            watchdog.cancel()
        stderr.seek(0)
        result = subprocess.CompletedProcess(process.args, process.returncode, "".join(lines),
                                             stderr.read())
    assert sent_at is not None, f"no line starting with {started!r}:\n{result.stdout[-3000:]}"
    return result, time.monotonic() - sent_at
