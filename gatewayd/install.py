"""``gatewayd install-systemd``: put the shipped systemd files in place.

The wheel carries the repository's ``systemd/`` and ``config/`` folders as
package data (``gatewayd/_data/``, see setup.py); in a checkout (an editable
install) they are read from the checkout itself. Files go where an
administrator's own files go (``/etc/systemd/system``, ``/etc/sysusers.d``,
``/etc/tmpfiles.d``), or with ``--usr`` where a distribution package puts them
(``/usr/lib/...``), under ``--prefix`` (a package's build root).

The units name the program they run: ``/opt/gatewayd/bin/gatewayd`` as
shipped, rewritten to this installation's ``gatewayd`` (or ``--program``), so
a pipx or other venv install works without editing the unit. A file that
exists with other contents is kept (exit 1) unless ``--force``: local changes
belong in drop-ins (``systemctl edit gatewayd``).
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

#: The program the shipped units run (docs/deploy.md's /opt/gatewayd venv).
SHIPPED_PROGRAM = "/opt/gatewayd/bin/gatewayd"


def data_dir(name: str) -> Path:
    """``systemd`` or ``config``: from the installed package, else from the checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_data" / name, package.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"gatewayd's {name}/ files are not installed with this copy ({package})")


@dataclass(frozen=True)
class Item:
    source: str  # file name in systemd/
    etc: str  # destination (relative to the prefix) for an administrator's install
    usr: str  # ... and for a distribution package (--usr)
    mode: int


ITEMS = (
    Item("gatewayd.service", "etc/systemd/system/gatewayd.service", "usr/lib/systemd/system/gatewayd.service", 0o644),
    Item("gatewayd.socket", "etc/systemd/system/gatewayd.socket", "usr/lib/systemd/system/gatewayd.socket", 0o644),
    Item("gatewayd.sysusers", "etc/sysusers.d/gatewayd.conf", "usr/lib/sysusers.d/gatewayd.conf", 0o644),
    Item("gatewayd.tmpfiles", "etc/tmpfiles.d/gatewayd.conf", "usr/lib/tmpfiles.d/gatewayd.conf", 0o644),
)
CERTBOT_HOOK = Item(
    "certbot-deploy-hook",
    "etc/letsencrypt/renewal-hooks/deploy/gatewayd",
    "etc/letsencrypt/renewal-hooks/deploy/gatewayd",  # certbot reads /etc only
    0o755,
)


def default_program() -> str:
    """The ``gatewayd`` console script of the environment running this code."""
    script = Path(sys.prefix) / "bin" / "gatewayd"
    return str(script) if script.exists() else SHIPPED_PROGRAM


def render(item: Item, program: str) -> bytes:
    data = (data_dir("systemd") / item.source).read_bytes()
    if item.source == "gatewayd.service" and program != SHIPPED_PROGRAM:
        data = data.replace(SHIPPED_PROGRAM.encode(), program.encode())
    return data


def install_systemd(
    prefix: str = "/",
    *,
    usr: bool = False,
    program: str | None = None,
    certbot_hook: bool = False,
    force: bool = False,
    dry_run: bool = False,
) -> int:
    """Install the units and snippets under ``prefix``; print one line per file. Returns the exit code."""
    program = program or default_program()
    if not os.path.isabs(program):
        print(f"gatewayd: --program must be an absolute path, not {program!r}", file=sys.stderr)
        return 2
    if program.startswith(("/home/", "/root/")):
        print(
            f"gatewayd: warning: the unit will run {program}, but it has ProtectHome=yes: the service "
            "cannot see anything under /home or /root; install gatewayd system-wide (docs/deploy.md)",
            file=sys.stderr,
        )
    items = [*ITEMS, CERTBOT_HOOK] if certbot_hook else list(ITEMS)
    root = Path(prefix)
    kept: list[Path] = []
    for item in items:
        target = root / (item.usr if usr else item.etc)
        data = render(item, program)
        if target.exists() and target.read_bytes() == data:
            print(f"unchanged {target}")
            continue
        if target.exists() and not force:
            print(f"kept      {target} (it differs from the shipped file; --force replaces it)")
            kept.append(target)
            continue
        print(f"{'would install' if dry_run else 'installed'} {target}")
        if dry_run:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp")
        temporary.write_bytes(data)
        temporary.chmod(item.mode)
        temporary.replace(target)
    if root == Path("/") and not dry_run:
        config = shlex.quote(str(data_dir("config")))
        print(
            "\nNext, as root:\n"
            "  systemd-sysusers gatewayd.conf            # the system user gatewayd\n"
            "  systemd-tmpfiles --create gatewayd.conf   # /etc/gatewayd{,/certs} 0750 root:gatewayd\n"
            "  systemctl daemon-reload\n"
            f"  # write /etc/gatewayd/gatewayd.toml (examples: {config}/examples), then\n"
            f"  runuser -u gatewayd -- {program} check -c /etc/gatewayd/gatewayd.toml\n"
            "  systemctl enable --now gatewayd"
        )
    if kept:
        names = ", ".join(map(str, kept))
        print(f"gatewayd: {len(kept)} file(s) kept unchanged because they differ: {names}", file=sys.stderr)
        return 1
    return 0
