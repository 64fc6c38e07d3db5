"""``gatewayd install-systemd``: what lands where, and that an edited file is never overwritten silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from gatewayd.cli import main
from gatewayd.install import SHIPPED_PROGRAM, data_dir

REPO = Path(__file__).resolve().parent.parent
SYSTEMD = REPO / "systemd"

ETC = {
    "etc/systemd/system/gatewayd.service": "gatewayd.service",
    "etc/systemd/system/gatewayd.socket": "gatewayd.socket",
    "etc/sysusers.d/gatewayd.conf": "gatewayd.sysusers",
    "etc/tmpfiles.d/gatewayd.conf": "gatewayd.tmpfiles",
}


def installed(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_installs_the_shipped_files_pointed_at_the_program(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install-systemd", "--prefix", str(tmp_path), "--program", "/usr/local/bin/gatewayd"]) == 0
    out = capsys.readouterr().out
    assert installed(tmp_path) == set(ETC)
    for target, source in ETC.items():
        expected = (SYSTEMD / source).read_text()
        if source == "gatewayd.service":
            expected = expected.replace(SHIPPED_PROGRAM, "/usr/local/bin/gatewayd")
            assert "ExecStart=/usr/local/bin/gatewayd run -c /etc/gatewayd/gatewayd.toml" in expected
        assert (tmp_path / target).read_text() == expected, target
        assert (tmp_path / target).stat().st_mode & 0o777 == 0o644
        assert f"installed {tmp_path / target}\n" in out
    assert main(["install-systemd", "--prefix", str(tmp_path), "--program", "/usr/local/bin/gatewayd"]) == 0
    assert capsys.readouterr().out.count("unchanged ") == len(ETC)


def test_usr_layout_and_certbot_hook(tmp_path: Path) -> None:
    assert main(["install-systemd", "--prefix", str(tmp_path), "--usr", "--certbot-hook"]) == 0
    assert installed(tmp_path) == {
        "usr/lib/systemd/system/gatewayd.service",
        "usr/lib/systemd/system/gatewayd.socket",
        "usr/lib/sysusers.d/gatewayd.conf",
        "usr/lib/tmpfiles.d/gatewayd.conf",
        "etc/letsencrypt/renewal-hooks/deploy/gatewayd",
    }
    hook = tmp_path / "etc/letsencrypt/renewal-hooks/deploy/gatewayd"
    assert hook.read_bytes() == (SYSTEMD / "certbot-deploy-hook").read_bytes()
    assert hook.stat().st_mode & 0o777 == 0o755


def test_an_edited_file_is_kept_unless_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    unit = tmp_path / "etc/systemd/system/gatewayd.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("# edited by hand\n")
    assert main(["install-systemd", "--prefix", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert f"kept      {unit} (it differs from the shipped file; --force replaces it)" in out
    assert f"1 file(s) kept unchanged because they differ: {unit}" in err
    assert unit.read_text() == "# edited by hand\n"
    assert (tmp_path / "etc/sysusers.d/gatewayd.conf").is_file()  # the others were installed
    assert main(["install-systemd", "--prefix", str(tmp_path), "--force"]) == 0
    assert unit.read_text() != "# edited by hand\n"


def test_dry_run_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install-systemd", "--prefix", str(tmp_path), "--dry-run"]) == 0
    assert installed(tmp_path) == set()
    assert capsys.readouterr().out.count("would install ") == len(ETC)


def test_program_under_home_is_warned_about_and_must_be_absolute(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["install-systemd", "--prefix", str(tmp_path), "--program", "/root/.local/bin/gatewayd"]) == 0
    assert "ProtectHome=yes" in capsys.readouterr().err
    assert main(["install-systemd", "--prefix", str(tmp_path / "x"), "--program", "bin/gatewayd"]) == 2
    assert "--program must be an absolute path" in capsys.readouterr().err


def test_data_comes_from_the_checkout_in_an_editable_install() -> None:
    assert data_dir("systemd") == SYSTEMD
    assert data_dir("config") == REPO / "config"
