"""Configuration: the TOML file, validated into frozen dataclasses.

Pure: this package never imports trio or OpenSSL. Checking that certificate
files load and match their keys needs OpenSSL and so lives in
:mod:`gatewayd.tls`; here we only check that they exist and can be read.

Theory of operation
-------------------

Loading runs in three passes, like caddy's Provision/Validate:

1. **Parse.** ``tomllib`` turns the text into plain dicts and lists. A syntax
   error stops here, as one :class:`~gatewayd.errors.ConfigError` carrying the
   line and column ``tomllib`` reports.
2. **Locate.** ``tomllib`` keeps no positions, so :class:`Locator` scans the
   text once more, tracking table headers (``[gateway]``, ``[[host]]``,
   ``[[host.route]]`` with one counter per array of tables and parent),
   ``key = value`` lines (bare, quoted and dotted keys), arrays and inline
   tables, and multi-line strings, and maps every key path it sees, such as
   ``("host", 1, "route", 0, "backend")``, to its line. A key path that is
   not in the file (a missing required key) gets the line of its nearest
   enclosing table.
3. **Fill defaults, then validate.** :class:`Builder` walks the parsed data
   table by table, reading each key by its declaration (below). Every
   problem becomes one ``ConfigError`` with its key path and line, and the
   walk goes on with the default in place of the bad value, so one run
   reports *every* problem; they are raised together, in file order, as
   :class:`~gatewayd.errors.ConfigErrors`.

**Each key is declared once**, on the dataclass field it fills
(:mod:`gatewayd.config.schema`): name, Python type, default, TOML type and
validation (a kind from :mod:`gatewayd.config.values`), group, docs section.
The known keys of each table, the "did you mean" of unknown ones, the route
key groups, the builder's reading of each value and the summary's settings
lines are all derived from those declarations, and
``tests/test_config_keys.py`` holds docs/configuration.md and the annotated
config/gatewayd.toml to them.

How to add a key
----------------

1. Declare it on the dataclass of its table:
   ``idle_timeout: float = key(0.0, Seconds(positive=False))``. The builder
   reads and checks it from that alone; write a check function (raising
   :class:`~gatewayd.config.values.Invalid`) or a kind when none fits.
2. If it takes part in a rule with other keys, write the rule in the
   :class:`Builder` method of its table. A key that needs a reading of its
   own is declared with ``Step("its docs type", "builder_method")``.
3. Document it: its row in docs/configuration.md, its line (at its default)
   in config/gatewayd.toml. The tests fail until both agree with the
   declaration, and until the builder reports a wrong value of it.

A new table is a new dataclass whose fields declare its keys, a field of
:class:`Config` declared with ``Table("builder_method")``, its entry in
:data:`~gatewayd.config.schema.PLACES`, and that builder method
(:meth:`Builder.gateway` is the model: check the keys, read them all).

Keys the SPEC lists but this version does not implement are kept in one
table, :data:`NOT_YET_SUPPORTED`: using one is an error that says so, not an
"unknown key" and not silently ignored. Enabling such a key means removing
its row there and declaring it.

Modules
-------

``schema``
    The frozen dataclasses (:class:`Config` and its parts), the key
    declarations on their fields, :data:`~gatewayd.config.schema.PLACES` and
    what is derived from it (:data:`KNOWN_KEYS`, the route key groups).
``values``
    One value at a time: the checks, each raising
    :class:`~gatewayd.config.values.Invalid` with the reason, and the kinds
    that declarations name (their messages for a wrong value).
``urls``
    Listen addresses, backend URLs and auth service URLs, parsed into schema
    objects.
``htpasswd``
    The ``auth_users`` files of ``auth = "basic"``.
``locate``
    Key paths, their rendering in messages, and :class:`Locator`.
``build``
    :class:`Builder`: parsed data to :class:`Config`, every error at once.
``summary``
    The one-screen text of ``gatewayd check``.

This module runs the three passes (:func:`load`, :func:`loads`) and
re-exports the names the rest of gatewayd uses, so that
``from gatewayd.config import Config`` keeps working.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from gatewayd.config.build import Builder
from gatewayd.config.locate import KeyPath, Locator, format_key_path, syntax_error
from gatewayd.config.schema import (
    AUTH_KINDS,
    BALANCE_MODES,
    BRIDGE_DEFAULT_SUBPROTOCOL,
    DEFAULT_ADMIN_ADDRESS,
    DEFAULT_MAX_MESSAGE_SIZE,
    KNOWN_KEYS,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_WORKERS,
    NOT_SUPPORTED_MESSAGE,
    NOT_YET_SUPPORTED,
    NOTHING,
    REDIRECT_STATUSES,
    TLS_PROFILES,
    TLS_VERSIONS,
    AccessList,
    AcmeSettings,
    Address,
    AdminSettings,
    BackendScheme,
    BackendTarget,
    Balance,
    BasicAuth,
    CertificatePair,
    Config,
    ForwardAuth,
    GatewaySettings,
    HostConfig,
    ListenerConfig,
    LogFormat,
    LogLevel,
    LogSettings,
    NotYetSupported,
    Redirect,
    RouteConfig,
    TLSProfile,
    TLSSettings,
    TLSVersion,
)
from gatewayd.config.summary import summary
from gatewayd.config.values import IPNetwork, available_cpus
from gatewayd.errors import ConfigError, ConfigErrors

__all__ = [
    "AUTH_KINDS",
    "BALANCE_MODES",
    "BRIDGE_DEFAULT_SUBPROTOCOL",
    "CONFIG_ENV_VAR",
    "DEFAULT_ADMIN_ADDRESS",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "KNOWN_KEYS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_WORKERS",
    "NOTHING",
    "NOT_SUPPORTED_MESSAGE",
    "NOT_YET_SUPPORTED",
    "REDIRECT_STATUSES",
    "TLS_PROFILES",
    "TLS_VERSIONS",
    "AccessList",
    "Address",
    "AcmeSettings",
    "AdminSettings",
    "BackendScheme",
    "BackendTarget",
    "Balance",
    "BasicAuth",
    "CertificatePair",
    "Config",
    "ForwardAuth",
    "GatewaySettings",
    "HostConfig",
    "IPNetwork",
    "KeyPath",
    "ListenerConfig",
    "LogFormat",
    "LogLevel",
    "LogSettings",
    "NotYetSupported",
    "Redirect",
    "RouteConfig",
    "TLSProfile",
    "TLSSettings",
    "TLSVersion",
    "available_cpus",
    "default_config_path",
    "format_key_path",
    "load",
    "loads",
    "summary",
]

DEFAULT_CONFIG_PATH = "/etc/gatewayd/gatewayd.toml"
CONFIG_ENV_VAR = "GATEWAYD_CONFIG"


def default_config_path() -> str:
    """The configuration file to use when ``-c`` is not given.

    Returns:
        ``$GATEWAYD_CONFIG`` when it is set and not empty, else
        ``/etc/gatewayd/gatewayd.toml``.
    """
    return os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH



def load(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a configuration file.

    Args:
        path: the TOML file. Relative paths inside it are resolved against its
            folder.

    Returns:
        The validated configuration.

    Raises:
        ConfigErrors: every problem found (a missing or unreadable file, a
            file that is not UTF-8, a syntax error, or all schema errors).
    """
    file = os.fspath(path)
    try:
        with open(file, "rb") as stream:
            raw = stream.read()
    except FileNotFoundError:
        raise ConfigErrors([ConfigError(file, "", "configuration file not found")]) from None
    except IsADirectoryError:
        raise ConfigErrors(
            [ConfigError(file, "", "is a directory, not a configuration file")]
        ) from None
    except PermissionError:
        raise ConfigErrors(
            [ConfigError(file, "", "cannot read the configuration file: permission denied")]
        ) from None
    except OSError as exc:
        raise ConfigErrors(
            [ConfigError(file, "", f"cannot read the configuration file: {exc.strerror or exc}")]
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigErrors(
            [
                ConfigError(
                    file,
                    "",
                    f"not valid UTF-8 (byte 0x{raw[exc.start]:02x}); TOML files must be UTF-8",
                    line=line,
                    column=column,
                )
            ]
        ) from None
    return loads(text, file)


def loads(text: str, path: str | os.PathLike[str]) -> Config:
    """Parse and validate a configuration given as text.

    Args:
        text: the TOML document.
        path: where it came from: its folder is the base for relative paths
            and it names the file in error messages (as given).

    Returns:
        The validated configuration.

    Raises:
        ConfigErrors: every problem found, sorted by line.
    """
    file = os.fspath(path)
    if text.startswith("\ufeff"):  # a UTF-8 byte order mark, as some editors write
        text = text[1:]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigErrors([syntax_error(file, text, exc)]) from None
    builder = Builder(file, Path(os.path.abspath(file)), Locator.scan(text))
    config = builder.build(data)
    if builder.errors or config is None:
        raise ConfigErrors(sorted(builder.errors, key=lambda e: e.line or 0))
    return config
