"""The package installs by name: sdist -> wheel -> a fresh venv, and pipx from a checkout.

Each build runs on a copy of the checkout's tracked files (what a fresh clone
has), never in the working tree. The installed copy must find its systemd
units and example configurations in its own package data, not in the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from gatewayd import __version__

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(600)


def run(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """Run a command outside the checkout (so that ``python -c`` imports the installed copy)."""
    result = subprocess.run(
        [str(a) for a in args],
        check=False,
        capture_output=True,
        text=True,
        timeout=540,
        env=env,
        cwd=cwd or Path("/"),
    )
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def checkout_copy(destination: Path) -> Path:
    """The files git tracks (plus untracked, not ignored ones: work in progress)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True, timeout=60,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def no_setuptools_warnings(output: str) -> None:
    for word in ("Warning", "deprecated", "!!"):
        assert word not in output, output


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkout_copy(tmp_path_factory.mktemp("checkout"))


def test_sdist_wheel_fresh_venv(source: Path, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    output = run(sys.executable, "-m", "build", "--sdist", "--outdir", dist, source)
    no_setuptools_warnings(output)
    (sdist,) = dist.glob("gatewayd-*.tar.gz")
    # The wheel is built from the sdist: the sdist alone is a complete source.
    output = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", dist, sdist)
    no_setuptools_warnings(output)
    (wheel,) = dist.glob("gatewayd-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", wheel)
    assert run(env_dir / "bin" / "gatewayd", "--version").strip() == f"gatewayd {__version__}"

    data = Path(run(python, "-c", "from gatewayd.install import data_dir; print(data_dir('config'))").strip())
    assert data.is_relative_to(env_dir), data  # the package's own data, not the checkout
    example = data / "examples" / "behind-load-balancer.toml"
    checked = run(env_dir / "bin" / "gatewayd", "check", "-c", example)
    assert checked.rstrip().endswith(f"configuration file {example} test is successful")
    for name in ("gatewayd.toml", "examples/minimal.toml", "examples/users.htpasswd"):
        assert (data / name).read_bytes() == (REPO / "config" / name).read_bytes()

    root = tmp_path / "root"
    installed = run(env_dir / "bin" / "gatewayd", "install-systemd", "--prefix", root, "--usr")
    unit = (root / "usr/lib/systemd/system/gatewayd.service").read_text()
    assert f"ExecStart={env_dir}/bin/gatewayd run -c /etc/gatewayd/gatewayd.toml" in unit
    for path in ("usr/lib/systemd/system/gatewayd.socket", "usr/lib/sysusers.d/gatewayd.conf", "usr/lib/tmpfiles.d/gatewayd.conf"):
        assert f"installed {root / path}" in installed
    assert (root / "usr/lib/sysusers.d/gatewayd.conf").read_bytes() == (REPO / "systemd/gatewayd.sysusers").read_bytes()
    assert (root / "usr/lib/tmpfiles.d/gatewayd.conf").read_bytes() == (REPO / "systemd/gatewayd.tmpfiles").read_bytes()

    names = run(python, "-m", "zipfile", "-l", wheel)
    assert ".key" not in names and ".pem" not in names and "verify-in-container" not in names


def test_pipx_install_from_a_checkout(source: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PIPX_HOME": str(tmp_path / "pipx"),
        "PIPX_BIN_DIR": str(tmp_path / "bin"),
        "PIPX_MAN_DIR": str(tmp_path / "man"),
        "PIPX_DEFAULT_PYTHON": sys.executable,
    }
    run(sys.executable, "-m", "pipx", "install", source, env=env)
    program = tmp_path / "bin" / "gatewayd"
    assert run(program, "--version", env=env).strip() == f"gatewayd {__version__}"
    example = tmp_path / "pipx" / "venvs" / "gatewayd"
    config = Path(run(example / "bin" / "python", "-c", "from gatewayd.install import data_dir; print(data_dir('config'))").strip())
    assert config.is_relative_to(tmp_path / "pipx")
    run(program, "check", "-q", "-c", config / "examples" / "behind-load-balancer.toml", env=env)
