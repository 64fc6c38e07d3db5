"""``gatewayd proxy --from ADDR --to URL``: a gateway from one command line.

End to end: the real command (a child process) in front of a real WebSocket
echo server (websockets, another child), reached by the project's client and
by websockets' client; ``--print-config`` output passes ``gatewayd check``;
usage errors exit 2. Table tests for the pure parts.
"""

from __future__ import annotations

import re
import signal
import ssl
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import websockets.sync.client

from gatewayd.cli import main as cli_main
from gatewayd.oneline import From, UsageError, parse_from, parse_to
from test_cli import QUICK, STOP, environment, free_port, gatewayd, spawn

ECHO_SERVER = textwrap.dedent(
    """
    import sys
    from websockets.sync.server import serve

    def echo(ws):
        for message in ws:
            ws.send(message)

    with serve(echo, "127.0.0.1", int(sys.argv[1])) as server:
        print("ready", flush=True)
        server.serve_forever()
    """
)


@contextmanager
def echo_server(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    with spawn("-c", ECHO_SERVER, str(port), cwd=tmp_path, entry=[sys.executable]) as child:
        child.wait_for("ready", "stdout")
        yield port


def client(url: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gatewayd.client", "--timeout", "5", url, *args],
        cwd=cwd, env=environment(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=QUICK,
    )


def test_self_signed_proxy_serves_and_stops_like_run(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with echo_server(tmp_path) as backend:
        port = free_port()
        args = ("proxy", "--from", f"127.0.0.1:{port}", "--to", f"127.0.0.1:{backend}", "--self-signed", "localhost",
                "--dir", str(state))
        with spawn(*args, cwd=tmp_path) as child:
            child.wait_for(re.escape(f"gatewayd proxy: wss://localhost:{port}/ -> ws://127.0.0.1:{backend}"))
            child.wait_for(r"listening on 127\.0\.0\.1:")
            ca = state / "ca.pem"
            assert f"--cafile {ca}" in child.stderr
            # Every path goes to the backend, by name and by address (the certificate has both).
            done = client(f"wss://localhost:{port}/any/path?q=1", "--cafile", str(ca), "hello", cwd=tmp_path)
            assert (done.returncode, done.stdout) == (0, "hello\n"), done.stderr
            context = ssl.create_default_context(cafile=str(ca))
            with websockets.sync.client.connect(f"wss://localhost:{port}/", ssl=context, open_timeout=5) as ws:
                ws.send("from websockets")
                assert ws.recv(timeout=5) == "from websockets"
            child.wait_for(r"gatewayd\.access: .*path=/any/path .*status=101")
            child.process.send_signal(signal.SIGINT)
            assert child.wait_exit(STOP) == 0, child.describe()
    assert "SIGINT received: shutting down" in child.stderr


def test_plain_proxy_with_several_backends_and_admin(tmp_path: Path) -> None:
    with echo_server(tmp_path) as one, echo_server(tmp_path) as two:
        port, admin = free_port(), free_port()
        args = ("proxy", "--from", f"ws://127.0.0.1:{port}", "--to", f"ws://127.0.0.1:{one}",
                "--to", f"127.0.0.1:{two}", "--admin", f"127.0.0.1:{admin}")
        with spawn(*args, cwd=tmp_path) as child:
            child.wait_for(r"listening on 127\.0\.0\.1:")
            for word in ("a", "b", "c", "d"):
                done = client(f"ws://127.0.0.1:{port}/", word, cwd=tmp_path)
                assert (done.returncode, done.stdout) == (0, f"{word}\n"), done.stderr
            child.wait_for(rf"backend=ws://127\.0\.0\.1:{one}\b")
            child.wait_for(rf"backend=ws://127\.0\.0\.1:{two}\b")  # round robin: both used
            child.process.send_signal(signal.SIGTERM)
            assert child.wait_exit(STOP) == 0, child.describe()


def test_print_config_passes_check_and_is_what_runs(tmp_path: Path) -> None:
    done = gatewayd(
        "proxy", "--from", "127.0.0.1:8443", "--to", "ws://127.0.0.1:9000/app", "--self-signed", "chat.test",
        "--dir", str(tmp_path / "state"), "--print-config", cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# Written by: gatewayd proxy --from 127.0.0.1:8443 ")
    assert "--print-config" not in done.stdout
    assert 'address = "127.0.0.1:8443"' in done.stdout
    assert 'names = ["chat.test"]' in done.stdout
    assert 'backend = "ws://127.0.0.1:9000/app"' in done.stdout
    assert f'certificate = "{tmp_path / "state" / "chat.test.pem"}"' in done.stdout
    path = tmp_path / "proxy.toml"
    path.write_text(done.stdout)
    checked = gatewayd("check", "-c", str(path), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert re.search(r"/\*  .*->  ws://127\.0\.0\.1:9000/app", checked.stdout), checked.stdout


def test_cert_and_key_name_the_host_from_the_certificate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import trustme

    leaf = trustme.CA().issue_cert("ws.example.net", "alt.example.net")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "c.key"))
    code = cli_main(["proxy", "--from", ":8443", "--to", ":9000", "--cert", str(tmp_path / "c.pem"),
                     "--key", str(tmp_path / "c.key"), "--print-config"])
    out = capsys.readouterr().out
    assert code == 0
    assert 'names = ["ws.example.net", "alt.example.net"]' in out
    assert 'address = "0.0.0.0:8443"' in out and 'backend = "ws://127.0.0.1:9000"' in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", ":8443", "--to", ":9000"], "a TLS listener needs --cert FILE --key FILE or --self-signed NAME"),
        (["--from", ":8443", "--to", ":9000", "--cert", "c.pem"], "--cert and --key go together"),
        (["--from", "ws://:8080", "--to", ":9000", "--self-signed", "x"], "is plain ws://: no certificate is used"),
        (["--from", "https://x", "--to", ":9000"], "the scheme is ws:// (plain) or wss:// (TLS, the default)"),
        (["--from", ":8443/chat", "--to", ":9000"], "an address has no path"),
        (["--from", ":99999", "--to", ":9000"], "the port is not a number from 1 to 65535"),
        (["--from", "ws://:80", "--to", "http://x"], "unsupported scheme"),
        (["--from", "ws://:80", "--to", "justaname"], "give a URL (ws://HOST:PORT/PATH) or HOST:PORT"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["proxy", *args, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gatewayd proxy: ") and message in err, err


def test_a_missing_certificate_is_a_configuration_error(tmp_path: Path) -> None:
    done = gatewayd("proxy", "--from", "127.0.0.1:1", "--to", ":9", "--cert", "no.pem", "--key", "no.key", cwd=tmp_path)
    assert done.returncode == 1
    assert f"host[0].certificate: file not found: {tmp_path / 'no.pem'}" in done.stderr
    assert "shown by --print-config" in done.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":8443", From(True, "0.0.0.0:8443", None, 8443)),
        ("127.0.0.1:8443", From(True, "127.0.0.1:8443", None, 8443)),
        ("[::1]:8443", From(True, "[::1]:8443", None, 8443)),
        ("Chat.Example.com", From(True, "0.0.0.0:443", "chat.example.com", 443)),
        ("wss://chat.example.com:8443", From(True, "0.0.0.0:8443", "chat.example.com", 8443)),
        ("ws://:8080", From(False, "0.0.0.0:8080", None, 8080)),
        ("ws://", From(False, "0.0.0.0:80", None, 80)),
    ],
)
def test_parse_from(text: str, expected: From) -> None:
    assert parse_from(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("localhost:9000", "ws://localhost:9000"),
        (":9000", "ws://127.0.0.1:9000"),
        ("ws://10.0.0.5:9000/v2/", "ws://10.0.0.5:9000/v2/"),
        ("wss://api.internal/ws", "wss://api.internal/ws"),
        ("unix:/run/app.sock", "unix:/run/app.sock"),
        ("tcp://127.0.0.1:5900", "tcp://127.0.0.1:5900"),
    ],
)
def test_parse_to(text: str, expected: str) -> None:
    assert parse_to(text) == expected


def test_parse_from_rejects_a_bracketed_name() -> None:
    with pytest.raises(UsageError, match="is not an IPv6 address"):
        parse_from("[nope]:1")
