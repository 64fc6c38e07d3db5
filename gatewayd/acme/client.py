"""One issuance, start to end, with certbot's ``acme`` library (blocking: run in a thread).

RFC 8555 flow (section 7.1 overview): fetch the directory; load or register
the account (its key and URL are kept in the store, so a restart reuses it);
create an order for the host's names; for each authorization still pending,
publish the answer of the first challenge type the configuration allows and
the CA offers (the store makes it visible to every process of the gateway),
then tell the CA to validate; poll; finalize with a CSR for a fresh P-256
key; download the chain; withdraw the challenge answers whatever happened.

The ``acme`` library does the JOSE signing, nonces (with one retry on
``badNonce``), polling with ``Retry-After`` and the problem documents
(RFC 7807). It no longer knows TLS-ALPN-01, so that challenge is answered
with :class:`TLSALPN01Response` (an empty JSON object, as every RFC 8555
challenge response) and its certificate comes from
:func:`gatewayd.acme.challenges.tls_alpn01_certificate`.

Every failure is raised as :class:`IssueFailed`, carrying the CA's problem
document when there is one, for the log.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWKEC

from gatewayd import __version__
from gatewayd.acme.challenges import key_authorization, tls_alpn01_certificate
from gatewayd.acme.store import Store, StoredCertificate, parse_certificate_file

logger = logging.getLogger("gatewayd.acme")

#: Bound on one HTTP request to the CA, and on waiting for validation and issuance.
REQUEST_TIMEOUT = 30
ORDER_TIMEOUT = 120.0

TLS_ALPN_01 = "tls-alpn-01"
HTTP_01 = "http-01"
CHALLENGE_TYPES = (TLS_ALPN_01, HTTP_01)


class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """The response to a TLS-ALPN-01 challenge (RFC 8737 section 3): ``{}`` on the wire."""

    typ = TLS_ALPN_01


class IssueFailed(Exception):
    """An issuance did not produce a certificate.

    Attributes:
        reason: what failed, for the log line.
        problem: the CA's problem document (RFC 7807 JSON object), when it sent one.
        kind: a short label for the metrics (``network``, ``ca_error``,
            ``validation``, ``timeout``, ``no_challenge``).
    """

    def __init__(self, reason: str, kind: str, problem: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.problem = problem

    def __str__(self) -> str:
        if self.problem is None:
            return self.reason
        return f"{self.reason}; the CA said: {json.dumps(self.problem, sort_keys=True)}"


@dataclass(frozen=True)
class Request:
    """What to issue: the host's first name (its file in the store) and all its names."""

    name: str
    names: tuple[str, ...]
    #: Challenge types allowed, in preference order.
    challenges: tuple[str, ...]


@dataclass(frozen=True)
class Account:
    directory_url: str
    email: str
    ca_bundle: Path | None


class Issuer:
    """Talks to one ACME CA on behalf of one account (blocking calls)."""

    def __init__(self, store: Store, account: Account) -> None:
        self.store = store
        self.account = account
        self._client: client.ClientV2 | None = None
        self._key: JWKEC | None = None

    # -- connection and account ---------------------------------------------------------

    def _account_key(self) -> JWKEC:
        folder = self.store.account_dir(self.account.directory_url)
        path = folder / "key.pem"
        data = self.store.read(path)
        if data is None:
            key = ec.generate_private_key(ec.SECP256R1())
            data = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            self.store.write_atomic(path, data)
        loaded = serialization.load_pem_private_key(data, password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise IssueFailed(f"account key {path} is not an EC key", "account")
        return JWKEC(key=loaded)

    def connect(self) -> client.ClientV2:
        """The directory fetched and the account ready (registered on first use)."""
        if self._client is not None:
            return self._client
        key = self._account_key()
        # requests takes a CA file where verify_ssl goes (acme passes it on as is).
        verify: Any = str(self.account.ca_bundle) if self.account.ca_bundle else True
        net = client.ClientNetwork(
            key,
            alg=ES256,
            verify_ssl=verify,
            user_agent=f"gatewayd/{__version__} acme-python",
            timeout=REQUEST_TIMEOUT,
        )
        directory = client.ClientV2.get_directory(self.account.directory_url, net)
        acme = client.ClientV2(directory, net)
        folder = self.store.account_dir(self.account.directory_url)
        saved = self.store.read_json(folder / "account.json")
        if saved is not None and isinstance(saved.get("uri"), str):
            net.account = messages.RegistrationResource(
                uri=saved["uri"], body=messages.Registration()
            )
        else:
            registration = messages.NewRegistration.from_data(
                email=self.account.email or None, terms_of_service_agreed=True
            )
            try:
                regr = acme.new_account(registration)
            except errors.ConflictError as conflict:
                # The key is registered already (the JSON file was lost).
                regr = messages.RegistrationResource(
                    uri=str(conflict.location), body=messages.Registration()
                )
                net.account = regr
            self.store.write_json(
                folder / "account.json",
                {"directory": self.account.directory_url, "uri": regr.uri},
            )
            logger.info("ACME account registered at %s: %s", self.account.directory_url, regr.uri)
        self._client = acme
        self._key = key
        return acme

    # -- issuance ---------------------------------------------------------------------------

    def issue(self, request: Request) -> StoredCertificate:
        """Order, validate, finalize, store; the stored certificate.

        Raises:
            IssueFailed: anything went wrong (the CA's problem document attached).
        """
        try:
            return self._issue(request)
        except IssueFailed:
            self._client = None
            raise
        except messages.Error as error:
            self._client = None
            raise IssueFailed(
                f"the CA refused: {error.detail or error.typ}", "ca_error", error.to_partial_json()
            ) from error
        except errors.ValidationError as error:
            self._client = None
            raise _validation_failed(error) from error
        except errors.TimeoutError as error:
            self._client = None
            raise IssueFailed("the order was not ready in time", "timeout") from error
        except requests.RequestException as error:
            self._client = None
            raise IssueFailed(f"cannot reach the CA: {_network_reason(error)}", "network") from error
        except errors.Error as error:
            self._client = None
            raise IssueFailed(f"ACME error: {error}", "ca_error") from error

    def _issue(self, request: Request) -> StoredCertificate:
        acme = self.connect()
        assert self._key is not None
        certificate_key = ec.generate_private_key(ec.SECP256R1())
        key_pem = certificate_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        csr = crypto_util.make_csr(key_pem, list(request.names))
        order = acme.new_order(csr)
        withdraw: list[Callable[[], None]] = []
        try:
            for authorization in order.authorizations:
                if authorization.body.status == messages.STATUS_VALID:
                    continue
                self._answer(acme, request, authorization, withdraw)
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
            order = acme.poll_authorizations(order, deadline)
        finally:
            for undo in withdraw:
                undo()
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
        order = acme.finalize_order(order, deadline)
        chain_pem = order.fullchain_pem.encode("ascii")
        self.store.save_certificate(request.name, key_pem, chain_pem)
        stored = parse_certificate_file(self.store.certificate_path(request.name), key_pem + chain_pem)
        if stored is None:
            raise IssueFailed("the CA sent a certificate chain that does not parse", "ca_error")
        return stored

    def _answer(
        self,
        acme: client.ClientV2,
        request: Request,
        authorization: messages.AuthorizationResource,
        withdraw: list[Callable[[], None]],
    ) -> None:
        assert self._key is not None
        name = str(authorization.body.identifier.value)
        offered = {_type(challenge): challenge for challenge in authorization.body.challenges}
        for kind in request.challenges:
            challenge = offered.get(kind)
            if challenge is None:
                continue
            token = _token(challenge)
            key_auth = key_authorization(token, self._key)
            response: challenges.ChallengeResponse
            if kind == TLS_ALPN_01:
                self.store.publish_tls_alpn01(name, tls_alpn01_certificate(name, key_auth))
                withdraw.append(functools.partial(self.store.remove, self.store.tls_alpn01_path(name)))
                response = TLSALPN01Response(key_authorization=key_auth)
            else:
                self.store.publish_http01(token, key_auth)
                withdraw.append(functools.partial(self.store.remove, self.store.http01_path(token)))
                response = challenges.HTTP01Response(key_authorization=key_auth)
            logger.info("ACME %s challenge for %s published; asking the CA to validate", kind, name)
            acme.answer_challenge(challenge, response)
            return
        raise IssueFailed(
            f"the CA offers no challenge gatewayd can answer for {name} "
            f"(offered: {', '.join(sorted(str(k) for k in offered)) or 'none'}; "
            f"allowed here: {', '.join(request.challenges)})",
            "no_challenge",
        )

    def suggested_renewal(self, chain_pem: bytes) -> datetime.datetime | None:
        """The CA's ARI renewal time for a certificate (RFC 9773), or None.

        None too when the CA offers no renewal information or cannot be
        asked right now: the renew_before schedule applies then.
        """
        try:
            acme = self.connect()
            when, _ = acme.renewal_time(chain_pem)
        except (IssueFailed, errors.Error, messages.Error, requests.RequestException) as exc:
            logger.debug("no ARI renewal information: %s", exc)
            self._client = None
            return None
        return when


def _type(challenge: messages.ChallengeBody) -> str:
    return str(challenge.to_partial_json().get("type", ""))


def _token(challenge: messages.ChallengeBody) -> str:
    value = challenge.to_partial_json().get("token")
    if not isinstance(value, str):
        raise IssueFailed("the CA sent a challenge without a token", "ca_error")
    return value


def _validation_failed(error: errors.ValidationError) -> IssueFailed:
    """The first failed challenge's problem document, for the log."""
    for authorization in error.failed_authzrs:
        for challenge in authorization.body.challenges:
            if challenge.error is not None:
                problem = challenge.error.to_partial_json()
                name = authorization.body.identifier.value
                detail = challenge.error.detail or challenge.error.typ
                return IssueFailed(f"validation of {name} failed: {detail}", "validation", problem)
    return IssueFailed("validation failed", "validation")


def _network_reason(error: requests.RequestException) -> str:
    text = str(error)
    return text if len(text) < 300 else text[:300] + "..."
