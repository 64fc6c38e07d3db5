"""Log formats: text, JSON, journald priority prefixes."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from gatewayd.log import JSONFormatter, TextFormatter


def record(level: int, message: str, access: dict[str, object] | None = None) -> logging.LogRecord:
    rec = logging.LogRecord("gatewayd.server", level, __file__, 1, message, (), None)
    rec.created = 1795622400.25
    rec.msecs = 250
    if access is not None:
        rec.access = access
    return rec


@pytest.mark.parametrize(
    "level, prefix",
    [(logging.DEBUG, "<7>"), (logging.INFO, "<6>"), (logging.WARNING, "<4>"), (logging.ERROR, "<3>")],
)
def test_journal_priority_prefix(level: int, prefix: str) -> None:
    line = TextFormatter(journal=True).format(record(level, "hello"))
    assert line.startswith(prefix + "2026-")
    assert TextFormatter().format(record(level, "hello")).startswith("2026-")


def test_text_and_json_access_lines() -> None:
    access = {"client": "1.2.3.4:5", "sni": None, "path": "/a b", "status": 101, "end": "client_close"}
    text = TextFormatter().format(record(logging.INFO, "access", access))
    assert text.endswith('client=1.2.3.4:5 sni=- host=- path="/a b" route=- backend=- status=101 '
                         "bytes_in=- bytes_out=- duration=- end=client_close")
    obj = json.loads(JSONFormatter().format(record(logging.INFO, "access", access)))
    assert obj["level"] == "info" and obj["status"] == 101 and obj["path"] == "/a b"


def test_journal_detected_from_journal_stream(tmp_path: Path) -> None:
    """$JOURNAL_STREAM naming stderr's device:inode turns the prefixes on."""
    err = tmp_path / "stderr"
    script = (
        "import logging, os, sys\n"
        "st = os.fstat(2)\n"
        "os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}' if sys.argv[1] == 'yes' else '1:2'\n"
        "from gatewayd import log\n"
        "log.setup('info', 'text')\n"
        "logging.getLogger('gatewayd.x').error('boom')\n"
    )
    for mode, expected in (("yes", "<3>"), ("no", "2")):
        with err.open("w") as handle:
            subprocess.run([sys.executable, "-c", script, mode], stderr=handle, timeout=30, check=True)
        assert err.read_text().startswith(expected), err.read_text()


@pytest.mark.parametrize(
    "value, rendered",
    [("plain", "plain"), ("a b", '"a b"'), ("zz\x1b]0;pwned\x07", '"zz\\u001b]0;pwned\\u0007"'), ("", "-"), (None, "-")],
)
def test_text_values_never_carry_control_characters(value: object, rendered: str) -> None:
    line = TextFormatter().format(record(logging.INFO, "access", {"sni": value}))
    assert f" sni={rendered} " in line
