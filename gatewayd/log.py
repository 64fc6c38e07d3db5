"""Log formatting: text for people, JSON lines for machines (SPEC section 6).

Handlers are installed only by the CLI (:func:`setup`); library code just uses
loggers under ``gatewayd.``. The access log is the ``gatewayd.access``
logger: one record per connection when it ends, its fields passed as
``extra={"access": {...}}`` so both formats render the same facts.

What is never logged: Authorization and Cookie headers, query strings (which
often carry tokens), private keys. The access record holds the path only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any, TextIO

ACCESS_LOGGER = "gatewayd.access"

#: Order of the access fields in text lines.
ACCESS_FIELDS = (
    "client",
    "sni",
    "host",
    "path",
    "route",
    "backend",
    "status",
    "bytes_in",
    "bytes_out",
    "duration",
    "end",
)


#: (second, its text): strftime runs once per second of log lines, not per line.
_second: tuple[int, str] = (-1, "")


def _timestamp(record: logging.LogRecord) -> str:
    global _second
    second = int(record.created)
    if _second[0] != second:
        _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_second[1]}.{int(record.msecs):03d}Z"


# Printable ASCII without space, '"' and '\': written as is (the usual value).
_PLAIN_VALUE_RE = re.compile(r'[!#-\[\]-~]+')


def _text_value(value: Any) -> str:
    if value is None or value == "":
        return "-"
    text = str(value)
    if _PLAIN_VALUE_RE.fullmatch(text):
        return text
    # Quoted (JSON string escapes) when it has spaces, quotes or anything not
    # printable: a client-chosen Host or SNI can never put terminal escape
    # sequences or fake fields into a log line.
    if any(c.isspace() or c in '"\\' or not c.isprintable() for c in text):
        return json.dumps(text)
    return text


#: syslog priorities (sd-daemon(3) "<N>" line prefixes) for our levels.
_JOURNAL_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


class TextFormatter(logging.Formatter):
    """``2026-11-25T18:00:00.123Z INFO gatewayd.server: message key=value ...``.

    In a worker process (``[gateway] workers`` > 1) the logger name carries the
    worker's number, ``gatewayd.server[worker 2]:``, like syslog's ``prog[pid]``.

    With ``journal=True`` (stderr is the systemd journal) each line starts
    with its syslog priority, ``<3>`` for errors, so ``journalctl -p err``
    finds them (sd-daemon(3)).
    """

    def __init__(self, journal: bool = False, worker: int | None = None) -> None:
        super().__init__()
        self.journal = journal
        self._tag = f"[worker {worker}]" if worker is not None else ""

    def format(self, record: logging.LogRecord) -> str:
        line = self._format(record)
        if self.journal:
            prefix = f"<{_JOURNAL_PRIORITY.get(record.levelname, 6)}>"
            line = "\n".join(prefix + part for part in line.split("\n"))
        return line

    def _format(self, record: logging.LogRecord) -> str:
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            fields = " ".join(f"{k}={_text_value(access.get(k))}" for k in ACCESS_FIELDS)
            extra = "".join(
                f" {k}={_text_value(v)}" for k, v in access.items() if k not in ACCESS_FIELDS
            )
            line = f"{_timestamp(record)} {record.levelname} {record.name}{self._tag}: {fields}{extra}"
        else:
            line = (
                f"{_timestamp(record)} {record.levelname} {record.name}{self._tag}: "
                f"{record.getMessage()}"
            )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and access fields.

    In a worker process the object also has ``"worker": N``.
    """

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if self._worker is not None:
            obj["worker"] = self._worker
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            obj["message"] = "access"
            obj.update(access)
        else:
            obj["message"] = record.getMessage()
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, separators=(",", ":"), default=str)


def stderr_is_journal() -> bool:
    """True when stderr is connected to the systemd journal ($JOURNAL_STREAM, systemd.exec(5))."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return st.st_dev == int(device) and st.st_ino == int(inode)


def setup(
    level: str = "info", fmt: str = "text", stream: TextIO | None = None, *, worker: int | None = None
) -> None:
    """Send ``gatewayd.*`` logs to stderr (journald picks them up) in ``fmt``.

    ``worker``: the number of this worker process, shown on every line.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    journal = stream is None and stderr_is_journal()
    handler.setFormatter(
        JSONFormatter(worker) if fmt == "json" else TextFormatter(journal=journal, worker=worker)
    )
    # Facts no line of ours shows, which logging would otherwise gather for
    # every record (the logging HOWTO's "Optimization"): the caller's file
    # and line (a stack walk), the thread, the process id (a system call).
    setattr(logging, "_srcfile", None)  # noqa: B010 (a private name, as the HOWTO says)
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger("gatewayd")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
