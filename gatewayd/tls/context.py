"""TLS contexts for client connections: one OpenSSL context per virtual host, chosen by SNI.

:class:`ServerTLS` is built once per configuration generation by
:meth:`ServerTLS.from_config`: it loads and checks every host's certificate
and key (reporting every problem at once, as :class:`~gatewayd.errors.ConfigErrors`;
the file loading is :mod:`gatewayd.tls.credentials`) and wraps accepted
connections in a :class:`~gatewayd.tls.stream.TLSStream` with :meth:`ServerTLS.wrap`.

SPEC section 3, row 1: the host is looked up from SNI with
:meth:`gatewayd.routing.HostTable.lookup` (exact name, then ``*.`` wildcard,
then the ``default`` host). When there is none, the handshake fails with the
``unrecognized_name`` alert (RFC 6066 section 3).
"""

# Theory of operation
# ===================
#
# Every server connection starts on one context, the generation's SNI
# context: it carries only what OpenSSL reads before the servername callback
# (the lowest minimum version of all hosts, the options, the session ID
# context, the ALPN and OCSP callbacks). OpenSSL calls the servername
# callback (_ServerNameSelector) for every ClientHello, with or without SNI,
# after it has chosen the protocol version and before it chooses the cipher
# and the certificate; the callback switches the connection to the host's
# own context (its certificates, one per key type, and its TLS 1.2 cipher
# list) or fails the handshake with the alert it chooses. The minimum version
# cannot be switched that way, so the callback enforces it with a
# protocol_version alert. What it decided goes to the connection's app data
# (HandshakeInfo), read by the stream after the handshake.
#
# pyOpenSSL's set_tlsext_servername_callback can only fail a handshake by
# raising, so the callback is registered through the cffi bindings
# (gatewayd.tls._openssl.install_servername_callback).
#
# Sessions resume across the SNI switch: every context has the same session
# ID context, and one session cache (and ticket key) per generation: the
# first context's, which OpenSSL keeps as the connection's session context
# after the switch. Hosts with client_ca get their own session ID context,
# so that a session made without a verified certificate never resumes on them.
#
# Session tickets, as Mozilla's intermediate profile says (nginx's
# ssl_session_tickets off): off by default. A stateless ticket is the
# session's secrets encrypted under a key that is the same for every client;
# whoever gets that key decrypts every session it protected (no forward
# secrecy for them), and OpenSSL's key is made once per context and never
# rotated. With SSL_OP_NO_TICKET a TLS 1.2 client resumes by session ID and a
# TLS 1.3 client gets a stateful ticket, which only names a session in our
# cache: resumption stays, entirely server-side. Where an operator turns
# tickets on ([tls] session_tickets = true), the key is replaced at every
# reload (new contexts) and every TICKET_KEY_ROTATION seconds
# (ServerTLS.rotate_ticket_key: a new first context, OpenSSL makes its key;
# pyOpenSSL offers no way to set one, so the old key is dropped, not kept
# for decryption, and tickets are issued for that long only).

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL

from gatewayd import errors
from gatewayd.acme.challenges import ACME_TLS_ALPN
from gatewayd.acme.store import Store, StoredCertificate
from gatewayd.config import Config, HostConfig, TLSSettings
from gatewayd.routing import HostTable
from gatewayd.tls._openssl import ServernameContext, clear_errors, install_servername_callback, set_groups_list
from gatewayd.tls.credentials import TLSPrivateKey, key_kind, load_certificates, load_ocsp_response, load_pair
from gatewayd.tls.stream import HandshakeInfo, TLSStream, decode_server_name, ssl_error_text

if TYPE_CHECKING:
    from types import TracebackType

    from gatewayd.tls._openssl import NoOverlappingProtocols

__all__ = ["TICKET_KEY_ROTATION", "ServerTLS"]

logger = logging.getLogger("gatewayd.tls")

# TLS alert codes (RFC 8446 section 6).
_ALERT_PROTOCOL_VERSION: Final = 70
_ALERT_UNRECOGNIZED_NAME: Final = 112
_ALERT_INTERNAL_ERROR: Final = 80
_ALERT_NO_APPLICATION_PROTOCOL: Final = 120

# Session ID context: the same on every context so that sessions (TLS 1.2
# session IDs and tickets, TLS 1.3 tickets) resume across the SNI switch.
# OpenSSL checks it against the SSL_CTX the connection started with, before
# the servername callback runs.
_SESSION_ID_CONTEXT: Final = b"gatewayd"

_PROTOCOL_VERSIONS: Final = {"TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": SSL.TLS1_3_VERSION}

#: With session tickets on: the ticket key's lifetime, and the tickets' (seconds).
TICKET_KEY_ROTATION: Final = 3600.0

# Key exchange groups of Mozilla's profiles (intermediate and modern alike:
# X25519, prime256v1, secp384r1), led by the X25519+ML-KEM hybrid where the
# OpenSSL build has it (post-quantum; outside the profile's list but not a
# downgrade of anything). OpenSSL's default list also offers X448 and
# secp521r1, which the profile rejects.
_GROUPS: Final = (b"X25519MLKEM768:X25519:prime256v1:secp384r1", b"X25519:prime256v1:secp384r1")

# Session ID context of hosts that require client certificates: their own,
# so that no session made without a verified certificate (on another host)
# resumes on them (see _host_tls).
_MTLS_SESSION_PREFIX: Final = b"gatewayd-mtls:"

_ALPN_HTTP_1_1: Final = b"http/1.1"

def _select_alpn(
    connection: SSL.Connection, offered: list[bytes]
) -> bytes | NoOverlappingProtocols:
    info = connection.get_app_data()
    if isinstance(info, HandshakeInfo) and info.acme_challenge:
        # RFC 8737 section 3: the challenge certificate goes with acme-tls/1.
        return ACME_TLS_ALPN
    # RFC 7301 section 3.2 lets a server that shares no protocol with the
    # client either fail with no_application_protocol or ignore the
    # extension; we ignore it (nginx >= 1.21.4 fails instead), so a client
    # offering only h2 still gets its handshake and then an HTTP/1.1 answer.
    if _ALPN_HTTP_1_1 in offered:
        return _ALPN_HTTP_1_1
    return SSL.NO_OVERLAPPING_PROTOCOLS


class _SNIContext(ServernameContext):
    """The context every server connection starts with; owns the SNI callback."""


@dataclass(frozen=True)
class _HostTLS:
    context: SSL.Context
    min_version: int
    #: Verify client certificates (``client_ca``): the mode is per connection
    #: in OpenSSL, so the servername callback sets it after the switch.
    verify_clients: bool = False
    #: OCSP responses to staple, by the serial number of the certificate they vouch for.
    staples: dict[int, bytes] | None = None


# Client certificate required and verified once (no renegotiation anyway).
_VERIFY_CLIENTS: Final = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE

def _staple(connection: SSL.Connection, data: object) -> bytes:
    """The OCSP server callback: the response for the certificate being sent, or none."""
    info = connection.get_app_data()
    if not isinstance(info, HandshakeInfo) or not info.staples:
        return b""
    # OpenSSL has chosen the certificate (RSA or ECDSA) before asking.
    cert = connection.get_certificate()
    if cert is None:
        return b""
    return info.staples.get(cert.get_serial_number(), b"")


class _ServerNameSelector:
    """The servername callback: SNI -> host -> that host's SSL_CTX, or an alert.

    OpenSSL calls it for every ClientHello, with or without SNI, after it has
    chosen the protocol version and before it chooses the cipher and the
    certificate, so switching the SSL_CTX here gives the host's certificate and
    TLS 1.2 cipher list. The minimum version cannot be switched that way, so it
    is enforced here with a protocol_version alert.
    """

    def __init__(
        self,
        table: HostTable,
        hosts: dict[int, _HostTLS],
        challenges: _AcmeChallenges | None = None,
        pending: frozenset[int] = frozenset(),
    ) -> None:
        self._table = table
        self._hosts = hosts
        self._challenges = challenges
        #: id() of the ACME hosts that have no certificate yet.
        self._pending = pending

    def __call__(self, connection: SSL.Connection) -> int | None:
        """Returns None to go on, or the alert to fail the handshake with."""
        info = connection.get_app_data()
        assert isinstance(info, HandshakeInfo)
        raw = connection.get_servername()
        name = decode_server_name(raw) if raw else None
        info.host = None
        host = self._table.lookup(name)
        if host is None:
            info.refusal = errors.UnknownServerName(name)
            return _ALERT_UNRECOGNIZED_NAME
        offered = info.offered_alpn or ()
        if ACME_TLS_ALPN in offered:
            # RFC 8737 section 3: a validation for exactly this name gets its
            # challenge certificate; another name's challenge never.
            context = None
            if self._challenges is not None and host.acme and name in host.names:
                context = self._challenges.context_for(name)
            if context is not None:
                connection.set_context(context)
                info.acme_challenge = True
                info.host = host
                info.refusal = None
                return None
            if _ALPN_HTTP_1_1 not in offered:
                info.refusal = errors.TLSHandshakeFailed(
                    f"ACME TLS-ALPN-01 validation for {name}, but no challenge is pending "
                    "for that name"
                )
                return _ALERT_NO_APPLICATION_PROTOCOL
        entry = self._hosts.get(id(host))
        if entry is None and id(host) in self._pending:
            info.refusal = errors.TLSHandshakeFailed(
                f"{host.key_path} ({host.names[0]}) has no certificate yet: "
                "ACME issuance pending"
            )
            return _ALERT_INTERNAL_ERROR
        if entry is None:
            # Only possible when the configuration has no TLS listener and a
            # host without certificate is picked; treat it as unknown.
            logger.warning("%s has no certificate; TLS client refused", host.key_path)
            info.refusal = errors.UnknownServerName(name)
            return _ALERT_UNRECOGNIZED_NAME
        version = connection.get_protocol_version()
        if version < entry.min_version:
            info.refusal = errors.TLSHandshakeFailed(
                f"client negotiated {connection.get_protocol_version_name()} but "
                f"{host.key_path} requires {host.tls.min_version} or later"
            )
            return _ALERT_PROTOCOL_VERSION
        connection.set_context(entry.context)
        if entry.verify_clients:
            connection.set_verify(_VERIFY_CLIENTS)
        info.host = host
        info.staples = entry.staples or {}
        info.refusal = None
        return None


def _log_callback_error(
    exc_type: type[BaseException] | None,
    exc_value: BaseException | None,
    traceback: TracebackType | None,
) -> None:
    # A bug in _ServerNameSelector: it cannot propagate through OpenSSL, so it
    # is logged and the handshake fails (the callback's `error` value).
    logger.error(
        "bug in the TLS servername callback; handshake refused",
        exc_info=exc_value,
    )


def _server_context(
    min_version: int,
    ciphers: str,
    context_class: type[SSL.Context] = SSL.Context,
    *,
    session_tickets: bool = False,
) -> SSL.Context:
    """A server context with gatewayd's settings; raises SSL.Error for bad ciphers."""
    context = context_class(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(min_version)
    context.set_max_proto_version(0)  # 0 = the highest OpenSSL supports
    context.set_options(
        SSL.OP_ALL  # OpenSSL's interoperability workarounds, as CPython's ssl enables
        | SSL.OP_NO_COMPRESSION  # CRIME
        | SSL.OP_NO_RENEGOTIATION  # client-initiated renegotiation refused
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        # Stateful resumption only, unless the operator asked for tickets
        # (see the top of this module).
        | (0 if session_tickets else SSL.OP_NO_TICKET)
    )
    if session_tickets:
        # A ticket is no use once its key is gone: say so in its lifetime hint.
        context.set_timeout(int(TICKET_KEY_ROTATION))
    # Free the 34 KiB read/write buffers of idle connections (CPython and
    # nginx do the same).
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    # TLS 1.2 only; TLS 1.3 suites stay at OpenSSL's defaults, and so do the
    # key exchange groups (X25519 first, then the NIST curves).
    context.set_cipher_list(ciphers.encode("ascii"))
    for groups in _GROUPS:
        if set_groups_list(context, groups):
            break
    else:  # pragma: no cover - every OpenSSL since 1.1.0 knows these three
        raise SSL.Error("no key exchange group of the Mozilla profiles is available")
    clear_errors()  # a refused first list leaves an error queued
    context.set_session_id(_SESSION_ID_CONTEXT)
    context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    context.set_alpn_select_callback(_select_alpn)
    # Client certificates only on hosts with client_ca (_host_tls).
    context.set_verify(SSL.VERIFY_NONE)
    # OCSP staples come from the chosen host (HandshakeInfo.staples); the
    # callback is looked up on the connection's current SSL_CTX, so every
    # context has it.
    context.set_ocsp_server_callback(_staple)
    return context


def _cipher_problem(ciphers: str) -> str | None:
    """Why ``ciphers`` cannot be used as a TLS 1.2 cipher list, or None."""
    try:
        ciphers.encode("ascii")
    except UnicodeEncodeError:
        return f"cipher list {ciphers!r} is not ASCII"
    probe = SSL.Context(SSL.TLS_SERVER_METHOD)
    try:
        probe.set_cipher_list(ciphers.encode("ascii"))
    except SSL.Error:
        return f"no cipher matches {ciphers!r} (OpenSSL cipher list syntax, e.g. 'ECDHE+AESGCM')"
    return None


class ServerTLS:
    """Per-generation TLS state: one ``OpenSSL.SSL.Context`` per ``[[host]]``, chosen by SNI.

    Built by :meth:`from_config` when a configuration is loaded or reloaded;
    connections accepted afterwards are wrapped with :meth:`wrap`. Established
    connections keep the generation they started with (their contexts stay
    alive as long as they do).

    Sessions (TLS 1.2 session IDs, TLS 1.3 stateful tickets; stateless
    tickets too where ``[tls] session_tickets`` is on) resume across the SNI
    switch: one session cache (and ticket key) per generation, so a client
    offering host A's session to host B would resume it (RFC 8446 section
    4.6.1 forbids clients to do so). A reload starts a new cache and key:
    clients do one full handshake after it.
    """

    def __init__(
        self,
        config: Config,
        hosts: HostTable,
        context: SSL.Context,
        host_contexts: dict[int, _HostTLS],
        min_version: int | None = None,
        selector: _ServerNameSelector | None = None,
    ) -> None:
        """Use :meth:`from_config`."""
        self.config = config
        self.hosts = hosts
        self._context = context
        self._host_contexts = host_contexts
        self._min_version = min_version
        self._selector = selector

    @property
    def session_tickets(self) -> bool:
        """Whether stateless session tickets are issued (``[tls] session_tickets``)."""
        return self.config.tls.session_tickets

    def rotate_ticket_key(self) -> None:
        """Replace the session ticket key (and the session cache) for new connections.

        Called every :data:`TICKET_KEY_ROTATION` seconds while session
        tickets are on. The first context of every connection holds both, so
        a new one is built; connections that started under the old one keep
        it. Tickets made with the old key no longer resume: a full handshake.
        """
        assert self._min_version is not None and self._selector is not None, "built by from_config"
        self._context = self._first_context(self.config, self._selector, self._min_version)

    @staticmethod
    def _first_context(
        config: Config, selector: _ServerNameSelector, lowest: int
    ) -> SSL.Context:
        # It only carries the settings OpenSSL reads before the servername
        # callback (the lowest minimum version of all hosts, options, session
        # ID context), the session cache and the ticket key; certificates and
        # cipher lists come from the host contexts after the switch.
        context = _server_context(
            lowest,
            config.tls.ciphers,
            _SNIContext,
            session_tickets=config.tls.session_tickets,
        )
        assert isinstance(context, _SNIContext)
        install_servername_callback(context, selector, _log_callback_error)
        return context

    @classmethod
    def from_config(cls, config: Config) -> ServerTLS:
        """Build contexts for every host of ``config`` that has a certificate.

        Reads each certificate file (PEM: leaf, then its chain) and private key,
        checks that they load and that the key matches the leaf, and applies
        the host's effective ``min_version`` and ``ciphers``.

        Raises:
            errors.ConfigErrors: every problem found, each a ConfigError naming
                the file and key path (``host[1].certificate``,
                ``host[1].private_key``, ``host[1].ciphers``; ``tls.ciphers``
                when the ``[tls]`` default itself is bad).
        """
        file = str(config.path)
        problems: list[errors.ConfigError] = []

        def problem(key_path: str, message: str) -> None:
            problems.append(errors.ConfigError(file, key_path, message))

        default_cipher_problem = _cipher_problem(config.tls.ciphers)
        if default_cipher_problem is not None:
            problem("tls.ciphers", default_cipher_problem)

        hosts: dict[int, _HostTLS] = {}
        pending: set[int] = set()
        store = Store(config.acme.state_dir) if config.acme is not None else None
        for host in config.hosts:
            if host.acme and store is not None:
                acme_entry = _acme_host_tls(host, store)
                if acme_entry is None:
                    pending.add(id(host))
                else:
                    hosts[id(host)] = acme_entry
                continue
            entry = _host_tls(host, config, default_cipher_problem is not None, problem)
            if entry is not None:
                hosts[id(host)] = entry
        if problems:
            raise errors.ConfigErrors(problems)

        # The context connections start with (see _first_context).
        versions = [entry.min_version for entry in hosts.values()]
        lowest = min(versions) if versions else _PROTOCOL_VERSIONS[config.tls.min_version]
        table = HostTable(config.hosts)
        challenges = (
            _AcmeChallenges(store, config.tls.ciphers)
            if store is not None and config.acme_hosts
            else None
        )
        selector = _ServerNameSelector(table, hosts, challenges, frozenset(pending))
        context = cls._first_context(config, selector, lowest)
        return cls(config, table, context, hosts, lowest, selector)

    def wrap(self, transport: trio.abc.Stream) -> TLSStream:
        """Server-side TLS stream over an accepted connection (handshake not done).

        Args:
            transport: the accepted TCP stream (any trio Stream works).
        """
        return TLSStream(transport, self._context, server_side=True)


# One loaded certificate: (key path, certificate file, its chain, its key).
_Loaded = tuple[str, Path, list[x509.Certificate], TLSPrivateKey]


def _host_tls(
    host: HostConfig,
    config: Config,
    default_ciphers_bad: bool,
    problem: Callable[[str, str], None],
) -> _HostTLS | None:
    """Load one host's certificates and keys into a context; report problems.

    Every check runs (each problem reported once, in the order of the keys)
    before anything is built: settings, certificate/key pairs, the OCSP
    response, the client CA. Returns None when the host has no certificate or
    anything was wrong.
    """
    if host.certificate is None:
        if config.needs_tls:
            problem(f"{host.key_path}.certificate", "required when a listener has tls = true")
        return None
    min_version, settings_ok = _check_settings(host, config, default_ciphers_bad, problem)
    loaded, pairs_ok = _load_pairs(host, host.certificate, problem)
    staples, staples_ok = _load_staples(host, loaded, problem)
    ca_ok = _check_client_ca(host, problem)
    if not (settings_ok and pairs_ok and staples_ok and ca_ok) or min_version is None or not loaded:
        return None
    context = _host_context(host, config, min_version, loaded, problem)
    if context is None:
        return None
    _warn_about_dates(loaded)
    return _HostTLS(
        context=context,
        min_version=min_version,
        verify_clients=host.client_ca is not None,
        staples=staples,
    )


def _check_settings(
    host: HostConfig, config: Config, default_ciphers_bad: bool, problem: Callable[[str, str], None]
) -> tuple[int | None, bool]:
    """The host's minimum version (OpenSSL's constant) and whether its TLS settings are usable."""
    settings: TLSSettings = host.tls
    ok = True
    min_version = _PROTOCOL_VERSIONS.get(settings.min_version)
    if min_version is None:
        problem(
            f"{host.key_path}.min_version",
            f"unknown TLS version {settings.min_version!r} (use 'TLSv1.2' or 'TLSv1.3')",
        )
        ok = False
    if settings.ciphers == config.tls.ciphers:
        if default_ciphers_bad:
            ok = False  # already reported once, as tls.ciphers
    else:
        cipher_problem = _cipher_problem(settings.ciphers)
        if cipher_problem is not None:
            problem(f"{host.key_path}.ciphers", cipher_problem)
            ok = False
    return min_version, ok


def _load_pairs(
    host: HostConfig, certificate: Path, problem: Callable[[str, str], None]
) -> tuple[list[_Loaded], bool]:
    """Load the main pair, then the extra ones (``certificates = [...]``), one per key type."""
    key_path = host.key_path
    ok = True
    pairs: list[tuple[str, Path, Path]] = []
    if host.private_key is None:
        problem(f"{key_path}.private_key", "required with certificate")
        ok = False
        cert_problem = load_certificates(certificate)[1]
        if cert_problem is not None:
            problem(f"{key_path}.certificate", cert_problem)
    else:
        pairs.append((key_path, certificate, host.private_key))
    pairs += [(pair.key_path, pair.certificate, pair.private_key) for pair in host.certificates]
    loaded: list[_Loaded] = []
    key_types: dict[str, str] = {}
    for where, cert_file, key_file in pairs:
        pair = load_pair(where, cert_file, key_file, problem)
        if pair is None:
            ok = False
            continue
        chain, key = pair
        kind = key_kind(key)
        if kind in key_types:
            problem(
                f"{where}.certificate",
                f"a second {kind} certificate ({cert_file}; {key_types[kind]} has one): "
                "OpenSSL holds one certificate per key type (RSA, ECDSA, Ed25519, Ed448), "
                "chosen by what the client supports",
            )
            ok = False
            continue
        key_types[kind] = where
        loaded.append((where, cert_file, chain, key))
    return loaded, ok


def _load_staples(
    host: HostConfig, loaded: list[_Loaded], problem: Callable[[str, str], None]
) -> tuple[dict[int, bytes], bool]:
    """The OCSP response to staple, by certificate serial; and whether the file was usable."""
    staples: dict[int, bytes] = {}
    if host.ocsp_response is None or not loaded:
        return staples, True
    staple = load_ocsp_response(host.ocsp_response, [chain[0] for _, _, chain, _ in loaded])
    if isinstance(staple, str):
        problem(f"{host.key_path}.ocsp_response", staple)
        return staples, False
    if staple is not None:
        staples[staple[0]] = staple[1]
    return staples, True


def _check_client_ca(host: HostConfig, problem: Callable[[str, str], None]) -> bool:
    """Whether the host's ``client_ca`` file (if any) loads."""
    if host.client_ca is None:
        return True
    ca_problem = load_certificates(host.client_ca)[1]
    if ca_problem is not None:
        problem(f"{host.key_path}.client_ca", ca_problem.replace("certificate file", "CA file"))
        return False
    return True


def _host_context(
    host: HostConfig,
    config: Config,
    min_version: int,
    loaded: list[_Loaded],
    problem: Callable[[str, str], None],
) -> SSL.Context | None:
    """The host's OpenSSL context with its certificates, keys and client CA; None if OpenSSL refuses."""
    context = _server_context(
        min_version,
        host.tls.ciphers,
        session_tickets=config.tls.session_tickets,
    )
    try:
        for _, cert_file, _, key in loaded:
            # Per certificate: its own chain (an ECDSA leaf and an RSA leaf
            # usually have different intermediates), then its key, which
            # OpenSSL files under the key's type beside the others.
            context.use_certificate_chain_file(str(cert_file))
            context.use_privatekey(key)
            context.check_privatekey()
        if host.client_ca is not None:
            # RFC 8446 section 4.3.2: certificate_authorities tells the client
            # which certificates we accept; verification uses the same file.
            context.load_verify_locations(str(host.client_ca))
            context.load_client_ca(str(host.client_ca).encode())
            context.set_session_id(
                _MTLS_SESSION_PREFIX + hashlib.sha256(
                    f"{host.key_path}:{host.client_ca}".encode()
                ).digest()[:16]
            )
    except SSL.Error as exc:
        problem(
            f"{host.key_path}.certificate",
            f"OpenSSL refused the certificate or key: {ssl_error_text(exc)}",
        )
        return None
    return context


def _warn_about_dates(loaded: list[_Loaded]) -> None:
    """Log certificates that are expired or not yet valid (they still load)."""
    now = datetime.now(timezone.utc)
    for where, cert_file, chain, _ in loaded:
        leaf = chain[0]
        if leaf.not_valid_after_utc < now:
            logger.warning(
                "%s: certificate %s expired on %s",
                where,
                cert_file,
                leaf.not_valid_after_utc.isoformat(),
            )
        elif leaf.not_valid_before_utc > now:
            logger.warning(
                "%s: certificate %s is not valid before %s",
                where,
                cert_file,
                leaf.not_valid_before_utc.isoformat(),
            )


# -- ACME (RFC 8555 certificates from state_dir, RFC 8737 challenges) -----------------


def _acme_host_tls(host: HostConfig, store: Store) -> _HostTLS | None:
    """An ACME host's context from its certificate in state_dir; None while it has none.

    A stored file that OpenSSL refuses counts as none (logged): the ACME
    manager issues a new one.
    """
    stored = store.load_certificate(host.names[0])
    if stored is None:
        return None
    min_version = _PROTOCOL_VERSIONS.get(host.tls.min_version, SSL.TLS1_2_VERSION)
    try:
        context = _server_context(min_version, host.tls.ciphers)
        _use_stored(context, stored)
    except (SSL.Error, ValueError) as exc:
        reason = ssl_error_text(exc) if isinstance(exc, SSL.Error) else str(exc)
        logger.warning(
            "%s: the ACME certificate %s is refused (%s); it will be reissued",
            host.key_path,
            stored.path,
            reason,
        )
        return None
    return _HostTLS(context=context, min_version=min_version)


def _use_stored(context: SSL.Context, stored: StoredCertificate) -> None:
    """Load a certificate file of the ACME store (key, leaf, chain) into ``context``."""
    key = serialization.load_pem_private_key(stored.key_pem, password=None)
    if not isinstance(key, TLSPrivateKey):
        raise ValueError(f"a {type(key).__name__} cannot sign TLS handshakes")
    context.use_certificate(stored.leaf)
    for extra in stored.chain[1:]:
        context.add_extra_chain_cert(extra)
    context.use_privatekey(key)
    context.check_privatekey()


class _AcmeChallenges:
    """TLS-ALPN-01 challenge contexts, from the answers the ACME leader publishes in state_dir.

    Read when a validation's ClientHello arrives (rare), so that a challenge
    published by another worker process is seen at once; a context is built
    once per published answer.
    """

    def __init__(self, store: Store, ciphers: str) -> None:
        self._store = store
        self._ciphers = ciphers
        self._contexts: dict[str, tuple[bytes, SSL.Context]] = {}

    def context_for(self, name: str) -> SSL.Context | None:
        try:
            pem = self._store.tls_alpn01_answer(name)
        except OSError as exc:
            logger.warning("cannot read the ACME challenge for %s: %s", name, exc)
            pem = None
        if pem is None:
            self._contexts.pop(name, None)
            return None
        cached = self._contexts.get(name)
        if cached is not None and cached[0] == pem:
            return cached[1]
        try:
            certificate = x509.load_pem_x509_certificate(pem[pem.find(b"-----BEGIN CERTIFICATE-----") :])
            key = serialization.load_pem_private_key(
                pem[pem.find(b"-----BEGIN PRIVATE KEY-----") :], password=None
            )
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError("the challenge key is not an EC key")
            context = _server_context(SSL.TLS1_2_VERSION, self._ciphers)
            context.use_certificate(certificate)
            context.use_privatekey(key)
        except (ValueError, SSL.Error) as exc:
            logger.warning("the ACME challenge for %s is unusable: %s", name, exc)
            return None
        self._contexts[name] = (pem, context)
        return context
