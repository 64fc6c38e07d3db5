"""The files in systemd/ agree with each other, with the program and with docs/deploy.md.

These are static checks that run anywhere (no systemd needed): the units are parsed
the way systemd reads them (systemd.syntax(7): a key may repeat, and order matters
for ExecReload=), and every command, path, user and address they name is checked
against the program itself (its command line, its default configuration path, its
shutdown and connection defaults, its socket-activation matching) and against the
other snippets. That the units really work under systemd is proven by
systemd/verify-in-container.sh on a booted systemd; see systemd/README.md.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from gatewayd.cli import main, match_inherited
from gatewayd.config import GatewaySettings, default_config_path, load
from gatewayd.connection import CLOSE_SECONDS
from gatewayd.notify import InheritedSocket
from gatewayd.server import FORCED_CLOSE_SPREAD

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
SYSTEMD = REPO / "systemd"
DEPLOY_DOC = REPO / "docs" / "deploy.md"

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """Parse a unit file as systemd does: sections, ``Key=Value``, repeated keys kept in order.

    Comments start with ``#`` or ``;``; a trailing backslash continues the line. An empty
    assignment (``Key=``) resets the list, as it does in systemd for list-valued keys.
    """
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and section is not None, f"{path.name}:{number}: not a Key=Value line: {raw!r}"
        values = section.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    """The single value of ``key`` (repeated keys are a test failure here)."""
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}: expected one value, got {values}"
    return values[0]


def seconds(value: str) -> float:
    """A systemd time span ("45s", "2min", "1min 30s", "90") in seconds."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts and "".join(n + u for n, u in parts) == value.replace(" ", ""), value
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(scope="module")
def service() -> Unit:
    return parse_unit(SYSTEMD / "gatewayd.service")


@pytest.fixture(scope="module")
def socket_unit() -> Unit:
    return parse_unit(SYSTEMD / "gatewayd.socket")


def sysusers_entries() -> list[list[str]]:
    lines = (SYSTEMD / "gatewayd.sysusers").read_text(encoding="utf-8").splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.startswith("#")]


def tmpfiles_entries() -> list[list[str]]:
    lines = (SYSTEMD / "gatewayd.tmpfiles").read_text(encoding="utf-8").splitlines()
    return [line.split() for line in lines if line.strip() and not line.startswith("#")]


# ---------------------------------------------------------------- the commands


def commands(service: Unit) -> dict[str, list[list[str]]]:
    return {
        key: [shlex.split(value) for value in service["Service"].get(key, [])]
        for key in ("ExecStartPre", "ExecStart", "ExecReload")
    }


def test_unit_sections(service: Unit, socket_unit: Unit) -> None:
    assert set(service) == {"Unit", "Service", "Install"}
    assert set(socket_unit) == {"Unit", "Socket", "Install"}
    assert one(service, "Install", "WantedBy") == "multi-user.target"
    assert one(socket_unit, "Install", "WantedBy") == "sockets.target"


def test_start_and_run_use_the_installed_program_and_the_default_config(
    service: Unit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ExecStartPre checks, ExecStart runs: the venv's console script, the default file."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["gatewayd"] == "gatewayd.cli:main"
    monkeypatch.delenv("GATEWAYD_CONFIG", raising=False)
    config = default_config_path()
    assert config == "/etc/gatewayd/gatewayd.toml"
    cmd = commands(service)
    program = "/opt/gatewayd/bin/gatewayd"   # the console script of the venv in /opt/gatewayd
    assert cmd["ExecStartPre"] == [[program, "check", "-q", "-c", config]]
    assert cmd["ExecStart"] == [[program, "run", "-c", config]]


def test_exec_reload_checks_then_signals_then_waits(service: Unit) -> None:
    """check (a broken file fails `systemctl reload`), SIGHUP, then the sleep that makes
    systemd 252 see RELOADING=1 before the job ends (docs/deploy.md, "Reload")."""
    check, kill, sleep = commands(service)["ExecReload"]
    assert check == commands(service)["ExecStartPre"][0]
    assert kill == ["/bin/kill", "-HUP", "$MAINPID"]
    assert sleep[0] == "/bin/sleep" and 0 < float(sleep[1]) <= 1


@pytest.mark.parametrize("subcommand", ["check", "run"])
def test_the_unit_commands_are_valid_command_lines(
    service: Unit, subcommand: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The program accepts the units' arguments: exit 1 (no such file), never 2 (usage)."""
    argv = next(c for c in commands(service)["ExecStartPre"] + commands(service)["ExecStart"] if c[1] == subcommand)
    missing = str(tmp_path / "missing.toml")
    assert main([*argv[1:-1], missing]) == 1
    assert "missing.toml" in capsys.readouterr().err


def test_notify_type_works_on_systemd_252(service: Unit) -> None:
    """Type=notify-reload is unknown to Debian 12's systemd 252 (it would run Type=simple)."""
    assert one(service, "Service", "Type") == "notify"
    assert one(service, "Service", "NotifyAccess") == "main"


# ---------------------------------------------------------------- lifecycle bounds


def test_stop_timeout_covers_the_default_drain(service: Unit) -> None:
    """TimeoutStopSec must outlast shutdown_timeout + the forced-close spread + closing."""
    drain = GatewaySettings().shutdown_timeout + FORCED_CLOSE_SPREAD + 2 * CLOSE_SECONDS
    assert seconds(one(service, "Service", "TimeoutStopSec")) >= drain + 5


def test_watchdog_and_restart(service: Unit) -> None:
    assert 10 <= seconds(one(service, "Service", "WatchdogSec")) <= 120
    assert one(service, "Service", "Restart") == "on-failure"
    restart = seconds(one(service, "Service", "RestartSec"))
    interval = seconds(one(service, "Unit", "StartLimitIntervalSec"))
    burst = int(one(service, "Unit", "StartLimitBurst"))
    # The start limit is reachable: `burst` restarts fit in the interval (else a broken file
    # at boot would be retried forever).
    assert burst * restart < interval


def test_open_file_limit_fits_the_default_max_connections(service: Unit) -> None:
    """Two descriptors per spliced connection (client + backend), plus listeners and logs."""
    assert int(one(service, "Service", "LimitNOFILE")) >= 2 * GatewaySettings().max_connections + 100


# ---------------------------------------------------------------- identity and sandbox


def test_user_comes_from_sysusers_and_owns_the_config_folders(service: Unit) -> None:
    user, group = one(service, "Service", "User"), one(service, "Service", "Group")
    assert "DynamicUser" not in service["Service"], "cannot read /etc/gatewayd: docs/deploy.md"
    [entry] = sysusers_entries()
    assert entry[:3] == ["u", user, "-"]
    assert user == group   # sysusers' `u` makes a group of the same name
    config_dir = str(PurePosixPath(default_config_path()).parent)
    folders = {e[1]: e for e in tmpfiles_entries()}
    assert set(folders) == {config_dir, config_dir + "/certs"}
    for entry in folders.values():
        assert entry[0] == "d" and entry[2:5] == ["0750", "root", group]


def test_only_cap_net_bind_service(service: Unit) -> None:
    assert one(service, "Service", "AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert one(service, "Service", "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert one(service, "Service", "NoNewPrivileges") == "yes"


HARDENING = {
    "UMask": "0077",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectProc": "invisible",
    "ProcSubset": "pid",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "PrivateIPC": "yes",
    "RemoveIPC": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallArchitectures": "native",
    "SystemCallErrorNumber": "EPERM",
}


@pytest.mark.parametrize("key", sorted(HARDENING))
def test_hardening_directive(service: Unit, key: str) -> None:
    assert one(service, "Service", key) == HARDENING[key]


def test_system_call_filter(service: Unit) -> None:
    assert service["Service"]["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("MemoryDenyWriteExecute", "pyOpenSSL's cffi callbacks need W+X memory: gatewayd cannot start"),
        ("PrivateUsers", "cannot bind port 443 itself (only with every listener from gatewayd.socket)"),
        ("PrivateNetwork", "a gateway talks to the network"),
        ("ReadWritePaths", "gatewayd writes only in its StateDirectory"),
    ],
)
def test_deliberately_absent(service: Unit, key: str, why: str) -> None:
    assert key not in service["Service"], why


def test_only_the_acme_state_directory_is_writable(service: Unit) -> None:
    """gatewayd writes only [acme] state_dir: /var/lib/gatewayd, 0700; no runtime/logs directory, no PID file."""
    assert service["Service"]["StateDirectory"] == ["gatewayd"]
    assert service["Service"]["StateDirectoryMode"] == ["0700"]
    from gatewayd.config import AcmeSettings

    assert str(AcmeSettings().state_dir).startswith("/var/lib/gatewayd/")
    for key in ("RuntimeDirectory", "LogsDirectory", "CacheDirectory", "PIDFile"):
        assert key not in service["Service"]


# ---------------------------------------------------------------- socket activation


def _listen_address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def test_socket_addresses_are_explicit(socket_unit: Unit) -> None:
    """`ListenStream=443` would be a dual-stack [::]:443 that matches no "0.0.0.0:443"."""
    streams = socket_unit["Socket"]["ListenStream"]
    assert streams
    for value in streams:
        assert re.fullmatch(r"(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]):\d+", value), value
    assert one(socket_unit, "Socket", "BindIPv6Only") == "ipv6-only"   # as gatewayd's own binds
    assert socket_unit["Socket"].get("Accept", ["no"]) == ["no"]
    assert socket_unit["Socket"].get("Service", ["gatewayd.service"]) == ["gatewayd.service"]


def test_socket_matches_the_listener_of_the_same_address(socket_unit: Unit, tmp_path: Path) -> None:
    """gatewayd's own matching (cli.match_inherited) takes each shipped ListenStream= for
    the [[listener]] with that address, written the same way (docs/deploy.md)."""
    listeners = "".join(
        f'[[listener]]\naddress = "{value}"\ntls = false\n\n' for value in socket_unit["Socket"]["ListenStream"]
    )
    path = tmp_path / "gatewayd.toml"
    path.write_text(
        listeners + '[[host]]\nnames = ["example.org"]\n\n'
        '[[host.route]]\npath = "/"\nbackend = "ws://127.0.0.1:9000"\n',
        encoding="utf-8",
    )
    config = load(str(path))
    socks = [socket.socket(socket.AF_INET6 if ":" in v.rpartition(":")[0] else socket.AF_INET)
             for v in socket_unit["Socket"]["ListenStream"]]
    try:
        inherited = [
            InheritedSocket(sock, "gatewayd.socket", _listen_address(value))
            for sock, value in zip(socks, socket_unit["Socket"]["ListenStream"], strict=False)
        ]
        matched = match_inherited(config, inherited)
        assert set(matched) == {str(listener.address) for listener in config.listeners}
    finally:
        for sock in socks:
            sock.close()


# ---------------------------------------------------------------- the other files


def test_certbot_hook_writes_where_tmpfiles_and_the_group_allow() -> None:
    hook = SYSTEMD / "certbot-deploy-hook"
    text = hook.read_text(encoding="utf-8")
    assert os.access(hook, os.X_OK)
    subprocess.run(["sh", "-n", str(hook)], check=True, timeout=10)
    certs = next(e[1] for e in tmpfiles_entries() if e[1].endswith("/certs"))
    assert f"dest={certs}/" in text
    assert "-g gatewayd" in text and "-m 0640" in text
    assert "systemctl reload gatewayd.service" in text


def test_verify_script_is_valid_bash() -> None:
    script = SYSTEMD / "verify-in-container.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=10)


def test_readme_lists_every_file() -> None:
    readme = (SYSTEMD / "README.md").read_text(encoding="utf-8")
    for path in SYSTEMD.iterdir():
        if path.name != "README.md":
            assert f"`{path.name}`" in readme, path.name


def test_deploy_doc_explains_every_directive(service: Unit) -> None:
    """Each [Service] directive of the unit is named in docs/deploy.md."""
    doc = DEPLOY_DOC.read_text(encoding="utf-8")
    for key in service["Service"]:
        assert f"{key}=" in doc or f"`{key}`" in doc, key
