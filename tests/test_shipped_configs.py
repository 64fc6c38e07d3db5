"""The configurations shipped in config/ pass `gatewayd check` in a checkout.

They point at the development certificate certs/example.pem, which `./dev`
makes; this test makes it the same way (idempotent), then runs the real
`check` command on each file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gatewayd.cli import main
from gatewayd.demo import EXAMPLE_NAMES, ensure_example_certificate

REPO = Path(__file__).resolve().parent.parent
SHIPPED = [REPO / "config" / "gatewayd.toml", *sorted((REPO / "config" / "examples").glob("*.toml"))]


@pytest.fixture(scope="module", autouse=True)
def example_certificate() -> None:
    ensure_example_certificate(REPO / "certs")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_check_passes(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("test is successful")


def test_example_certificate_covers_the_example_names() -> None:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((REPO / "certs" / "example.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == set(EXAMPLE_NAMES)
