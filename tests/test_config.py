"""Tests for gatewayd.config: loading, every error kind, the locator, the summary.

Most cases start from ``VALID`` (below, with its line numbers) and change one
line, so the expected line numbers stay readable: ``make(route='x = 1')``
puts ``x = 1`` on line 18, in ``[[host.route]]``.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from gatewayd import config
from gatewayd.config import KNOWN_KEYS, NOT_YET_SUPPORTED, Address, BackendTarget
from gatewayd.config.locate import Locator
from gatewayd.errors import ConfigError, ConfigErrors
from gatewayd.headers import CLIENT_ADDRESS_HEADERS, HOP_BY_HOP

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
FILE = "gatewayd.toml"
NOT_YET = "not supported by this version of gatewayd yet"

#  1 [gateway]
#  2 {gateway}
#  3 [log]
#  4 {log}
#  5 [tls]
#  6 {tls}
#  7 [[listener]]
#  8 address = "127.0.0.1:0"
#  9 {listener}
# 10 [[host]]
# 11 names = ["chat.example.com"]
# 12 certificate = "certs/chat.crt"
# 13 private_key = "certs/chat.key"
# 14 {host}
# 15 [[host.route]]
# 16 path = "/chat"
# 17 backend = "ws://127.0.0.1:9000/chat"
# 18 {route}
# 19 {extra}
TEMPLATE = """\
[gateway]
{gateway}
[log]
{log}
[tls]
{tls}
[[listener]]
address = "127.0.0.1:0"
{listener}
[[host]]
names = ["chat.example.com"]
certificate = "certs/chat.crt"
private_key = "certs/chat.key"
{host}
[[host.route]]
path = "/chat"
backend = "ws://127.0.0.1:9000/chat"
{route}
{extra}
"""


def make(
    *,
    gateway: str = "",
    log: str = "",
    tls: str = "",
    listener: str = "",
    host: str = "",
    route: str = "",
    extra: str = "",
    replace: dict[str, str] | None = None,
) -> str:
    """The template with one-line slots filled and whole lines replaced.

    Slots other than ``extra`` must stay single lines, and replacements keep
    the line (an empty replacement leaves an empty line), so line numbers
    never move.
    """
    for slot in (gateway, log, tls, listener, host, route):
        assert "\n" not in slot
    lines = TEMPLATE.format(
        gateway=gateway, log=log, tls=tls, listener=listener, host=host, route=route, extra=extra
    ).split("\n")
    for old, new in (replace or {}).items():
        assert "\n" not in new
        assert lines.count(old) == 1, old
        lines[lines.index(old)] = new
    return "\n".join(lines)


VALID = make()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with the template's certificate files (dummies), made the cwd.

    Messages name the file as given, so loading "gatewayd.toml" from here
    gives short, exact messages.
    """
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "chat.crt").write_text("dummy certificate\n")
    (tmp_path / "certs" / "chat.key").write_text("dummy key\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def load_errors(text: str) -> list[ConfigError]:
    with pytest.raises(ConfigErrors) as info:
        config.loads(text, FILE)
    return list(info.value.errors)


def as_tuples(errors: list[ConfigError]) -> list[tuple[int | None, str, str, str | None]]:
    return [(e.line, e.key_path, e.message, e.suggestion) for e in errors]


# ---------------------------------------------------------------------------
# Valid files
# ---------------------------------------------------------------------------


def test_template_is_valid_and_defaults_are_the_spec_ones(workdir: Path) -> None:
    cfg = config.loads(VALID, FILE)

    assert cfg.path == workdir / FILE
    assert cfg.gateway == config.GatewaySettings(
        workers=1,
        max_connections=10000,
        handshake_timeout=10.0,
        backend_connect_timeout=5.0,
        idle_timeout=0.0,
        shutdown_timeout=30.0,
        max_request_head=16384,
        server_header="gatewayd",
    )
    assert cfg.log == config.LogSettings(level="info", format="text", access_log=True)
    assert cfg.tls == config.TLSSettings(
        min_version="TLSv1.2", ciphers="ECDHE+AESGCM:ECDHE+CHACHA20"
    )
    assert cfg.listeners == (
        config.ListenerConfig(address=Address("127.0.0.1", 0), tls=True, index=0),
    )
    (host,) = cfg.hosts
    assert host.names == ("chat.example.com",)
    assert host.certificate == workdir / "certs" / "chat.crt"
    assert host.private_key == workdir / "certs" / "chat.key"
    assert host.default is False
    assert host.index == 0
    assert host.tls == cfg.tls
    (route,) = host.routes
    assert route == config.RouteConfig(
        path="/chat",
        path_prefix=None,
        backend=BackendTarget(
            url="ws://127.0.0.1:9000/chat", scheme="ws", host="127.0.0.1", port=9000, path="/chat"
        ),
        origins=(),
        subprotocols=(),
        extensions=True,
        key_path="host[0].route[0]",
    )
    assert cfg.needs_tls


@pytest.mark.parametrize(
    ("line", "expected"),
    [("workers = 4", 4), ('workers = "auto"', config.available_cpus())],
    ids=["four", "auto-is-the-cpus-we-may-run-on"],
)
def test_workers(line: str, expected: int, workdir: Path) -> None:
    loaded = config.loads(make(gateway=line), FILE)
    assert loaded.gateway.workers == expected
    assert f"gateway   workers {expected}, " in config.summary(loaded)


def test_every_setting_is_read(workdir: Path) -> None:
    text = """\
[gateway]
workers = 1
max_connections = 5
handshake_timeout = 2
backend_connect_timeout = 0.5
idle_timeout = 60
shutdown_timeout = 1.5
max_request_head = 1024
server_header = ""

[log]
level = "debug"
format = "json"
access_log = false

[tls]
min_version = "TLSv1.3"
ciphers = "ECDHE+AESGCM"

[[listener]]
address = "[::1]:8443"
proxy_protocol = false

[[listener]]
address = "localhost:8080"
tls = false

[[host]]
names = ["Chat.Example.COM.", "*.Example.org", "127.0.0.1", "[::1]"]
certificate = "certs/chat.crt"
private_key = "certs/chat.key"
default = true
min_version = "TLSv1.2"
client_ca = ""

[[host.route]]
path_prefix = "/api/"
backend = "unix:api.sock:/v1/"
origins = ["HTTPS://App.Example.com:443", "http://localhost:3000", "null"]
subprotocols = ["chat.v2", "chat.v1"]
extensions = false
"""
    cfg = config.loads(text, FILE)

    assert cfg.gateway == config.GatewaySettings(1, 5, 2.0, 0.5, 60.0, 1.5, 1024, "")
    assert isinstance(cfg.gateway.handshake_timeout, float)
    assert cfg.log == config.LogSettings("debug", "json", False)
    assert cfg.tls == config.TLSSettings("TLSv1.3", "ECDHE+AESGCM")
    assert [(str(x.address), x.tls, x.index) for x in cfg.listeners] == [
        ("[::1]:8443", True, 0),
        ("localhost:8080", False, 1),
    ]
    (host,) = cfg.hosts
    assert host.names == ("chat.example.com", "*.example.org", "127.0.0.1", "::1")
    assert host.default is True
    # The host overrides min_version and inherits ciphers from [tls].
    assert host.tls == config.TLSSettings("TLSv1.2", "ECDHE+AESGCM")
    (route,) = host.routes
    assert route.path is None
    assert route.path_prefix == "/api/"
    assert route.label == "/api/*"
    assert route.backend == BackendTarget(
        url="unix:api.sock:/v1/", scheme="unix", unix_path=workdir / "api.sock", path="/v1/"
    )
    assert route.origins == ("https://app.example.com", "http://localhost:3000", "null")
    assert route.subprotocols == ("chat.v2", "chat.v1")
    assert route.extensions is False


def test_plain_listeners_need_no_certificates(workdir: Path) -> None:
    text = make(
        listener="tls = false",
        replace={'certificate = "certs/chat.crt"': "", 'private_key = "certs/chat.key"': ""},
    )
    cfg = config.loads(text, FILE)
    assert not cfg.needs_tls
    assert cfg.hosts[0].certificate is None
    assert cfg.hosts[0].private_key is None


def test_inline_tables_and_arrays_of_inline_tables_are_accepted(workdir: Path) -> None:
    text = """\
gateway = { max_connections = 7 }
listener = [{ address = "127.0.0.1:0", tls = false }]
host = [{ names = ["a.example"], route = [{ path = "/", backend = "ws://b" }] }]
"""
    cfg = config.loads(text, FILE)
    assert cfg.gateway.max_connections == 7
    assert cfg.hosts[0].routes[0].backend.port == 80


def test_two_listeners_on_port_zero_are_not_duplicates(workdir: Path) -> None:
    cfg = config.loads(make(extra='[[listener]]\naddress = "127.0.0.1:0"'), FILE)
    assert [x.index for x in cfg.listeners] == [0, 1]


def test_a_byte_order_mark_is_ignored(workdir: Path) -> None:
    (workdir / FILE).write_bytes(b"\xef\xbb\xbf" + VALID.encode())
    assert config.load(FILE).hosts[0].names == ("chat.example.com",)


def example_files() -> list[Path]:
    examples = sorted((REPO / "config" / "examples").glob("*.toml"))
    return [REPO / "config" / "gatewayd.toml", *examples]


@pytest.mark.parametrize("source", example_files(), ids=lambda p: p.name)
def test_shipped_configuration_files_load(source: Path, tmp_path: Path) -> None:
    """Copied next to dummy certificate files (no keys in git), each file loads."""
    folder = tmp_path / "etc" / "gatewayd"
    folder.mkdir(parents=True)
    target = folder / source.name
    shutil.copy(source, target)
    data = tomllib.loads(source.read_text())
    for host in data["host"]:
        files = [host[key] for key in ("certificate", "private_key") if key in host]
        files += [route["backend_ca"] for route in host["route"] if route.get("backend_ca")]
        for name in files:
            path = (folder / name).resolve()
            assert tmp_path in path.parents, "examples use relative certificate paths"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("dummy\n")
        for route in host.get("route", []):
            if "static" in route and not Path(route["static"]).is_absolute():
                (folder / route["static"]).mkdir(parents=True, exist_ok=True)
            if "auth_users" in route:
                path = (folder / route["auth_users"]).resolve()
                assert tmp_path in path.parents, "examples use relative users files"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"demo:{BCRYPT_HASH}\n")

    cfg = config.load(target)

    assert cfg.path == target
    assert cfg.listeners and cfg.hosts
    assert all(host.routes for host in cfg.hosts)
    assert config.summary(cfg).startswith(f"configuration {target}\n")


def test_examples_cover_what_the_docs_promise() -> None:
    examples = {p.name: tomllib.loads(p.read_text()) for p in example_files()}
    sni = examples["sni-hosts.toml"]
    assert len(sni["host"]) == 2
    assert any(name.startswith("*.") for h in sni["host"] for name in h["names"])
    assert any(h.get("default") for h in sni["host"])
    lb = examples["behind-load-balancer.toml"]
    assert all(listener["tls"] is False for listener in lb["listener"])
    assert any(r["backend"].startswith("unix:") for h in lb["host"] for r in h["route"])
    routes = examples["path-routes.toml"]["host"][0]["route"]
    assert sum("path_prefix" in r for r in routes) >= 2
    access = examples["access-control.toml"]["host"]
    access_routes = [r for h in access for r in h["route"]]
    assert any("redirect" in r and "path_prefix" in r for r in access_routes)
    assert {r.get("auth") for r in access_routes} >= {"basic", "request"}
    assert any("allow" in h for h in access) and any("deny" in r for r in access_routes)
    vnc = examples["novnc-websockify.toml"]["host"][0]["route"]
    assert {r["backend"].split(":")[0] for r in vnc if "backend" in r} == {"tcp", "unix+tcp"}
    assert any(r.get("static") == "/usr/share/novnc" for r in vnc)
    assert any(listener.get("redirect_https") for listener in examples["novnc-websockify.toml"]["listener"])
    socketio = examples["socketio.toml"]["host"][0]["route"]
    assert all(r.get("http") for r in socketio)
    assert any(r.get("path_prefix") == "/socket.io/" for r in socketio)
    multi = examples["multi-backend.toml"]["host"][0]["route"]
    assert {r.get("balance", "round_robin") for r in multi} == set(config.BALANCE_MODES)
    assert any(r["backends"][0].startswith("wss://") and "backend_ca" in r for r in multi)
    assert {r.get("health_check") for r in multi} >= {"tcp", "/healthz"}


def test_annotated_file_and_docs_show_every_key() -> None:
    annotated = (REPO / "config" / "gatewayd.toml").read_text()
    docs = (REPO / "docs" / "configuration.md").read_text()
    for place, keys in KNOWN_KEYS.items():
        for key in keys:
            assert f"{key} =" in annotated or f"[{key}]" in annotated or f"[[{key}]]" in annotated \
                or f"[[host.{key}]]" in annotated, (place, key)
            assert f"`{key}`" in docs or f"[{key}]" in docs or f"[[host.{key}]]" in docs, key
    for item in NOT_YET_SUPPORTED:
        assert item.key in annotated, item.key
        assert item.key in docs, item.key


# ---------------------------------------------------------------------------
# One case per error kind
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    text: str
    errors: list[tuple[int | None, str, str, str | None]]


def err(line: int | None, key_path: str, message: str, suggestion: str | None = None) -> tuple[
    int | None, str, str, str | None
]:
    return (line, key_path, message, suggestion)


BACKEND = 'backend = "ws://127.0.0.1:9000/chat"'
SUPPORTED = (
    "supported: 'ws://host[:port][/path]', 'wss://host[:port][/path]', "
    "'unix:/path/to.sock[:/path]', 'tcp://host:port' and 'unix+tcp:/path/to.sock'"
)
ADDRESS = 'address = "127.0.0.1:0"'
NAMES = 'names = ["chat.example.com"]'
CERT = 'certificate = "certs/chat.crt"'
KEY = 'private_key = "certs/chat.key"'
TLS_NEEDED = (
    "required key is missing: listener[0] uses TLS, so every host needs certificate and "
    "private_key"
)

ERROR_CASES = [
    # -- unknown keys, with a suggestion, at each level --
    Case("unknown-top-level-table", make(extra="[gatway]"), [
        err(19, "gatway", "unknown key", "gateway")]),
    Case("unknown-gateway-key", make(gateway="max_conections = 5"), [
        err(2, "gateway.max_conections", "unknown key", "max_connections")]),
    Case("unknown-log-key", make(log='levle = "info"'), [
        err(4, "log.levle", "unknown key", "level")]),
    Case("unknown-tls-key", make(tls='min_verison = "TLSv1.3"'), [
        err(6, "tls.min_verison", "unknown key", "min_version")]),
    Case("unknown-listener-key", make(listener="tsl = false"), [
        err(9, "listener[0].tsl", "unknown key", "tls")]),
    Case("unknown-host-key", make(replace={CERT: 'certficate = "certs/chat.crt"'}), [
        err(10, "host[0].certificate", TLS_NEEDED),
        err(12, "host[0].certficate", "unknown key", "certificate")]),
    Case("unknown-route-key", make(route='subprotocol = ["chat"]'), [
        err(18, "host[0].route[0].subprotocol", "unknown key", "subprotocols")]),
    Case("unknown-key-far-from-any", make(gateway="colour = 1"), [
        err(2, "gateway.colour", "unknown key")]),
    Case("unknown-quoted-key", make(gateway='"max conn" = 1'), [
        err(2, 'gateway."max conn"', "unknown key", "max_connections")]),
    # -- wrong types --
    Case("bool-got-string", make(log='access_log = "yes"'), [
        err(4, "log.access_log", "expected a boolean (true or false), got string 'yes'")]),
    Case("int-got-float", make(gateway="max_connections = 1.5"), [
        err(2, "gateway.max_connections", "expected an integer, got float 1.5")]),
    Case("int-got-bool", make(gateway="max_request_head = true"), [
        err(2, "gateway.max_request_head", "expected an integer, got boolean true")]),
    Case("duration-got-string", make(gateway='handshake_timeout = "10s"'), [
        err(2, "gateway.handshake_timeout",
            "expected a number of seconds (integer or float), got string '10s'")]),
    Case("string-got-int", make(tls="ciphers = 5"), [
        err(6, "tls.ciphers", "expected a string, got integer 5")]),
    Case("list-got-string", make(replace={NAMES: 'names = "chat.example.com"'}), [
        err(11, "host[0].names",
            "expected an array of host names, got string 'chat.example.com' "
            '(write names = ["chat.example.com"])')]),
    Case("list-item-got-int", make(route="subprotocols = ['a', 2]"), [
        err(18, "host[0].route[0].subprotocols[1]", "expected a string, got integer 2")]),
    Case("table-got-value", make(replace={"[gateway]": "gateway = 5"}), [
        err(1, "gateway", "expected a table ([gateway]), got integer 5")]),
    Case("array-of-tables-got-table", make(replace={"[[listener]]": "[listener]"}), [
        err(7, "listener", "expected an array of tables ([[listener]]), got table")]),
    Case("address-got-int", make(replace={ADDRESS: "address = 8443"}), [
        err(8, "listener[0].address", "expected a string 'host:port', got integer 8443")]),
    Case("date-value", make(gateway="idle_timeout = 1979-05-27"), [
        err(2, "gateway.idle_timeout",
            "expected a number of seconds (integer or float), got date 1979-05-27")]),
    # -- out of range --
    Case("workers-zero", make(gateway="workers = 0"), [
        err(2, "gateway.workers", "must be between 1 and 256, got 0")]),
    Case("workers-word", make(gateway='workers = "all"'), [
        err(2, "gateway.workers", 'expected an integer or "auto", got \'all\'')]),
    Case("workers-float", make(gateway="workers = 1.5"), [
        err(2, "gateway.workers", "expected an integer, got float 1.5")]),
    Case("max-connections-zero", make(gateway="max_connections = 0"), [
        err(2, "gateway.max_connections", "must be at least 1, got 0")]),
    Case("max-request-head-small", make(gateway="max_request_head = 100"), [
        err(2, "gateway.max_request_head", "must be between 1024 and 1048576, got 100")]),
    Case("max-request-head-large", make(gateway="max_request_head = 2097152"), [
        err(2, "gateway.max_request_head", "must be between 1024 and 1048576, got 2097152")]),
    Case("handshake-timeout-zero", make(gateway="handshake_timeout = 0"), [
        err(2, "gateway.handshake_timeout", "must be greater than 0 seconds, got 0")]),
    Case("backend-timeout-zero", make(gateway="backend_connect_timeout = 0.0"), [
        err(2, "gateway.backend_connect_timeout", "must be greater than 0 seconds, got 0.0")]),
    Case("shutdown-timeout-negative", make(gateway="shutdown_timeout = -1"), [
        err(2, "gateway.shutdown_timeout", "must be greater than 0 seconds, got -1")]),
    Case("idle-timeout-negative", make(gateway="idle_timeout = -0.5"), [
        err(2, "gateway.idle_timeout", "must not be negative, got -0.5")]),
    Case("duration-not-finite", make(gateway="idle_timeout = inf"), [
        err(2, "gateway.idle_timeout", "must be a finite number of seconds, got inf")]),
    Case("server-header-control", make(gateway='server_header = "a\\r\\nX-Evil: 1"'), [
        err(2, "gateway.server_header",
            "must be printable ASCII (no CR, LF or other control characters), "
            "got 'a\\r\\nX-Evil: 1'")]),
    Case("server-header-non-ascii", make(gateway='server_header = "gä"'), [
        err(2, "gateway.server_header",
            "must be printable ASCII (no CR, LF or other control characters), got 'gä'")]),
    Case("server-header-spaces", make(gateway='server_header = " gw"'), [
        err(2, "gateway.server_header", "must not start or end with a space, got ' gw'")]),
    Case("ciphers-empty", make(tls='ciphers = ""'), [
        err(6, "tls.ciphers",
            "must be a non-empty OpenSSL cipher list (printable ASCII), got ''")]),
    Case("listener-port-too-big", make(replace={ADDRESS: 'address = "127.0.0.1:70000"'}), [
        err(8, "listener[0].address", "port must be between 0 and 65535, got 70000")]),
    # -- bad enum values --
    Case("log-level", make(log='level = "verbose"'), [
        err(4, "log.level", "must be one of 'debug', 'info', 'warning', 'error', got 'verbose'")]),
    Case("log-format", make(log='format = "xml"'), [
        err(4, "log.format", "must be one of 'text', 'json', got 'xml'")]),
    Case("tls-min-version", make(tls='min_version = "TLSv1.1"'), [
        err(6, "tls.min_version", "must be one of 'TLSv1.2', 'TLSv1.3', got 'TLSv1.1'")]),
    Case("host-min-version", make(host='min_version = "tlsv1.3"'), [
        err(14, "host[0].min_version", "must be one of 'TLSv1.2', 'TLSv1.3', got 'tlsv1.3'")]),
    # -- missing required keys and tables --
    Case("no-listener", make(replace={"[[listener]]": "", ADDRESS: ""}), [
        err(None, "listener", "at least one [[listener]] is required")]),
    Case("listener-address", make(replace={ADDRESS: ""}), [
        err(7, "listener[0].address", "required key is missing")]),
    Case("no-host", "[[listener]]\naddress = '127.0.0.1:0'\n", [
        err(None, "host", "at least one [[host]] is required")]),
    Case("host-names", make(replace={NAMES: ""}), [
        err(10, "host[0].names", "required key is missing")]),
    Case("host-names-empty", make(replace={NAMES: "names = []"}), [
        err(11, "host[0].names", "must list at least one host name")]),
    Case("host-certificates-with-tls", make(replace={CERT: "", KEY: ""}), [
        err(10, "host[0].certificate", TLS_NEEDED),
        err(10, "host[0].private_key", TLS_NEEDED)]),
    Case("private-key-without-certificate",
         make(listener="tls = false", replace={CERT: ""}), [
        err(10, "host[0].certificate", "required key is missing: private_key is set")]),
    Case("no-route", make(replace={"[[host.route]]": "", 'path = "/chat"': "", BACKEND: ""}), [
        err(10, "host[0].route", "at least one [[host.route]] is required")]),
    Case("route-backend", make(replace={BACKEND: ""}), [
        err(15, "host[0].route[0].backend", "required key is missing")]),
    # -- path / path_prefix --
    Case("path-and-prefix", make(route='path_prefix = "/chat/"'), [
        err(15, "host[0].route[0]", "set either path (exact match) or path_prefix, not both")]),
    Case("neither-path-nor-prefix", make(replace={'path = "/chat"': ""}), [
        err(15, "host[0].route[0]", "one of path (exact match) or path_prefix is required")]),
    Case("path-relative", make(replace={'path = "/chat"': 'path = "chat"'}), [
        err(16, "host[0].route[0].path", "must start with '/', got 'chat'")]),
    Case("path-query", make(replace={'path = "/chat"': 'path = "/chat?room=1"'}), [
        err(16, "host[0].route[0].path",
            "must not contain '?' (a query is never part of a path), got '/chat?room=1'")]),
    Case("path-fragment", make(replace={'path = "/chat"': 'path = "/chat#top"'}), [
        err(16, "host[0].route[0].path", "must not contain '#', got '/chat#top'")]),
    Case("prefix-space", make(replace={'path = "/chat"': 'path_prefix = "/my chat/"'}), [
        err(16, "host[0].route[0].path_prefix",
            "must not contain whitespace or control characters, got '/my chat/'")]),
    Case("path-non-ascii", make(replace={'path = "/chat"': 'path = "/ç"'}), [
        err(16, "host[0].route[0].path",
            "must be ASCII: percent-encode other characters as they appear in requests, "
            "got '/ç'")]),
    Case("duplicate-path",
         make(extra='[[host.route]]\npath = "/chat"\nbackend = "ws://127.0.0.1:9001"'), [
        err(20, "host[0].route[1].path",
            "duplicate path '/chat' in this host: already used by "
            "host[0].route[0].path (line 16)")]),
    Case("duplicate-prefix",
         make(replace={'path = "/chat"': 'path_prefix = "/c/"'},
              extra='[[host.route]]\npath_prefix = "/c/"\nbackend = "ws://127.0.0.1:9001"'), [
        err(20, "host[0].route[1].path_prefix",
            "duplicate prefix '/c/' in this host: already used by "
            "host[0].route[0].path_prefix (line 16)")]),
    # -- hosts --
    Case("duplicate-name-across-hosts", make(extra="""\
[[host]]
names = ["other.example.com", "Chat.Example.com."]
certificate = "certs/chat.crt"
private_key = "certs/chat.key"
[[host.route]]
path = "/"
backend = "ws://127.0.0.1:9001\""""), [
        err(20, "host[1].names[1]",
            "'chat.example.com' is already a name of host[0]: host[0].names[0] (line 11); "
            "a name may belong to one host only")]),
    Case("duplicate-name-in-one-host",
         make(replace={NAMES: 'names = ["a.example", "A.example"]'}), [
        err(11, "host[0].names[1]",
            "'a.example' is listed twice (also host[0].names[0] (line 11))")]),
    Case("two-defaults", make(host="default = true", extra="""\
[[host]]
names = ["b.example.com"]
certificate = "certs/chat.crt"
private_key = "certs/chat.key"
default = true
[[host.route]]
path = "/"
backend = "ws://127.0.0.1:9001\""""), [
        err(23, "host[1].default",
            "only one host may be the default; host[0].default (line 14) already is")]),
    Case("bad-wildcard", make(replace={NAMES: 'names = ["chat.*.example.com"]'}), [
        err(11, "host[0].names[0]",
            "'*' is only allowed as the whole first label, as in '*.example.org': "
            "'chat.*.example.com'")]),
    Case("bad-host-name", make(replace={NAMES: 'names = ["chat_room.example.com"]'}), [
        err(11, "host[0].names[0]",
            "not a valid host name: 'chat_room.example.com' (labels are 1-63 letters, "
            "digits or hyphens, not starting or ending with a hyphen)")]),
    Case("non-ascii-host-name", make(replace={NAMES: 'names = ["bücher.example"]'}), [
        err(11, "host[0].names[0]",
            "non-ASCII name 'bücher.example': write its IDNA form ('xn--bcher-kva.example')")]),
    Case("certificate-not-found", make(replace={CERT: 'certificate = "nope/chat.crt"'}), [
        err(12, "host[0].certificate", "file not found: {dir}/nope/chat.crt")]),
    Case("certificate-is-a-directory", make(replace={CERT: 'certificate = "certs"'}), [
        err(12, "host[0].certificate", "not a regular file: {dir}/certs")]),
    Case("certificate-empty", make(replace={CERT: 'certificate = ""'}), [
        err(12, "host[0].certificate", "must not be empty")]),
    # -- listeners --
    Case("duplicate-listener-address", make(
        replace={ADDRESS: 'address = "0.0.0.0:8443"'},
        extra='[[listener]]\naddress = "0.0.0.0:8443"\ntls = false'), [
        err(20, "listener[1].address",
            "duplicate address 0.0.0.0:8443: already used by listener[0].address (line 8)")]),
    Case("duplicate-listener-address-ipv6", make(
        replace={ADDRESS: 'address = "[::]:8443"'},
        extra='[[listener]]\naddress = "[0::0]:8443"'), [
        err(20, "listener[1].address",
            "duplicate address [::]:8443: already used by listener[0].address (line 8)")]),
    Case("address-without-port", make(replace={ADDRESS: 'address = "0.0.0.0"'}), [
        err(8, "listener[0].address",
            "expected 'host:port' or '[ipv6]:port' (e.g. '0.0.0.0:8443'), got '0.0.0.0': "
            "the port is missing")]),
    Case("address-without-host", make(replace={ADDRESS: 'address = ":8443"'}), [
        err(8, "listener[0].address",
            "expected 'host:port' or '[ipv6]:port', got ':8443': the host is missing "
            "(use '0.0.0.0:PORT' for every IPv4 address or '[::]:PORT' for IPv6)")]),
    Case("address-ipv6-without-brackets", make(replace={ADDRESS: 'address = "::1:8443"'}), [
        err(8, "listener[0].address",
            "expected 'host:port' or '[ipv6]:port': IPv6 addresses must be in brackets, "
            "as in '[::1]:9000'")]),
    Case("address-port-not-a-number", make(replace={ADDRESS: 'address = "0.0.0.0:https"'}), [
        err(8, "listener[0].address", "port must be a number, got 'https'")]),
    # -- origins and subprotocols --
    Case("origin-with-path", make(route='origins = ["https://a.example/app"]'), [
        err(18, "host[0].route[0].origins[0]",
            "an origin is 'scheme://host[:port]', as in 'https://chat.example.com' with no "
            "path, query or fragment, got 'https://a.example/app'")]),
    Case("origin-trailing-slash", make(route='origins = ["https://a.example/"]'), [
        err(18, "host[0].route[0].origins[0]",
            "an origin is 'scheme://host[:port]', as in 'https://chat.example.com' with no "
            "trailing '/', got 'https://a.example/'")]),
    Case("origin-without-scheme", make(route='origins = ["a.example"]'), [
        err(18, "host[0].route[0].origins[0]",
            "an origin is 'scheme://host[:port]', as in 'https://chat.example.com', "
            "got 'a.example'")]),
    Case("origin-wildcard", make(route='origins = ["https://*.a.example"]'), [
        err(18, "host[0].route[0].origins[0]",
            "wildcards are not supported in origins; list each one: 'https://*.a.example'")]),
    Case("subprotocol-not-a-token", make(route='subprotocols = ["chat v1"]'), [
        err(18, "host[0].route[0].subprotocols[0]",
            "not a valid subprotocol name (an RFC 7230 token: letters, digits and "
            "!#$%&'*+-.^_`|~), got 'chat v1'")]),
    Case("subprotocol-duplicate", make(route='subprotocols = ["a", "b", "a"]'), [
        err(18, "host[0].route[0].subprotocols[2]",
            "'a' is listed twice (also host[0].route[0].subprotocols[0] (line 18))")]),
    # -- keys of the SPEC this version does not implement --
    Case("max-connection-age-negative", make(gateway="max_connection_age = -1"), [
        err(2, "gateway.max_connection_age", "must not be negative, got -1")]),
    # -- hardening: limits, PROXY protocol, TLS profile, certificates, mTLS --
    Case("max-connections-per-ip-negative", make(gateway="max_connections_per_ip = -1"), [
        err(2, "gateway.max_connections_per_ip", "must be at least 0, got -1")]),
    Case("max-connections-per-ip-string", make(gateway='max_connections_per_ip = "10"'), [
        err(2, "gateway.max_connections_per_ip", "expected an integer, got string '10'")]),
    Case("handshakes-per-ip-negative", make(gateway="handshakes_per_ip_per_second = -1"), [
        err(2, "gateway.handshakes_per_ip_per_second", "must be a finite number, 0 or more, got -1")]),
    Case("handshakes-per-ip-bool", make(gateway="handshakes_per_ip_per_second = true"), [
        err(2, "gateway.handshakes_per_ip_per_second",
            "expected a number (integer or float), got boolean true")]),
    Case("handshakes-per-ip-inf", make(gateway="handshakes_per_ip_per_second = inf"), [
        err(2, "gateway.handshakes_per_ip_per_second", "must be a finite number, 0 or more, got inf")]),
    Case("trusted-proxies-string", make(gateway='trusted_proxies = "10.0.0.0/8"'), [
        err(2, "gateway.trusted_proxies",
            'expected an array of CIDRs, got string \'10.0.0.0/8\' '
            '(write trusted_proxies = ["10.0.0.0/8"])')]),
    Case("trusted-proxies-not-an-address", make(gateway='trusted_proxies = ["lb.local"]'), [
        err(2, "gateway.trusted_proxies[0]",
            "expected an IP address or CIDR network, as in '10.0.0.0/8', '192.0.2.7' or "
            "'2001:db8::/32', got 'lb.local'")]),
    Case("trusted-proxies-twice", make(gateway='trusted_proxies = ["10.0.0.1", "10.0.0.1/32"]'), [
        err(2, "gateway.trusted_proxies[1]",
            "'10.0.0.1/32' is listed twice (also gateway.trusted_proxies[0] (line 2))")]),
    Case("proxy-protocol-not-bool", make(listener='proxy_protocol = "yes"'), [
        err(9, "listener[0].proxy_protocol",
            "expected a boolean (true or false), got string 'yes'")]),
    Case("profile-unknown", make(host='profile = "old"'), [
        err(14, "host[0].profile", "must be one of 'intermediate', 'modern', got 'old'")]),
    Case("profile-in-tls-table", make(tls='profile = "modern"'), [
        err(6, "tls.profile", "unknown key")]),
    Case("client-ca-missing-file", make(host='client_ca = "ca.pem"'), [
        err(14, "host[0].client_ca", "file not found: {dir}/ca.pem")]),
    Case("ocsp-response-missing-file", make(host='ocsp_response = "x.der"'), [
        err(14, "host[0].ocsp_response", "file not found: {dir}/x.der")]),
    Case("client-subject-header-without-client-ca", make(host='client_subject_header = "X-C"'), [
        err(14, "host[0].client_subject_header",
            "needs client_ca: only a certificate verified against client_ca has a subject "
            "to pass on")]),
    Case("certificates-not-an-array", make(host='certificates = "x.pem"'), [
        err(14, "host[0].certificates",
            "expected an array of tables ([[host.certificates]]), got string 'x.pem'")]),
    Case("certificates-pair-incomplete", make(host='certificates = [{certificate = "certs/chat.crt"}]'), [
        err(14, "host[0].certificates[0].private_key", "required key is missing")]),
    Case("certificates-pair-unknown-key",
         make(host='certificates = [{certificate = "certs/chat.crt", private_key = "certs/chat.key", '
                   'privatekey = "x"}]'), [
        err(14, "host[0].certificates[0].privatekey", "unknown key", "private_key")]),
    Case("certificates-pair-missing-file",
         make(host='certificates = [{certificate = "rsa.crt", private_key = "certs/chat.key"}]'), [
        err(14, "host[0].certificates[0].certificate", "file not found: {dir}/rsa.crt")]),
]

# -- access control: redirect, auth, allow/deny (SPEC rows 9a, 9b, 14a) --
REDIRECT = 'redirect = "wss://new.example.com/chat"'
REDIRECT_EXAMPLE = (
    "an absolute URL such as 'wss://new.example.com/chat' (http, https, ws or wss)"
)
CIDR_EXAMPLE = (
    "an IP address or CIDR network, as in '10.0.0.0/8', '192.0.2.7' or '2001:db8::/32'"
)
NOT_ON_REDIRECT = (
    "not used on a redirect route: the redirect is answered before it would be checked"
)
NOT_ON_REDIRECT_BACKEND = (
    "not used on a redirect route: it has no backend to balance, check or connect to"
)
USERS_REQUIRED = (
    'required with auth = "basic": an htpasswd-style file of bcrypt hashes (htpasswd -B)'
)
URL_REQUIRED = (
    'required with auth = "request": the URL of the authentication service, as in '
    "'http://127.0.0.1:9100/check'"
)
AUTH_URL = 'auth_url = "http://127.0.0.1:9100/check"'
AUTH_URL_SUPPORTED = (
    "supported: 'http://host[:port][/path]' and 'unix:/path/to.sock[:/path]'"
)


def redirect_case(case_id: str, url: str, message: str) -> Case:
    return Case(f"redirect-{case_id}", make(replace={BACKEND: f'redirect = "{url}"'}), [
        err(17, "host[0].route[0].redirect", message)])


def auth_url_case(case_id: str, url: str, message: str) -> Case:
    return Case(f"auth-url-{case_id}", make(route='auth = "request"', extra=f'auth_url = "{url}"'), [
        err(19, "host[0].route[0].auth_url", message)])


ERROR_CASES += [
    Case("redirect-and-backend", make(route=REDIRECT), [
        err(18, "host[0].route[0].redirect",
            "set either backend or redirect, not both (a redirect route has no backend)")]),
    redirect_case("relative", "/new", f"expected {REDIRECT_EXAMPLE}, got '/new'"),
    redirect_case("ftp", "ftp://files.example/x",
                  f"unsupported scheme 'ftp://' in 'ftp://files.example/x': expected {REDIRECT_EXAMPLE}"),
    redirect_case("crlf", "https://a.example/\\r\\nSet-Cookie: x=1",
                  "must not contain spaces, control characters (CR, LF) or non-ASCII characters "
                  "(percent-encode them), got 'https://a.example/\\r\\nSet-Cookie: x=1'"),
    redirect_case("space", "https://a.example/a b",
                  "must not contain spaces, control characters (CR, LF) or non-ASCII characters "
                  "(percent-encode them), got 'https://a.example/a b'"),
    redirect_case("non-ascii", "https://a.example/ç",
                  "must not contain spaces, control characters (CR, LF) or non-ASCII characters "
                  "(percent-encode them), got 'https://a.example/ç'"),
    redirect_case("fragment", "https://a.example/x#top",
                  "a redirect URL must not have a fragment ('#'): 'https://a.example/x#top'"),
    redirect_case("userinfo", "https://me@a.example/",
                  "a redirect URL must not have user information ('user@'): 'https://me@a.example/'"),
    redirect_case("no-host", "https:///x", "the redirect URL has no host: 'https:///x'"),
    redirect_case("bad-port", "https://a.example:99999/", "port must be between 1 and 65535, got 99999"),
    redirect_case("bad-host", "https://a_b.example/",
                  "not a valid host name: 'a_b.example' (labels are 1-63 letters, digits or "
                  "hyphens, not starting or ending with a hyphen)"),
    Case("redirect-not-a-string", make(replace={BACKEND: "redirect = 5"}), [
        err(17, "host[0].route[0].redirect", "expected an absolute URL string, got integer 5")]),
    Case("redirect-status-303", make(replace={BACKEND: REDIRECT}, route="redirect_status = 303"), [
        err(18, "host[0].route[0].redirect_status", "must be one of 301, 302, 307, 308, got 303")]),
    Case("redirect-status-string", make(replace={BACKEND: REDIRECT}, route='redirect_status = "308"'), [
        err(18, "host[0].route[0].redirect_status", "expected an integer, got string '308'")]),
    Case("redirect-status-without-redirect", make(route="redirect_status = 301"), [
        err(18, "host[0].route[0].redirect_status", "only used together with redirect")]),
    Case("redirect-with-origins",
         make(replace={BACKEND: REDIRECT}, route='origins = ["https://a.example"]'), [
        err(18, "host[0].route[0].origins", NOT_ON_REDIRECT)]),
    Case("redirect-with-auth", make(replace={BACKEND: REDIRECT}, route='auth = "basic"'), [
        err(18, "host[0].route[0].auth", NOT_ON_REDIRECT)]),
    Case("redirect-with-allow", make(replace={BACKEND: REDIRECT}, route='allow = ["10.0.0.0/8"]'), [
        err(18, "host[0].route[0].allow", NOT_ON_REDIRECT)]),
    # -- access control on the backends work's routes (both branches' rules hold) --
    Case("redirect-and-backends",
         make(replace={BACKEND: REDIRECT}, route='backends = ["ws://127.0.0.1:1"]'), [
        err(17, "host[0].route[0].redirect",
            "set either backends or redirect, not both (a redirect route has no backend)")]),
    Case("redirect-with-balance", make(replace={BACKEND: REDIRECT}, route='balance = "source_ip"'), [
        err(18, "host[0].route[0].balance", NOT_ON_REDIRECT_BACKEND)]),
    Case("redirect-with-health-check",
         make(replace={BACKEND: REDIRECT}, route='health_check = "tcp"'), [
        err(18, "host[0].route[0].health_check", NOT_ON_REDIRECT_BACKEND)]),
    Case("redirect-with-default-max-fails",
         make(replace={BACKEND: REDIRECT}, route="max_fails = 1"), [
        err(18, "host[0].route[0].max_fails", NOT_ON_REDIRECT_BACKEND)]),
    Case("bridge-auth-forward",
         make(replace={BACKEND: 'backend = "tcp://127.0.0.1:5900"'}, route='auth = "request"',
              extra=AUTH_URL + "\nauth_forward = true"), [
        err(20, "host[0].route[0].auth_forward",
            "not used with tcp:// and unix+tcp: bridge backends: the bridge sends no HTTP "
            "request (and so no Authorization) to the backend")]),
    Case("bridge-auth-response-headers",
         make(replace={BACKEND: 'backend = "unix+tcp:/run/vnc.sock"'}, route='auth = "request"',
              extra=AUTH_URL + '\nauth_response_headers = ["X-User"]'), [
        err(20, "host[0].route[0].auth_response_headers",
            "not used with tcp:// and unix+tcp: bridge backends: the bridge sends no HTTP "
            "request (and so no headers) to the backend")]),
    Case("auth-digest", make(route='auth = "digest"'), [
        err(18, "host[0].route[0].auth", "must be one of 'basic', 'request', got 'digest'")]),
    Case("auth-not-a-string", make(route="auth = true"), [
        err(18, "host[0].route[0].auth", 'expected a string ("basic" or "request"), got boolean true')]),
    Case("auth-basic-without-users", make(route='auth = "basic"'), [
        err(15, "host[0].route[0].auth_users", USERS_REQUIRED)]),
    Case("auth-request-without-url", make(route='auth = "request"'), [
        err(15, "host[0].route[0].auth_url", URL_REQUIRED)]),
    Case("auth-users-without-auth", make(route='auth_users = "users"'), [
        err(18, "host[0].route[0].auth_users", 'only used with auth = "basic"; this route has no auth')]),
    Case("auth-url-with-basic", make(route='auth = "basic"', extra=AUTH_URL), [
        err(15, "host[0].route[0].auth_users", USERS_REQUIRED),
        err(19, "host[0].route[0].auth_url",
            'only used with auth = "request", not with auth = "basic"')]),
    Case("realm-with-request", make(route='auth = "request"', extra=AUTH_URL + '\nrealm = "x"'), [
        err(20, "host[0].route[0].realm", 'only used with auth = "basic", not with auth = "request"')]),
    Case("realm-with-quote", make(route='auth = "basic"', extra='realm = "a\\"b"'), [
        err(15, "host[0].route[0].auth_users", USERS_REQUIRED),
        err(19, "host[0].route[0].realm",
            "must be printable ASCII without '\"' or '\\' (it is sent as a quoted string), "
            "got 'a\"b'")]),
    Case("realm-empty", make(route='auth = "basic"', extra='realm = ""'), [
        err(15, "host[0].route[0].auth_users", USERS_REQUIRED),
        err(19, "host[0].route[0].realm", "must not be empty")]),
    Case("auth-forward-without-auth", make(route="auth_forward = true"), [
        err(18, "host[0].route[0].auth_forward",
            'only used with auth ("basic" or "request"); this route has no auth')]),
    Case("auth-forward-not-bool",
         make(route='auth = "request"', extra=AUTH_URL + '\nauth_forward = "yes"'), [
        err(20, "host[0].route[0].auth_forward",
            "expected a boolean (true or false), got string 'yes'")]),
    Case("auth-cache-without-request", make(route="auth_cache_seconds = 5"), [
        err(18, "host[0].route[0].auth_cache_seconds",
            'only used with auth = "request"; this route has no auth')]),
    Case("auth-cache-negative",
         make(route='auth = "request"', extra=AUTH_URL + "\nauth_cache_seconds = -1"), [
        err(20, "host[0].route[0].auth_cache_seconds", "must not be negative, got -1")]),
    Case("auth-response-headers-without-request", make(route='auth_response_headers = ["X-User"]'), [
        err(18, "host[0].route[0].auth_response_headers",
            'only used with auth = "request"; this route has no auth')]),
    Case("auth-response-headers-host",
         make(route='auth = "request"', extra=AUTH_URL + '\nauth_response_headers = ["X-User", "Host"]'), [
        err(20, "host[0].route[0].auth_response_headers[1]",
            "'Host' cannot be copied to the backend request: the gateway sets it itself "
            "(or it is hop-by-hop)")]),
    Case("auth-response-headers-not-a-token",
         make(route='auth = "request"', extra=AUTH_URL + '\nauth_response_headers = ["X User"]'), [
        err(20, "host[0].route[0].auth_response_headers[0]",
            "not a valid header name (letters, digits and !#$%&'*+-.^_`|~), got 'X User'")]),
    Case("auth-response-headers-twice-ignoring-case",
         make(route='auth = "request"', extra=AUTH_URL + '\nauth_response_headers = ["X-User", "x-user"]'), [
        err(20, "host[0].route[0].auth_response_headers[1]",
            "'x-user' is listed twice (header names ignore case; also "
            "host[0].route[0].auth_response_headers[0] (line 20))")]),
    Case("auth-url-not-a-string", make(route='auth = "request"', extra="auth_url = 9100"), [
        err(19, "host[0].route[0].auth_url", "expected a URL string, got integer 9100")]),
    auth_url_case("https", "https://auth.example/check",
                  "https:// auth services are not supported: use http:// on a local or private "
                  f"network, or a unix: socket; {AUTH_URL_SUPPORTED}"),
    auth_url_case("ws", "ws://127.0.0.1:9100/",
                  f"unsupported auth service scheme 'ws://'; {AUTH_URL_SUPPORTED}"),
    auth_url_case("no-scheme", "127.0.0.1:9100",
                  f"not an auth service URL: '127.0.0.1:9100'; {AUTH_URL_SUPPORTED}"),
    auth_url_case("no-host", "http:///check", "the auth_url has no host: 'http:///check'"),
    auth_url_case("userinfo", "http://u:p@127.0.0.1/",
                  "an auth_url must not have user information ('user@'): 'http://u:p@127.0.0.1/'"),
    auth_url_case("fragment", "http://127.0.0.1/#x",
                  "an auth_url must not have a fragment ('#'): 'http://127.0.0.1/#x'"),
    auth_url_case("space", "http://127.0.0.1/a b",
                  "must not contain spaces, control or non-ASCII characters, got 'http://127.0.0.1/a b'"),
    auth_url_case("unix-no-socket", "unix::/check",
                  "the unix: auth_url names no socket file: 'unix::/check'"),
    Case("allow-not-a-network", make(route='allow = ["10.0.0.0/33"]'), [
        err(18, "host[0].route[0].allow[0]", f"expected {CIDR_EXAMPLE}, got '10.0.0.0/33'")]),
    Case("allow-a-name", make(route='allow = ["localhost"]'), [
        err(18, "host[0].route[0].allow[0]", f"expected {CIDR_EXAMPLE}, got 'localhost'")]),
    Case("deny-all", make(route='deny = ["all"]'), [
        err(18, "host[0].route[0].deny[0]",
            f"expected {CIDR_EXAMPLE}; for every address write '0.0.0.0/0' and '::/0'")]),
    Case("allow-a-string", make(route='allow = "10.0.0.0/8"'), [
        err(18, "host[0].route[0].allow",
            "expected an array of IP networks (CIDR), got string '10.0.0.0/8' "
            '(write allow = ["10.0.0.0/8"])')]),
    Case("deny-host-bits-refused", make(route='deny = ["10.1.2.3/8", "10.0.0.0/8"]'), [
        err(18, "host[0].route[0].deny[0]",
            "'10.1.2.3/8' has host bits set: write the network, '10.0.0.0/8'")]),
    Case("host-allow-not-a-network", make(host='allow = ["10.0.0.0/8", 7]'), [
        err(14, "host[0].allow[1]", "expected a string, got integer 7")]),
    Case("host-deny-ipv6", make(host='deny = ["2001:db8::/129"]'), [
        err(14, "host[0].deny[0]", f"expected {CIDR_EXAMPLE}, got '2001:db8::/129'")]),
    Case("unknown-route-key-near-auth", make(route='auth_user = "users"'), [
        err(18, "host[0].route[0].auth_user", "unknown key", "auth_users")]),
]

# Every route key the SPEC lists and this version lacks gets the same error.
ERROR_CASES += [
    Case(f"route-{item.key}", make(route=f"{item.key} = 1"), [
        err(18, f"host[0].route[0].{item.key}", NOT_YET)])
    for item in NOT_YET_SUPPORTED
    if item.place == "route"
]

BAD_BACKENDS = [
    ("http-scheme", "http://127.0.0.1:9000/",
     "unsupported backend scheme 'http://'; " + SUPPORTED),
    ("no-scheme", "127.0.0.1:9000", "not a backend URL: '127.0.0.1:9000'; " + SUPPORTED),
    ("tcp-without-port", "tcp://127.0.0.1",
     "a tcp:// backend needs a port, as in 'tcp://127.0.0.1:5900': 'tcp://127.0.0.1'"),
    ("tcp-with-path", "tcp://127.0.0.1:5900/vnc",
     "a tcp:// backend has no path (the bridge carries bytes, not requests): "
     "'tcp://127.0.0.1:5900/vnc'"),
    ("tcp-with-query", "tcp://127.0.0.1:5900?x",
     "a backend URL must not have a query ('?'): 'tcp://127.0.0.1:5900?x'"),
    ("unix-tcp-with-path", "unix+tcp:/run/vnc.sock:/x",
     "a unix+tcp: backend has no path (the bridge carries bytes, not requests): "
     "'unix+tcp:/run/vnc.sock:/x'"),
    ("unix-tcp-no-socket", "unix+tcp:", "the unix+tcp: backend names no socket file: 'unix+tcp:'"),
    ("wss-userinfo", "wss://u@b.example/", "a backend URL must not have user information "
     "('user@'): 'wss://u@b.example/'"),
    ("query", "ws://127.0.0.1:9000/chat?x=1",
     "a backend URL must not have a query ('?'): 'ws://127.0.0.1:9000/chat?x=1'"),
    ("fragment", "ws://127.0.0.1:9000/chat#x",
     "a backend URL must not have a fragment ('#'): 'ws://127.0.0.1:9000/chat#x'"),
    ("userinfo", "ws://user:pw@127.0.0.1:9000/",
     "a backend URL must not have user information ('user@'): 'ws://user:pw@127.0.0.1:9000/'"),
    ("no-host", "ws:///chat", "the backend URL has no host: 'ws:///chat'"),
    ("port-zero", "ws://127.0.0.1:0/", "port must be between 1 and 65535, got 0"),
    ("port-too-big", "ws://127.0.0.1:65536/", "port must be between 1 and 65535, got 65536"),
    ("empty-port", "ws://127.0.0.1:/", "port must be a number, got ''"),
    ("ipv6-without-brackets", "ws://::1:9000/",
     "backend host: IPv6 addresses must be in brackets, as in '[::1]:9000'"),
    ("bad-ipv6", "ws://[::g]:9000/", "not an IPv6 address in brackets: '::g'"),
    ("bad-host", "ws://bad_host:9000/",
     "not a valid host name: 'bad_host' (labels are 1-63 letters, digits or hyphens, "
     "not starting or ending with a hyphen)"),
    ("path-with-space", "ws://127.0.0.1:9000/a b",
     "must not contain whitespace or control characters, got '/a b'"),
    ("unix-no-socket", "unix:", "the unix: backend names no socket file: 'unix:'"),
    ("unix-query", "unix:/run/a.sock:/x?y", "a backend URL must not have a query or fragment: "
     "'unix:/run/a.sock:/x?y'"),
    ("unix-too-long", "unix:/" + "s" * 120,
     f"socket path '/{'s' * 120}' is too long for a unix socket (at most 107 bytes)"),
]

ERROR_CASES += [
    Case(f"backend-{case_id}", make(replace={BACKEND: f'backend = "{url}"'}), [
        err(17, "host[0].route[0].backend", message)])
    for case_id, url, message in BAD_BACKENDS
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda case: case.id)
def test_error(case: Case, workdir: Path) -> None:
    expected = [
        (line, key, message.replace("{dir}", str(workdir)), suggestion)
        for line, key, message, suggestion in case.errors
    ]
    assert as_tuples(load_errors(case.text)) == expected


TWO_HOST_KEYS = [
    ('profile = "modern"', 'min_version = "TLSv1.2"', "host[0].min_version",
     'profile = "modern" is TLS 1.3 only; remove min_version or use '
     "profile = \"intermediate\" (got 'TLSv1.2')"),
    ('client_ca = "certs/chat.crt"', 'client_subject_header = "X C"',
     "host[0].client_subject_header", "not a valid header name (an RFC 9110 token), got 'X C'"),
    ('client_ca = "certs/chat.crt"', 'client_subject_header = "X-Forwarded-For"',
     "host[0].client_subject_header",
     "'X-Forwarded-For' is a header the gateway sets itself; choose another name, "
     "such as 'X-Client-Subject'"),
    ('client_ca = "certs/chat.crt"', 'client_subject_header = "Sec-WebSocket-Key"',
     "host[0].client_subject_header",
     "'Sec-WebSocket-Key' is a header the gateway sets itself; choose another name, "
     "such as 'X-Client-Subject'"),
]


@pytest.mark.parametrize(
    ("first", "second", "key_path", "message"),
    TWO_HOST_KEYS,
    ids=["modern-with-tls12", "subject-header-not-a-token", "subject-header-reserved",
         "subject-header-sec-websocket"],
)
def test_error_between_two_host_keys(
    first: str, second: str, key_path: str, message: str, workdir: Path
) -> None:
    text = make(host=first).replace(first, first + "\n" + second)
    assert as_tuples(load_errors(text)) == [(15, key_path, message, None)]


@pytest.mark.parametrize("name", sorted(HOP_BY_HOP | CLIENT_ADDRESS_HEADERS))
def test_headers_the_gateway_sets_are_never_configurable(name: str, workdir: Path) -> None:
    """The one list in gatewayd.headers feeds both checks (and the handshake's)."""
    header = name.title()
    text = make(route='auth = "request"', extra=AUTH_URL + f'\nauth_response_headers = ["{header}"]')
    assert as_tuples(load_errors(text)) == [
        (20, "host[0].route[0].auth_response_headers[0]",
         f"'{header}' cannot be copied to the backend request: the gateway sets it itself "
         "(or it is hop-by-hop)", None)
    ]
    first = 'client_ca = "certs/chat.crt"'
    text = make(host=first).replace(first, f'{first}\nclient_subject_header = "{header}"')
    assert as_tuples(load_errors(text)) == [
        (15, "host[0].client_subject_header",
         f"'{header}' is a header the gateway sets itself; choose another name, "
         "such as 'X-Client-Subject'", None)
    ]


def test_hardening_keys_valid(workdir: Path) -> None:
    (workdir / "ca.pem").write_text("dummy CA\n")
    (workdir / "ocsp.der").write_bytes(b"dummy")
    text = make(
        gateway="max_connections_per_ip = 20",
        listener="proxy_protocol = true",
        host='profile = "modern"',
    )
    text = text.replace(
        "max_connections_per_ip = 20",
        "max_connections_per_ip = 20\nhandshakes_per_ip_per_second = 2.5\n"
        'trusted_proxies = ["10.0.0.0/8", "192.0.2.7", "2001:DB8::/32"]',
    ).replace(
        'profile = "modern"',
        'profile = "modern"\nclient_ca = "ca.pem"\nclient_subject_header = "X-Client-Subject"\n'
        'ocsp_response = "ocsp.der"\n'
        'certificates = [{certificate = "certs/chat.crt", private_key = "certs/chat.key"}]',
    )
    cfg = config.loads(text, FILE)
    gateway = cfg.gateway
    assert gateway.max_connections_per_ip == 20
    assert gateway.handshakes_per_ip_per_second == 2.5
    assert [str(n) for n in gateway.trusted_proxies] == ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]
    # Host bits are refused, as in allow/deny lists (a typo must not become a trust decision).
    with pytest.raises(ConfigErrors):
        config.loads(make(gateway='trusted_proxies = ["10.1.2.3/8"]'), FILE)
    assert cfg.listeners[0].proxy_protocol is True
    (host,) = cfg.hosts
    assert host.tls.profile == "modern" and host.tls.min_version == "TLSv1.3"
    assert host.client_ca == workdir / "ca.pem"
    assert host.client_subject_header == "X-Client-Subject"
    assert host.ocsp_response == workdir / "ocsp.der"
    assert host.certificates == (
        config.CertificatePair(
            workdir / "certs/chat.crt", workdir / "certs/chat.key", "host[0].certificates[0]"
        ),
    )
    summary = config.summary(cfg)
    assert "per ip: connections 20, handshakes 2.5/s" in summary
    assert "127.0.0.1:0  tls proxy_protocol" in summary
    assert "profile modern, min_version TLSv1.3" in summary
    assert "(subject header: X-Client-Subject)" in summary


def test_hardening_defaults(workdir: Path) -> None:
    cfg = config.loads(VALID, FILE)
    assert cfg.gateway.max_connections_per_ip == 0
    assert cfg.gateway.handshakes_per_ip_per_second == 0.0
    assert cfg.gateway.trusted_proxies == ()
    assert cfg.listeners[0].proxy_protocol is False
    (host,) = cfg.hosts
    assert host.tls.profile == "intermediate" and host.tls.min_version == "TLSv1.2"
    assert (host.certificates, host.ocsp_response, host.client_ca) == ((), None, None)
    assert host.client_subject_header == ""


@pytest.mark.parametrize(
    "line",
    ["workers = 1", "proxy_protocol = false", 'client_ca = ""', 'ocsp_response = ""'],
    ids=["workers-1", "proxy-protocol-false", "client-ca-empty", "ocsp-response-empty"],
)
def test_keys_accept_their_off_value(line: str, workdir: Path) -> None:
    slot = {
        "workers": "gateway",
        "proxy_protocol": "listener",
        "client_ca": "host",
        "ocsp_response": "host",
    }
    kwargs: dict[str, Any] = {slot[line.split()[0]]: line}
    config.loads(make(**kwargs), FILE)


def test_every_not_yet_supported_key_is_reported_not_unknown(workdir: Path) -> None:
    for item in NOT_YET_SUPPORTED:
        if item.place == "backend-scheme":
            text = make(replace={BACKEND: f'backend = "{item.key}://127.0.0.1:9000"'})
            expected = f"{item.key}:// backends are not supported by this version yet"
        elif item.place == "":
            text = make(extra=f'[{item.key}]\nlisten = "127.0.0.1:1"')
            expected = NOT_YET
        else:
            kwargs: dict[str, Any] = {item.place: f'{item.key} = "something"'}
            text = make(**kwargs)
            expected = NOT_YET
        messages = [e.message.split(" (only")[0] for e in load_errors(text)]
        assert messages == [expected], item


# ---------------------------------------------------------------------------
# Several backends, balancing, health checks, backend TLS, the bridge
# ---------------------------------------------------------------------------

BACKENDS = 'backends = ["ws://10.0.0.1:9000/chat", "ws://10.0.0.2:9000/chat"]'


def test_a_single_backend_is_a_one_element_list_with_spec_defaults(workdir: Path) -> None:
    (route,) = config.loads(VALID, FILE).hosts[0].routes
    assert route.backends == (route.backend,)
    assert (route.balance, route.max_fails, route.fail_timeout) == ("round_robin", 1, 10.0)
    assert (route.health_check, route.health_interval) == ("", 5.0)
    assert (route.backend_ca, route.backend_tls_verify) == (None, True)
    assert route.max_message_size == 16 * 1024 * 1024
    assert route.backend_max_connections == 0
    assert not route.bridge


def test_every_backend_key_is_read(workdir: Path) -> None:
    (workdir / "backend-ca.pem").write_text("dummy CA\n")
    route_lines = "\n".join([
        'backends = ["wss://a.internal:9443/chat", "wss://b.internal:9443/chat", '
        '"ws://10.0.0.3:9000/chat"]',
        'balance = "least_connections"',
        "max_fails = 3",
        "fail_timeout = 2.5",
        'health_check = "/healthz"',
        "health_interval = 1",
        'backend_ca = "backend-ca.pem"',
        "backend_tls_verify = true",
        "backend_max_connections = 50",
    ])
    cfg = config.loads(make(replace={BACKEND: ""}, extra=route_lines), FILE)
    (route,) = cfg.hosts[0].routes
    assert [b.url for b in route.backends] == [
        "wss://a.internal:9443/chat", "wss://b.internal:9443/chat", "ws://10.0.0.3:9000/chat",
    ]
    assert route.backend is route.backends[0]
    assert route.balance == "least_connections"
    assert (route.max_fails, route.fail_timeout) == (3, 2.5)
    assert (route.health_check, route.health_interval) == ("/healthz", 1.0)
    assert route.backend_ca == workdir / "backend-ca.pem"
    assert route.backend_tls_verify is True
    assert route.backend_max_connections == 50
    assert cfg.warnings == ()


def test_bridge_route_keys(workdir: Path) -> None:
    cfg = config.loads(make(
        replace={BACKEND: 'backends = ["tcp://127.0.0.1:5900", "unix+tcp:vnc.sock"]'},
        route='max_message_size = 1024',
        extra='health_check = "tcp"\nbalance = "source_ip"',
    ), FILE)
    (route,) = cfg.hosts[0].routes
    assert route.bridge
    assert [b.scheme for b in route.backends] == ["tcp", "unix+tcp"]
    assert route.max_message_size == 1024
    assert (route.health_check, route.balance) == ("tcp", "source_ip")


@pytest.mark.parametrize("mode", ["round_robin", "least_connections", "random_two", "source_ip"])
def test_every_balance_mode_is_accepted(mode: str, workdir: Path) -> None:
    cfg = config.loads(make(replace={BACKEND: BACKENDS}, route=f'balance = "{mode}"'), FILE)
    assert cfg.hosts[0].routes[0].balance == mode


@pytest.mark.parametrize(
    "line",
    ['backend_ca = ""', "backend_tls_verify = true", "max_message_size = 16777216",
     "backend_max_connections = 0", "max_fails = 0", 'health_check = ""', "health_interval = 5"],
)
def test_default_values_are_accepted_on_any_route(line: str, workdir: Path) -> None:
    assert config.loads(make(route=line), FILE).hosts[0].routes[0].backend.scheme == "ws"


def test_unverified_wss_backend_is_a_loud_warning(workdir: Path) -> None:
    cfg = config.loads(make(
        replace={BACKEND: 'backend = "wss://10.0.0.1:9443/chat"'},
        route="backend_tls_verify = false",
    ), FILE)
    assert cfg.hosts[0].routes[0].backend_tls_verify is False
    assert [(w.line, w.key_path) for w in cfg.warnings] == [
        (18, "host[0].route[0].backend_tls_verify")
    ]
    assert str(cfg.warnings[0]) == (
        "gatewayd.toml:18: host[0].route[0].backend_tls_verify: set to false: the TLS "
        "certificates of wss://10.0.0.1:9443/chat are NOT verified, so anyone on the network "
        "path to the backend can impersonate it; prefer backend_ca = \"ca.pem\""
    )


WSS = 'backend = "wss://10.0.0.1:9443/chat"'
TCP = 'backend = "tcp://127.0.0.1:5900"'

BACKEND_CASES = [
    Case("backend-and-backends", make(route='backends = ["ws://127.0.0.1:1"]'), [
        err(18, "host[0].route[0].backends",
            "set either backend (one URL) or backends (several URLs), not both")]),
    Case("backends-not-an-array", make(replace={BACKEND: 'backends = "ws://a:1"'}), [
        err(17, "host[0].route[0].backends",
            "expected an array of backend URLs, got string 'ws://a:1' "
            "(write backends = [\"ws://a:1\"])")]),
    Case("backends-empty", make(replace={BACKEND: "backends = []"}), [
        err(17, "host[0].route[0].backends", "must list at least one backend URL")]),
    Case("backends-not-a-string", make(replace={BACKEND: 'backends = ["ws://a:1", 5]'}), [
        err(17, "host[0].route[0].backends[1]", "expected a backend URL string, got integer 5")]),
    Case("backends-bad-url", make(replace={BACKEND: 'backends = ["ws://a:1", "http://b"]'}), [
        err(17, "host[0].route[0].backends[1]",
            "unsupported backend scheme 'http://'; " + SUPPORTED)]),
    Case("backends-duplicate", make(replace={BACKEND: 'backends = ["ws://a:1", "WS://A:1"]'}), [
        err(17, "host[0].route[0].backends[1]",
            "'WS://A:1' is listed twice (also host[0].route[0].backends[0] (line 17))")]),
    Case("backends-mixed-kinds",
         make(replace={BACKEND: 'backends = ["ws://a:1", "tcp://b:5900"]'}), [
        err(17, "host[0].route[0].backends[1]",
            "a route cannot mix tcp:// / unix+tcp: bridge backends with WebSocket backends "
            "(ws://, wss://, unix:): 'tcp://b:5900' here, 'ws://a:1' at "
            "host[0].route[0].backends[0] (line 17)")]),
    Case("backends-different-paths",
         make(replace={BACKEND: 'backends = ["ws://a:1/x", "ws://b:1/y", "ws://c:1"]'}), [
        err(17, "host[0].route[0].backends[1]",
            "every backend of a route must have the same path (the request path is rewritten "
            "once per route): path '/y' here, path '/x' at host[0].route[0].backends[0] "
            "(line 17)"),
        err(17, "host[0].route[0].backends[2]",
            "every backend of a route must have the same path (the request path is rewritten "
            "once per route): no path here, path '/x' at host[0].route[0].backends[0] "
            "(line 17)")]),
    Case("balance-unknown", make(route='balance = "rr"'), [
        err(18, "host[0].route[0].balance",
            "must be one of 'round_robin', 'least_connections', 'random_two', 'source_ip', "
            "got 'rr'")]),
    Case("balance-misspelt-key", make(route='balanse = "round_robin"'), [
        err(18, "host[0].route[0].balanse", "unknown key", "balance")]),
    Case("max-fails-negative", make(route="max_fails = -1"), [
        err(18, "host[0].route[0].max_fails", "must be at least 0, got -1")]),
    Case("max-fails-float", make(route="max_fails = 1.5"), [
        err(18, "host[0].route[0].max_fails", "expected an integer, got float 1.5")]),
    Case("fail-timeout-zero", make(route="fail_timeout = 0"), [
        err(18, "host[0].route[0].fail_timeout", "must be greater than 0 seconds, got 0")]),
    Case("fail-timeout-string", make(route='fail_timeout = "10s"'), [
        err(18, "host[0].route[0].fail_timeout",
            "expected a number of seconds (integer or float), got string '10s'")]),
    Case("health-check-unknown", make(route='health_check = "http"'), [
        err(18, "host[0].route[0].health_check",
            "must be \"\" (off), \"tcp\" (connect only) or a path such as \"/healthz\" "
            "(a WebSocket handshake probe), got 'http'")]),
    Case("health-check-bad-path", make(route='health_check = "/health?x=1"'), [
        err(18, "host[0].route[0].health_check",
            "must not contain '?' (a query is never part of a path), got '/health?x=1'")]),
    Case("health-check-probe-on-bridge",
         make(replace={BACKEND: TCP}, route='health_check = "/healthz"'), [
        err(18, "host[0].route[0].health_check",
            "a WebSocket handshake probe needs WebSocket backends; check tcp:// and "
            "unix+tcp: backends with health_check = \"tcp\"")]),
    Case("health-interval-zero", make(route="health_interval = 0"), [
        err(18, "host[0].route[0].health_interval", "must be greater than 0 seconds, got 0")]),
    Case("backend-ca-missing-file", make(replace={BACKEND: WSS}, route='backend_ca = "ca.pem"'), [
        err(18, "host[0].route[0].backend_ca", "file not found: {dir}/ca.pem")]),
    Case("backend-ca-without-wss", make(route='backend_ca = "certs/chat.crt"'), [
        err(18, "host[0].route[0].backend_ca",
            "only used to verify wss:// backends, and this route has none")]),
    Case("backend-ca-with-verify-off",
         make(replace={BACKEND: WSS}, route='backend_ca = "certs/chat.crt"',
              extra="backend_tls_verify = false"), [
        err(18, "host[0].route[0].backend_ca",
            "not used with backend_tls_verify = false; remove one of the two")]),
    Case("backend-tls-verify-without-wss", make(route="backend_tls_verify = false"), [
        err(18, "host[0].route[0].backend_tls_verify",
            "only applies to wss:// backends, and this route has none")]),
    Case("backend-tls-verify-not-bool",
         make(replace={BACKEND: WSS}, route='backend_tls_verify = "no"'), [
        err(18, "host[0].route[0].backend_tls_verify",
            "expected a boolean (true or false), got string 'no'")]),
    Case("max-message-size-on-passthrough", make(route="max_message_size = 1024"), [
        err(18, "host[0].route[0].max_message_size",
            "only applies to tcp:// and unix+tcp: bridge backends (passthrough backends see "
            "the frames themselves)")]),
    Case("max-message-size-zero", make(replace={BACKEND: TCP}, route="max_message_size = 0"), [
        err(18, "host[0].route[0].max_message_size", "must be at least 1, got 0")]),
    Case("backend-max-connections-negative", make(route="backend_max_connections = -1"), [
        err(18, "host[0].route[0].backend_max_connections", "must be at least 0, got -1")]),
    # SPEC section 7: plain HTTP keys.
    Case("http-on-a-bridge-route", make(replace={BACKEND: TCP}, route="http = true"), [
        err(18, "host[0].route[0].http",
            "plain HTTP is proxied to ws://, wss:// and unix: backends only; tcp:// and "
            "unix+tcp: bridge backends carry WebSocket messages, not HTTP requests")]),
    Case("http-not-bool", make(route='http = "yes"'), [
        err(18, "host[0].route[0].http", "expected a boolean (true or false), got string 'yes'")]),
    Case("max-body-size-without-http", make(route="max_body_size = 10"), [
        err(18, "host[0].route[0].max_body_size",
            "only used with http = true (a WebSocket handshake has no body)")]),
    Case("max-body-size-negative", make(route="http = true", extra="max_body_size = -1"), [
        err(19, "host[0].route[0].max_body_size", "must be at least 0, got -1")]),
    Case("gateway-http-timeout-zero", make(gateway="http_timeout = 0"), [
        err(2, "gateway.http_timeout", "must be greater than 0 seconds, got 0")]),
    Case("gateway-max-requests-zero", make(gateway="max_requests_per_connection = 0"), [
        err(2, "gateway.max_requests_per_connection", "must be at least 1, got 0")]),
]


@pytest.mark.parametrize("case", BACKEND_CASES, ids=lambda case: case.id)
def test_backend_key_error(case: Case, workdir: Path) -> None:
    expected = [
        (line, key, message.replace("{dir}", str(workdir)), suggestion)
        for line, key, message, suggestion in case.errors
    ]
    assert as_tuples(load_errors(case.text)) == expected


def test_summary_shows_backends_balance_health_and_bridge(workdir: Path) -> None:
    text = """\
[[listener]]
address = "127.0.0.1:8080"
tls = false

[[host]]
names = ["a.example"]

[[host.route]]
path = "/vnc"
backend = "tcp://127.0.0.1:5900"
subprotocols = ["binary"]

[[host.route]]
path_prefix = "/app/"
backends = ["ws://10.0.0.1:9000", "wss://10.0.0.2:9443", "unix:/run/app.sock"]
balance = "least_connections"
health_check = "/healthz"
backend_max_connections = 100

[[host.route]]
path = "/insecure"
backend = "wss://10.0.0.9:9443"
backend_tls_verify = false
"""
    lines = config.summary(config.loads(text, FILE)).split("\n")
    start = lines.index("    routes (3):")
    assert lines[start + 1:] == [
        "      /vnc       bridge     ->  tcp://127.0.0.1:5900           origins: any  subprotocols: binary"
        "  extensions: none (bridge)",
        "                                bridge: max_message_size 16777216 bytes",
        "      /app/*     websocket  ->  3 backends, least_connections  origins: any  subprotocols: any"
        "     extensions: on",
        "                                ws://10.0.0.1:9000",
        "                                wss://10.0.0.2:9443",
        "                                unix:/run/app.sock",
        "                                passive health: max_fails 1, fail_timeout 10s",
        "                                health_check WebSocket handshake /healthz every 5s",
        "                                backend_max_connections 100 per backend",
        "                                backend TLS: verified against the system CAs",
        "      /insecure  websocket  ->  wss://10.0.0.9:9443            origins: any  subprotocols: any"
        "     extensions: on",
        "                                backend TLS: certificates NOT verified (backend_tls_verify = false)",
    ]


# ---------------------------------------------------------------------------
# Several errors at once, message format, syntax and file errors
# ---------------------------------------------------------------------------


def test_three_mistakes_are_all_reported_in_file_order(workdir: Path) -> None:
    text = """\
[gateway]
max_conections = 500

[[listener]]
address = "0.0.0.0:8443"

[[host]]
names = ["chat.example.com"]
certificate = "certs/chat.crt"
private_key = "certs/chat.key"

[[host.route]]
path = "/chat"
backend = "http://127.0.0.1:9000/chat"

[[host.route]]
path_prefix = "/api/"
backend = "ws://127.0.0.1:9001"
extensions = "no"
"""
    with pytest.raises(ConfigErrors) as info:
        config.loads(text, FILE)

    assert str(info.value) == "\n".join([
        "3 configuration errors:",
        "  gatewayd.toml:2: gateway.max_conections: unknown key (did you mean 'max_connections'?)",
        "  gatewayd.toml:14: host[0].route[0].backend: unsupported backend scheme 'http://'; "
        + SUPPORTED,
        "  gatewayd.toml:19: host[0].route[1].extensions: expected a boolean (true or false), "
        "got string 'no'",
    ])


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (ConfigError("a.toml", "gateway.max_conections", "unknown key", line=3,
                     suggestion="max_connections"),
         "a.toml:3: gateway.max_conections: unknown key (did you mean 'max_connections'?)"),
        (ConfigError("a.toml", "host[1].route[0].backend", "required key is missing", line=9),
         "a.toml:9: host[1].route[0].backend: required key is missing"),
        (ConfigError("a.toml", "", "TOML syntax error: invalid value", line=2, column=7),
         "a.toml:2:7: TOML syntax error: invalid value"),
        (ConfigError("a.toml", "listener", "at least one [[listener]] is required"),
         "a.toml: listener: at least one [[listener]] is required"),
    ],
    ids=["suggestion", "key-path-and-line", "syntax-line-column", "no-line"],
)
def test_config_error_format(error: ConfigError, text: str) -> None:
    assert str(error) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[gateway]\nmax_connections = \n",
         "gatewayd.toml:2:19: TOML syntax error: invalid value"),
        ("[gateway]\nmax_connections = 5 6\n",
         "gatewayd.toml:2:21: TOML syntax error: expected newline or end of document after a "
         "statement"),
        ("[gateway]\nidle_timeout = 1\nidle_timeout = 2\n",
         "gatewayd.toml:3:17: TOML syntax error: cannot overwrite a value"),
        ("[[listener]]\naddress = [1,\n",
         "gatewayd.toml:3:1: TOML syntax error: invalid value (at end of file)"),
        ('[log]\nlevel = "info\n',
         "gatewayd.toml:2:14: TOML syntax error: illegal character '\\n'"),
        ('[log]\nlevel = """info\n',
         "gatewayd.toml:3:1: TOML syntax error: unterminated string (at end of file)"),
    ],
    ids=["missing-value", "two-values", "duplicate-key", "unclosed-array-at-end",
         "newline-in-string", "unterminated-string"],
)
def test_syntax_error_has_line_and_column(text: str, expected: str) -> None:
    with pytest.raises(ConfigErrors) as info:
        config.loads(text, FILE)
    (error,) = info.value.errors
    assert str(error) == expected
    assert error.line is not None and error.column is not None


def test_load_reads_the_file(workdir: Path) -> None:
    (workdir / FILE).write_text(VALID)
    assert config.load(Path(FILE)).path == workdir / FILE


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda d: None, "missing.toml: configuration file not found"),
        (lambda d: (d / "missing.toml").mkdir(),
         "missing.toml: is a directory, not a configuration file"),
        (lambda d: (d / "missing.toml").write_bytes(b"[log]\nlevel = \"caf\xe9\"\n"),
         "missing.toml:2:13: not valid UTF-8 (byte 0xe9); TOML files must be UTF-8"),
    ],
    ids=["not-found", "directory", "not-utf8"],
)
def test_file_errors(setup: object, expected: str, workdir: Path) -> None:
    assert callable(setup)
    setup(workdir)
    with pytest.raises(ConfigErrors) as info:
        config.load("missing.toml")
    assert [str(e) for e in info.value.errors] == [expected]


# ---------------------------------------------------------------------------
# Values: names, backends, origins, paths
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Chat.Example.COM.", "chat.example.com"),
        ("*.Example.org", "*.example.org"),
        ("localhost", "localhost"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("0:0::1", "::1"),
        ("a-b.c-d.example", "a-b.c-d.example"),
    ],
)
def test_host_names_are_normalized(name: str, expected: str, workdir: Path) -> None:
    cfg = config.loads(make(replace={NAMES: f'names = ["{name}"]'}), FILE)
    assert cfg.hosts[0].names == (expected,)


@pytest.mark.parametrize(
    "name",
    ["", "*", "*example.org", "a.*.org", "**.example.org", "-a.example", "a-.example",
     "a..example", "256.1.1.1", "a" * 64 + ".example", " a.example", "ex ample.org"],
)
def test_invalid_host_names(name: str, workdir: Path) -> None:
    errors = load_errors(make(replace={NAMES: f'names = ["{name}"]'}))
    assert [e.key_path for e in errors] == ["host[0].names[0]"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ws://127.0.0.1:9000/chat",
         dict(scheme="ws", host="127.0.0.1", port=9000, path="/chat", unix_path=None)),
        ("ws://backend", dict(scheme="ws", host="backend", port=80, path=None)),
        ("ws://backend:8080/", dict(scheme="ws", host="backend", port=8080, path="/")),
        ("WS://Backend.Example:81/X",
         dict(scheme="ws", host="backend.example", port=81, path="/X")),
        ("ws://[::1]:9000/x", dict(scheme="ws", host="::1", port=9000, path="/x")),
        ("ws://[::1]", dict(scheme="ws", host="::1", port=80, path=None)),
        ("ws://b/a/b/", dict(scheme="ws", host="b", port=80, path="/a/b/")),
        ("unix:/run/app.sock",
         dict(scheme="unix", unix_path=Path("/run/app.sock"), path=None, host=None, port=None)),
        ("unix:/run/app.sock:/ws",
         dict(scheme="unix", unix_path=Path("/run/app.sock"), path="/ws")),
        ("unix:/run/app.sock:/", dict(scheme="unix", unix_path=Path("/run/app.sock"), path="/")),
        ("unix:run/app.sock", dict(scheme="unix", unix_path="{dir}/run/app.sock", path=None)),
        ("unix:../app.sock:/x", dict(scheme="unix", unix_path="{parent}/app.sock", path="/x")),
        ("wss://backend.example/chat",
         dict(scheme="wss", host="backend.example", port=443, path="/chat", tls=True)),
        ("WSS://[::1]:9443", dict(scheme="wss", host="::1", port=9443, path=None, tls=True)),
        ("tcp://127.0.0.1:5900",
         dict(scheme="tcp", host="127.0.0.1", port=5900, path=None, bridge=True, tls=False)),
        ("tcp://vnc.internal:5901/", dict(scheme="tcp", host="vnc.internal", port=5901, path=None)),
        ("unix+tcp:/run/vnc.sock",
         dict(scheme="unix+tcp", unix_path=Path("/run/vnc.sock"), path=None, bridge=True)),
        ("unix+tcp:run/vnc.sock", dict(scheme="unix+tcp", unix_path="{dir}/run/vnc.sock")),
    ],
)
def test_backend_urls(url: str, expected: dict[str, object], workdir: Path) -> None:
    cfg = config.loads(make(replace={BACKEND: f'backend = "{url}"'}), FILE)
    backend = cfg.hosts[0].routes[0].backend
    assert backend.url == url
    assert str(backend) == url
    for attr, value in expected.items():
        if isinstance(value, str) and value.startswith("{"):
            value = Path(value.format(dir=workdir, parent=workdir.parent))
        assert getattr(backend, attr) == value, attr


@pytest.mark.parametrize(
    ("origin", "expected"),
    [
        ("https://chat.example.com", "https://chat.example.com"),
        ("HTTPS://Chat.Example.COM", "https://chat.example.com"),
        ("https://chat.example.com:443", "https://chat.example.com"),
        ("http://chat.example.com:80", "http://chat.example.com"),
        ("https://chat.example.com:8443", "https://chat.example.com:8443"),
        ("http://[::1]:3000", "http://[::1]:3000"),
        ("http://127.0.0.1:3000", "http://127.0.0.1:3000"),
        ("null", "null"),
        ("chrome-extension://abcdef", "chrome-extension://abcdef"),
    ],
)
def test_origins_are_normalized(origin: str, expected: str, workdir: Path) -> None:
    cfg = config.loads(make(route=f'origins = ["{origin}"]'), FILE)
    assert cfg.hosts[0].routes[0].origins == (expected,)


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc" / "gatewayd"
    (folder / "tls").mkdir(parents=True)
    (folder / "tls" / "a.crt").write_text("x")
    (tmp_path / "etc" / "shared.key").write_text("x")
    absolute = tmp_path / "absolute.crt"
    absolute.write_text("x")
    (folder / "gatewayd.toml").write_text(make(
        replace={CERT: 'certificate = "tls/a.crt"', KEY: 'private_key = "../shared.key"',
                 BACKEND: 'backend = "unix:run/app.sock"'},
        extra=f'[[host]]\nnames = ["b.example"]\ncertificate = "{absolute}"\n'
              f'private_key = "tls/a.crt"\n[[host.route]]\npath = "/"\nbackend = "ws://b"',
    ))
    monkeypatch.chdir(tmp_path)  # the working directory must not matter

    cfg = config.load("etc/gatewayd/gatewayd.toml")

    assert cfg.path == folder / "gatewayd.toml"
    assert cfg.hosts[0].certificate == folder / "tls" / "a.crt"
    assert cfg.hosts[0].private_key == tmp_path / "etc" / "shared.key"
    assert cfg.hosts[0].routes[0].backend.unix_path == folder / "run" / "app.sock"
    assert cfg.hosts[1].certificate == absolute
    assert all(p.is_absolute() for h in cfg.hosts for p in (h.certificate, h.private_key) if p)


def test_every_problem_is_collected_not_just_the_first(workdir: Path) -> None:
    text = make(
        gateway="max_connections = 0",
        log='level = "loud"',
        tls='min_version = "SSLv3"',
        listener="tls = 3",
        host="default = 1",
        route='subprotocols = ["a b"]',
        replace={BACKEND: 'backend = "ftp://x"'},
    )
    errors = load_errors(text)
    assert [(e.line, e.key_path) for e in errors] == [
        (2, "gateway.max_connections"),
        (4, "log.level"),
        (6, "tls.min_version"),
        (9, "listener[0].tls"),
        (14, "host[0].default"),
        (17, "host[0].route[0].backend"),
        (18, "host[0].route[0].subprotocols[0]"),
    ]


# ---------------------------------------------------------------------------
# The locator: key path -> line
# ---------------------------------------------------------------------------

LOCATOR_TEXT = '''\
# a comment with [brackets] and key = "value"
title = """
[[host]]
names = ["not", "a", "table"]
"""
[gateway]
"max_connections" = 5
'quoted key' = 1
dotted.inner.key = true   # comment

[[host]]
names = [
  "a.example",  # first
  'b.example',
]
text = \'\'\'
[[host.route]]
\'\'\'
[[host.route]]
path = "/a"
[[host.route]]
inline = { x = 1, "y" = [1, 2] }
[[host]]
[[host.route]]
backend = "ws://x#not-a-comment"
when = 1979-05-27 07:32:00
after = 1
[ host . extra ]
value = 2
'''


@pytest.mark.parametrize(
    ("path", "line"),
    [
        (("title",), 2),
        (("gateway",), 6),
        (("gateway", "max_connections"), 7),
        (("gateway", "quoted key"), 8),
        (("gateway", "dotted"), 9),
        (("gateway", "dotted", "inner", "key"), 9),
        (("host",), 11),
        (("host", 0), 11),
        (("host", 0, "names"), 12),
        (("host", 0, "names", 0), 13),
        (("host", 0, "names", 1), 14),
        (("host", 0, "text"), 16),
        (("host", 0, "route", 0), 19),
        (("host", 0, "route", 0, "path"), 20),
        (("host", 0, "route", 1), 21),
        (("host", 0, "route", 1, "inline"), 22),
        (("host", 0, "route", 1, "inline", "y", 1), 22),
        (("host", 1), 23),
        (("host", 1, "route", 0), 24),
        (("host", 1, "route", 0, "backend"), 25),
        (("host", 1, "route", 0, "after"), 27),
        (("host", 1, "extra", "value"), 29),
        # Not in the file: the nearest enclosing table.
        (("host", 1, "route", 0, "missing"), 24),
        (("host", 0, "route", 1, "inline", "z"), 22),
        (("nowhere",), None),
    ],
    ids=lambda value: config.format_key_path(value) if isinstance(value, tuple) else str(value),
)
def test_locator(path: tuple[str | int, ...], line: int | None) -> None:
    tomllib.loads(LOCATOR_TEXT)  # the locator only ever sees valid TOML
    assert Locator.scan(LOCATOR_TEXT).line_of(path) == line


def test_locator_handles_crlf_and_escapes() -> None:
    text = '[gateway]\r\n"a\\"b" = 1\r\nmulti = """x\\"""\r\n"""\r\nlast = 2\r\n'
    assert tomllib.loads(text)["gateway"]["last"] == 2
    locator = Locator.scan(text)
    assert locator.line_of(("gateway", 'a"b')) == 2
    assert locator.line_of(("gateway", "last")) == 5


@pytest.mark.parametrize(
    ("path", "text"),
    [
        (("host", 1, "route", 0, "backend"), "host[1].route[0].backend"),
        (("gateway", "max conn"), 'gateway."max conn"'),
        (("tls", "min_version"), "tls.min_version"),
        ((), ""),
    ],
)
def test_format_key_path(path: tuple[str | int, ...], text: str) -> None:
    assert config.format_key_path(path) == text


# ---------------------------------------------------------------------------
# Access control: redirect, allow/deny, auth (SPEC rows 9a, 9b, 14a)
# ---------------------------------------------------------------------------

BCRYPT_HASH = bcrypt.hashpw(b"secret", bcrypt.gensalt(4)).decode()

ACCESS = """\
[[listener]]
address = "127.0.0.1:0"
tls = false

[[host]]
names = ["chat.example.com"]
allow = ["10.0.0.0/8", "::ffff:192.168.0.0/112", "2001:db8::/32"]
deny = ["10.0.0.5"]

[[host.route]]
path_prefix = "/old/"
redirect = "wss://new.example.com/new/?from=old"
redirect_status = 301

[[host.route]]
path = "/moved"
redirect = "https://new.example.com"

[[host.route]]
path = "/basic"
backend = "ws://127.0.0.1:9000"
auth = "basic"
auth_users = "users.htpasswd"
realm = "Chat staff"
auth_forward = true
deny = ["10.9.0.0/16"]

[[host.route]]
path = "/sso"
backend = "ws://127.0.0.1:9000"
auth = "request"
auth_url = "http://[::1]:9100/check?app=chat"
auth_response_headers = ["X-User", "X-Groups"]
auth_cache_seconds = 30

[[host.route]]
path = "/sock"
backend = "ws://127.0.0.1:9000"
auth = "request"
auth_url = "unix:run/auth.sock:/verify"
"""


def test_access_keys_are_read(workdir: Path) -> None:
    (workdir / "users.htpasswd").write_text(f"# staff\n\nalice:{BCRYPT_HASH}\nbob:{BCRYPT_HASH}\n")
    cfg = config.loads(ACCESS, FILE)
    (host,) = cfg.hosts
    assert host.access == config.AccessList(
        allow=(
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("192.168.0.0/16"),  # IPv4-mapped IPv6 stored as IPv4
            ipaddress.ip_network("2001:db8::/32"),
        ),
        deny=(ipaddress.ip_network("10.0.0.5/32"),),
    )
    old, moved, basic, sso, sock = host.routes

    assert old.backend is None
    assert old.redirect == config.Redirect(
        url="wss://new.example.com/new/?from=old",
        origin="wss://new.example.com",
        path="/new/",
        query="from=old",
        status=301,
    )
    assert moved.redirect == config.Redirect(
        url="https://new.example.com", origin="https://new.example.com", path=None, query=None
    )
    assert moved.redirect.status == 308

    assert basic.auth == config.BasicAuth(
        users_file=workdir / "users.htpasswd",
        users=((b"alice", BCRYPT_HASH.encode()), (b"bob", BCRYPT_HASH.encode())),
        realm="Chat staff",
    )
    assert "secret" not in repr(basic.auth) and "$2b$" not in repr(basic.auth)
    assert basic.auth_forward is True
    assert basic.access == config.AccessList(deny=(ipaddress.ip_network("10.9.0.0/16"),))

    assert sso.auth == config.ForwardAuth(
        url="http://[::1]:9100/check?app=chat",
        scheme="http",
        target="/check?app=chat",
        host="::1",
        port=9100,
        response_headers=("X-User", "X-Groups"),
        cache_seconds=30.0,
    )
    assert sso.auth.host_header == "[::1]:9100"
    assert sso.auth_forward is False
    assert not sso.access

    assert sock.auth == config.ForwardAuth(
        url="unix:run/auth.sock:/verify",
        scheme="unix",
        target="/verify",
        unix_path=workdir / "run" / "auth.sock",
    )
    assert sock.auth.host_header == "localhost"


def test_access_defaults_are_off(workdir: Path) -> None:
    (route,) = config.loads(VALID, FILE).hosts[0].routes
    assert route.redirect is None and route.auth is None and route.auth_forward is False
    assert not route.access and not config.loads(VALID, FILE).hosts[0].access


def test_redirect_route_needs_no_backend_and_realm_defaults(workdir: Path) -> None:
    (workdir / "u").write_text(f"alice:{BCRYPT_HASH}\n")
    text = make(replace={BACKEND: 'redirect = "ws://127.0.0.1:9/x"'})
    assert config.loads(text, FILE).hosts[0].routes[0].redirect is not None
    route = config.loads(make(route='auth = "basic"', extra='auth_users = "u"'), FILE).hosts[0].routes[0]
    assert isinstance(route.auth, config.BasicAuth) and route.auth.realm == "gatewayd"


SALT = "$2b$10$" + "." * 21 + "O"
USERS_FILE_CASES = [
    ("plain-text", "carol:hunter2",
     "a plain-text password (htpasswd -p) or a hash of an unknown kind"),
    ("des-crypt", "carol:rqXexS6ZhobKA", "a DES crypt hash (htpasswd -d), or a plain-text password"),
    ("md5-apr1", "carol:$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/", "an MD5-apr1 hash ($apr1$, htpasswd -m)"),
    ("md5-crypt", "carol:$1$saltsalt$qjXMvbEw8oaL.CzflDugX/", "an MD5-crypt hash ($1$)"),
    ("sha256-crypt", "carol:$5$salt$Gcm6FsVtF/Qa77ZKD.iwsJlCVPY0XSMgLJL0Hnww/c1", "a SHA-256-crypt hash ($5$)"),
    ("sha512-crypt", "carol:$6$salt$IxDD3jeSOb5eB1CX5LBsqZFVkJdido3OUILO5Ifz5iwMuTS4XMS130MTSuDDl3aCI6WouIL9AjRbLCelDCy.g.", "a SHA-512-crypt hash ($6$)"),
    ("sha1", "carol:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "an unsalted SHA-1 hash ({SHA}, htpasswd -s)"),
    ("ssha", "carol:{SSHA}abcdefghijklmnopqrstuvwxyz012345", "a salted SHA-1 hash ({SSHA})"),
    ("yescrypt", "carol:$y$j9T$salt$hash", "a crypt(3) hash of another kind"),
    ("truncated-bcrypt", "carol:$2y$10$abc", "a malformed bcrypt hash"),
    ("bcrypt-bad-salt-bits", "carol:$2y$10$" + "." * 21 + "a" + "." * 31, "a malformed bcrypt hash"),
    ("bcrypt-cost-3", "carol:$2b$03$" + "." * 53,
     "a bcrypt hash with cost 3, outside 4..17 (htpasswd -B -C 10 is a good choice)"),
    ("bcrypt-cost-31", "carol:$2b$31$" + "." * 53,
     "a bcrypt hash with cost 31, outside 4..17 (htpasswd -B -C 10 is a good choice)"),
]


@pytest.mark.parametrize(
    "line, kind", [c[1:] for c in USERS_FILE_CASES], ids=[c[0] for c in USERS_FILE_CASES]
)
def test_users_file_refuses_everything_but_bcrypt(line: str, kind: str, workdir: Path) -> None:
    users = workdir / "users"
    users.write_text(f"alice:{BCRYPT_HASH}\n# a comment\n{line}\n")
    errors = load_errors(make(route='auth = "basic"', extra='auth_users = "users"'))
    assert as_tuples(errors) == [
        (19, "host[0].route[0].auth_users",
         f"{users}:3: user 'carol' has {kind}; only bcrypt hashes ($2y$, $2b$, $2a$) are "
         f"accepted: re-create it with 'htpasswd -B {users} carol'", None)
    ]
    # The message names the user, never the password or the hash.
    secret = line.split(":", 1)[1]
    assert secret not in str(errors[0])


@pytest.mark.parametrize("prefix", ["$2y$", "$2b$", "$2a$"])
def test_users_file_accepts_each_bcrypt_prefix(prefix: str, workdir: Path) -> None:
    (workdir / "users").write_text(f"  alice:{prefix}{BCRYPT_HASH[4:]}  \r\n")
    route = config.loads(make(route='auth = "basic"', extra='auth_users = "users"'), FILE).hosts[0].routes[0]
    assert isinstance(route.auth, config.BasicAuth)
    assert route.auth.users == ((b"alice", f"{prefix}{BCRYPT_HASH[4:]}".encode()),)


@pytest.mark.parametrize(
    "content, message",
    [
        pytest.param(b"", "{users}: no users in the file (lines are 'user:bcrypt-hash')", id="empty"),
        pytest.param(b"# only a comment\n", "{users}: no users in the file (lines are 'user:bcrypt-hash')", id="comments-only"),
        pytest.param(b"alice\n", "{users}:1: expected 'user:bcrypt-hash' (as htpasswd -B writes)", id="no-colon"),
        pytest.param(b":" + BCRYPT_HASH.encode() + b"\n", "{users}:1: expected 'user:bcrypt-hash' (as htpasswd -B writes)", id="no-user"),
        pytest.param(b"al\xffice:x\n", "{users}:1: not valid UTF-8", id="not-utf8"),
        pytest.param(f"alice:{BCRYPT_HASH}\nalice:{BCRYPT_HASH}\n".encode(),
                     "{users}:2: user 'alice' is listed twice (also line 1)", id="duplicate-user"),
    ],
)
def test_users_file_errors(content: bytes, message: str, workdir: Path) -> None:
    users = workdir / "users"
    users.write_bytes(content)
    errors = load_errors(make(route='auth = "basic"', extra='auth_users = "users"'))
    assert as_tuples(errors) == [
        (19, "host[0].route[0].auth_users", message.replace("{users}", str(users)), None)
    ]


def test_users_file_missing(workdir: Path) -> None:
    errors = load_errors(make(route='auth = "basic"', extra='auth_users = "nope"'))
    assert as_tuples(errors) == [
        (19, "host[0].route[0].auth_users", f"file not found: {workdir / 'nope'}", None)
    ]


def test_users_file_is_read_at_every_load(workdir: Path) -> None:
    """A reload is a new load: it sees the users file as it is now."""
    users = workdir / "users"
    text = make(route='auth = "basic"', extra='auth_users = "users"')
    users.write_text(f"alice:{BCRYPT_HASH}\n")
    first = config.loads(text, FILE).hosts[0].routes[0].auth
    users.write_text(f"alice:{BCRYPT_HASH}\nbob:{BCRYPT_HASH}\n")
    second = config.loads(text, FILE).hosts[0].routes[0].auth
    assert isinstance(first, config.BasicAuth) and isinstance(second, config.BasicAuth)
    assert [u for u, _ in first.users] == [b"alice"]
    assert [u for u, _ in second.users] == [b"alice", b"bob"]
    users.write_text("bob:plain\n")
    assert "has a plain-text password" in load_errors(text)[0].message


def test_summary_shows_access_rules(workdir: Path) -> None:
    (workdir / "users.htpasswd").write_text(f"alice:{BCRYPT_HASH}\nbob:{BCRYPT_HASH}\n")
    lines = config.summary(config.loads(ACCESS, FILE)).split("\n")
    users = workdir / "users.htpasswd"
    assert (
        "    access       allow 10.0.0.0/8, 192.168.0.0/16, 2001:db8::/32; deny 10.0.0.5/32 "
        "(every route)"
    ) in lines
    routes = [" ".join(line.split()) for line in lines if " -> " in line]
    assert "/old/* redirect -> redirect 301 wss://new.example.com/new/?from=old" in routes
    assert "/moved redirect -> redirect 308 https://new.example.com" in routes
    assert (
        f'        access: auth basic (realm "Chat staff", 2 users from {users}); '
        "Authorization forwarded; deny 10.9.0.0/16"
    ) in lines
    assert (
        "        access: auth request http://[::1]:9100/check?app=chat "
        "(copies X-User, X-Groups; cache 30s); Authorization removed"
    ) in lines
    assert (
        f"        access: auth request unix:{workdir / 'run' / 'auth.sock'}:/verify; "
        "Authorization removed"
    ) in lines
    assert all(line == line.rstrip() for line in lines)


def access_doc_examples() -> list[tuple[str, str]]:
    """Every complete TOML example (it has a [[listener]]) about access control."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Access control") :]
    section = section[: section.index("\n### ", 1)]
    sources = [("README", section), ("access-control.md", (REPO / "docs" / "access-control.md").read_text())]
    found = []
    for name, text in sources:
        for index, block in enumerate(re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL)):
            if "[[listener]]" in block:
                found.append((f"{name}-{index}", block))
    return found


@pytest.mark.parametrize("text", [t for _, t in access_doc_examples()], ids=[i for i, _ in access_doc_examples()])
def test_access_doc_examples_load(text: str, workdir: Path) -> None:
    """The documented examples are complete files the loader accepts (file paths
    pointed at stand-ins)."""
    (workdir / "users.htpasswd").write_text(f"alice:{BCRYPT_HASH}\n")
    for key, stand_in in (("certificate", "certs/chat.crt"), ("private_key", "certs/chat.key")):
        text = re.sub(rf'^{key} = ".*?"', f'{key} = "{stand_in}"', text, flags=re.MULTILINE)
    cfg = config.loads(text, FILE)
    assert cfg.hosts and all(host.routes for host in cfg.hosts)


def test_access_doc_examples_cover_each_mechanism() -> None:
    examples = access_doc_examples()
    readme = "\n".join(text for name, text in examples if name.startswith("README"))
    for key in ("redirect =", "allow =", 'auth = "basic"', 'auth = "request"'):
        assert key in readme, key
    assert len([name for name, _ in examples if name.startswith("access-control")]) >= 4


# ---------------------------------------------------------------------------
# summary() and default_config_path()
# ---------------------------------------------------------------------------

TWO_HOSTS = """\
[[listener]]
address = "0.0.0.0:8443"

[[listener]]
address = "127.0.0.1:8080"
tls = false

[[host]]
names = ["chat.example.com", "*.example.org"]
certificate = "certs/chat.crt"
private_key = "certs/chat.key"
min_version = "TLSv1.3"

[[host.route]]
path = "/chat"
backend = "ws://127.0.0.1:9000/chat"
origins = ["https://chat.example.com"]
subprotocols = ["chat.v2", "chat.v1"]

[[host.route]]
path_prefix = "/api/"
backend = "unix:/run/api.sock"
extensions = false

[[host]]
names = ["other.example.net"]
certificate = "certs/chat.crt"
private_key = "certs/chat.key"
default = true

[[host.route]]
path_prefix = "/"
backend = "ws://10.0.0.2"
"""


def test_summary_of_two_hosts(workdir: Path) -> None:
    text = config.summary(config.loads(TWO_HOSTS, FILE))
    lines = text.split("\n")
    crt, key = workdir / "certs" / "chat.crt", workdir / "certs" / "chat.key"

    assert lines[0] == f"configuration {workdir / FILE}"
    assert "listeners (2):" in lines
    assert "  0.0.0.0:8443    tls" in lines
    assert "  127.0.0.1:8080  plain" in lines
    assert "hosts (2):" in lines
    assert "  host[0]  chat.example.com, *.example.org" in lines
    assert "  host[1]  other.example.net  (default)" in lines
    assert lines.count(f"    certificate  {crt}") == 2
    assert lines.count(f"    private_key  {key}") == 2
    assert "    tls          profile intermediate, min_version TLSv1.3, ciphers ECDHE+AESGCM:ECDHE+CHACHA20" in lines
    assert "    tls          profile intermediate, min_version TLSv1.2, ciphers ECDHE+AESGCM:ECDHE+CHACHA20" in lines
    route_lines = [line for line in lines if "->" in line]
    assert route_lines == [
        "      /chat   websocket  ->  ws://127.0.0.1:9000/chat  origins: https://chat.example.com  "
        "subprotocols: chat.v2, chat.v1  extensions: on",
        "      /api/*  websocket  ->  unix:/run/api.sock        origins: any                       "
        "subprotocols: any               extensions: off",
        "      /*      websocket  ->  ws://10.0.0.2             origins: any                       "
        "subprotocols: any               extensions: on",
    ]
    assert all(line == line.rstrip() for line in lines)
    assert len(lines) < 40


def test_summary_of_a_plain_config_shows_no_tls_lines(workdir: Path) -> None:
    text = config.summary(config.loads(make(
        gateway="idle_timeout = 90",
        listener="tls = false",
        replace={CERT: "", KEY: ""},
    ), FILE))
    assert "certificate" not in text and "min_version" not in text
    assert "timeouts  handshake 10s, backend_connect 5s, idle 90s, shutdown 30s" in text
    assert "  127.0.0.1:0  plain  (any free port)" in text.split("\n")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (None, "/etc/gatewayd/gatewayd.toml"),
        ("", "/etc/gatewayd/gatewayd.toml"),
        ("/srv/gw.toml", "/srv/gw.toml"),
    ],
    ids=["unset", "empty", "set"],
)
def test_default_config_path(
    env: str | None, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if env is None:
        monkeypatch.delenv("GATEWAYD_CONFIG", raising=False)
    else:
        monkeypatch.setenv("GATEWAYD_CONFIG", env)
    assert config.default_config_path() == expected


@pytest.mark.parametrize(
    "module", sorted((REPO / "gatewayd" / "config").glob("*.py")), ids=lambda path: path.name
)
def test_config_module_stays_pure(module: Path) -> None:
    source = module.read_text()
    imports = re.findall(r"^\s*(?:import|from)\s+([\w.]+)", source, flags=re.MULTILINE)
    assert {name.split(".")[0] for name in imports}.isdisjoint({"trio", "OpenSSL", "ssl"})


def test_auth_response_header_cannot_be_the_client_subject_header(workdir: Path) -> None:
    (workdir / "ca.pem").write_text("dummy CA\n")
    text = (
        make(host='client_ca = "ca.pem"', route='auth = "request"')
        .replace('client_ca = "ca.pem"', 'client_ca = "ca.pem"\nclient_subject_header = "X-Client-Subject"')
        .replace(
            'auth = "request"',
            'auth = "request"\nauth_url = "http://127.0.0.1:9100/check"\n'
            'auth_response_headers = ["X-User", "x-client-subject"]',
        )
    )
    with pytest.raises(ConfigErrors) as info:
        config.loads(text, FILE)
    (error,) = info.value.errors
    assert error.key_path == "host[0].route[0].auth_response_headers"
    assert "is this host's client_subject_header" in error.message


def test_summary_shows_route_kinds_and_http_settings(workdir: Path) -> None:
    text = """\
[gateway]
max_body_size = 0
http_timeout = 90

[[listener]]
address = "127.0.0.1:8080"
tls = false

[[host]]
names = ["a.example"]

[[host.route]]
path_prefix = "/app/"
backend = "ws://127.0.0.1:3000"
http = true
max_body_size = 4096

[[host.route]]
path = "/ws"
backend = "ws://127.0.0.1:3001"
"""
    lines = config.summary(config.loads(text, FILE)).split("\n")
    assert (
        "http      http_keepalive_timeout 75s, max_requests_per_connection 1000, max_body_size 0 bytes, "
        "http_timeout 90s"
    ) in lines
    routes = [" ".join(line.split()) for line in lines if " -> " in line]
    assert routes == [
        "/app/* websocket+http -> ws://127.0.0.1:3000 origins: any subprotocols: any extensions: on",
        "/ws websocket -> ws://127.0.0.1:3001 origins: any subprotocols: any extensions: on",
    ]
    app = next(index for index, line in enumerate(lines) if "/app/*" in line)
    assert " ".join(lines[app + 1].split()) == (
        "http: max_body_size 4096 bytes"
    )
