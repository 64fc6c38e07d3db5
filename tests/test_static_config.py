"""Configuration of static routes and redirect_https listeners: values, errors, key paths."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gatewayd.config import loads, summary
from gatewayd.errors import ConfigErrors


def document(route: str, listener: str = "", *, tls: bool = False) -> str:
    return textwrap.dedent(
        f"""
        [[listener]]
        address = "127.0.0.1:8080"
        tls = {"true" if tls else "false"}
        {listener}

        [[host]]
        names = ["app.test"]

        [[host.route]]
        path_prefix = "/"
        {route}
        """
    )


def errors_of(text: str, tmp_path: Path) -> list[tuple[str, str, str | None]]:
    with pytest.raises(ConfigErrors) as caught:
        loads(text, tmp_path / "gatewayd.toml")
    return [(e.key_path, e.message, e.suggestion) for e in caught.value.errors]


def test_static_route_values(tmp_path: Path) -> None:
    (tmp_path / "www").mkdir()
    config = loads(
        document('static = "www"\nindex = "vnc.html"\ncache_control = "max-age=3600"'),
        tmp_path / "gatewayd.toml",
    )
    route = config.hosts[0].routes[0]
    assert route.static == tmp_path / "www"  # relative to the config file's folder
    assert (route.index, route.cache_control) == ("vnc.html", "max-age=3600")
    assert route.backend is None and route.backends == () and route.redirect is None
    text = summary(config)
    rows = [" ".join(line.split()) for line in text.split("\n") if " -> " in line]
    assert rows == [f"/* static -> {tmp_path / 'www'} index: vnc.html cache_control: max-age=3600"]


def test_static_route_with_auth(tmp_path: Path) -> None:
    (tmp_path / "users").write_text("demo:$2y$05$" + "a" * 21 + "O" + "b" * 31 + "\n")
    config = loads(
        document(f'static = "{tmp_path}"\nauth = "basic"\nauth_users = "users"\nrealm = "files"'),
        tmp_path / "gatewayd.toml",
    )
    route = config.hosts[0].routes[0]
    assert route.auth is not None and route.static == tmp_path


def test_static_defaults(tmp_path: Path) -> None:
    config = loads(document(f'static = "{tmp_path}"'), tmp_path / "gatewayd.toml")
    route = config.hosts[0].routes[0]
    assert (route.static, route.index, route.cache_control) == (tmp_path, "index.html", "")


@pytest.mark.parametrize(
    "route, key_path, message",
    [
        ('static = "www"\nbackend = "ws://127.0.0.1:9000"', "host[0].route[0].static",
         "set either backend or static, not both"),
        ('static = "www"\nbackends = ["ws://127.0.0.1:9000"]', "host[0].route[0].static",
         "set either backends or static, not both"),
        ('static = "www"\nredirect = "https://x.test/"', "host[0].route[0].static",
         "set either redirect or static, not both"),
        ('static = "missing"', "host[0].route[0].static", "folder not found"),
        ('static = "file.txt"', "host[0].route[0].static", "not a folder"),
        ("static = 5", "host[0].route[0].static", "expected a folder name"),
        ('static = ""', "host[0].route[0].static", "expected a folder name"),
        ('static = "www"\nindex = "../x.html"', "host[0].route[0].index", "must be a file name"),
        ('static = "www"\nindex = ".hidden"', "host[0].route[0].index", "must be a file name"),
        ('static = "www"\nindex = ""', "host[0].route[0].index", "must be a file name"),
        ('static = "www"\ncache_control = "a\\nb"', "host[0].route[0].cache_control",
         "must be printable ASCII"),
        ('static = "www"\norigins = ["https://a.test"]', "host[0].route[0].origins",
         "not used on a static route"),
        ('static = "www"\nhealth_check = "tcp"', "host[0].route[0].health_check",
         "not used on a static route"),
        ('static = "www"\nauth = "basic"', "host[0].route[0].auth_users", "required"),
        ('static = "www"\nauth = "basic"\nauth_users = "u"\nauth_forward = true',
         "host[0].route[0].auth_forward", "not used on a static route"),
        ('static = "www"\nauth = "request"\nauth_url = "http://127.0.0.1:9100/"\n'
         'auth_response_headers = ["X-User"]',
         "host[0].route[0].auth_response_headers", "not used on a static route"),
        ('backend = "ws://127.0.0.1:9000"\nindex = "a.html"', "host[0].route[0].index",
         "only used together with static"),
        ('backend = "ws://127.0.0.1:9000"\ncache_control = "no-cache"',
         "host[0].route[0].cache_control", "only used together with static"),
    ],
)
def test_static_errors(tmp_path: Path, route: str, key_path: str, message: str) -> None:
    (tmp_path / "www").mkdir()
    (tmp_path / "file.txt").write_text("x")
    errors = errors_of(document(route), tmp_path)
    assert any(path == key_path and message in text for path, text, _ in errors), errors


def test_unknown_key_suggests_static(tmp_path: Path) -> None:
    errors = errors_of(document('statik = "www"'), tmp_path)
    assert ("host[0].route[0].statik", "unknown key", "static") in errors


def test_redirect_https(tmp_path: Path) -> None:
    config = loads(
        document('backend = "ws://127.0.0.1:9000"', "redirect_https = true"), tmp_path / "g.toml"
    )
    assert config.listeners[0].redirect_https
    assert "plain redirect_https" in summary(config)


def test_redirect_https_on_a_tls_listener_is_an_error(tmp_path: Path) -> None:
    errors = errors_of(document('backend = "ws://127.0.0.1:9000"', "redirect_https = true", tls=True), tmp_path)
    assert any(
        path == "listener[0].redirect_https" and "only used on a plain listener" in text
        for path, text, _ in errors
    ), errors


def test_redirect_https_must_be_a_boolean(tmp_path: Path) -> None:
    errors = errors_of(document('backend = "ws://127.0.0.1:9000"', 'redirect_https = "yes"'), tmp_path)
    assert any(path == "listener[0].redirect_https" for path, _, _ in errors), errors


def test_unknown_listener_key_suggests_redirect_https(tmp_path: Path) -> None:
    errors = errors_of(document('backend = "ws://127.0.0.1:9000"', "redirect_http = true"), tmp_path)
    assert ("listener[0].redirect_http", "unknown key", "redirect_https") in errors
