"""Every process the benchmark starts, so that every one is stopped at the end, also on failure.

bench/run.py and bench/http_rows.py start their processes with :func:`spawn`;
run.py's ``main`` calls :func:`stop_all` in its ``finally`` (after an error, a
timeout, Ctrl-C or SIGTERM too). Processes started in a session of their own
(the proxies, which may fork: websockify, nginx's worker, gatewayd's workers)
are stopped with their whole process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any

STARTED: list[subprocess.Popen[Any]] = []
#: Those of STARTED that lead a process group of their own (start_new_session=True).
LEADERS: set[int] = set()


def spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    proc: subprocess.Popen[Any] = subprocess.Popen(argv, **kwargs)
    STARTED.append(proc)
    if kwargs.get("start_new_session"):
        LEADERS.add(proc.pid)
    return proc


def stop_all() -> None:
    """SIGKILL whatever is still running (and its process group when it has one of its own)."""
    for proc in reversed(STARTED):
        # A group's id is not given to a new process while the group has members.
        if proc.pid in LEADERS:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, OSError):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    STARTED.clear()
    LEADERS.clear()
