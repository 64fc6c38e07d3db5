"""Which packages the wheel carries (everything else is in pyproject.toml).

The systemd units, sysusers/tmpfiles snippets and example configurations stay
at the top of the repository (systemd/, config/), where the docs point, and
ship inside the package as ``gatewayd/_data/systemd`` and
``gatewayd/_data/config`` (read by ``gatewayd install-systemd``; see
gatewayd/install.py). Every folder under them becomes a data package, so a new
example folder ships without editing this file; keys and certificates never do.
pyproject.toml cannot list found packages and mapped folders together, hence
this file.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
DATA: dict[str, str] = {}
for top in ("systemd", "config"):
    for folder in [HERE / top, *sorted(p for p in (HERE / top).rglob("*") if p.is_dir())]:
        relative = folder.relative_to(HERE)
        if any(part.startswith((".", "__")) for part in relative.parts):
            continue
        DATA[".".join(("gatewayd", "_data", *relative.parts))] = relative.as_posix()

setup(
    packages=find_packages(include=["gatewayd", "gatewayd.*"]) + list(DATA),
    package_dir=DATA,
    package_data={name: ["*"] for name in DATA},
    exclude_package_data={name: ["*.key", "*.pem", "*.sh"] for name in DATA},
)
