"""The ACME loop of a running gateway: issue, renew, retry, and pick up what others issued.

Theory of operation
-------------------
Every gateway process (the single process, or each worker with ``workers`` >
1) runs one :class:`AcmeManager` beside its listeners, in the Gateway's
service nursery: start-up never waits on it.

* **One process talks to the CA.** The manager that holds ``state_dir/lock``
  (:class:`~gatewayd.acme.store.CALock`, an ``flock``) is the *leader*: it
  alone orders certificates and publishes challenge answers. The others try
  the lock on each round, so when the leader's process dies the kernel frees
  the lock and another takes over within :data:`POLL_SECONDS`.
* **Everyone picks the result up.** Certificates land in ``state_dir`` by
  atomic rename. Each round, every manager compares the certificate files of
  its ACME hosts with what its gateway serves (size, mtime, inode); a change
  calls ``on_change``, which rebuilds the gateway's TLS contexts exactly like
  a SIGHUP certificate rotation (new handshakes get the new certificate,
  established connections are untouched). The leader also calls it right
  after each issuance, without waiting for the round.
* **Challenges need no pick-up.** The issuer writes a challenge answer before
  it tells the CA to validate, and the TLS and HTTP code read it from
  ``state_dir`` when a validation request arrives, in whichever process the
  kernel gave that connection to.
* **When.** :func:`gatewayd.acme.schedule.next_attempt`: a host without a
  certificate (or whose names changed) at once; otherwise at its renewal
  time; after a failure, after the backoff. Failures, with the CA's problem
  document, are logged and persisted in ``certificates/<name>.json`` so that
  ``gatewayd check`` and a restart see them (a restart does not reset the
  backoff).
* **Blocking work** (the ``acme`` library's HTTP calls, key generation) runs
  in a worker thread, one order at a time; a shutdown abandons it.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from gatewayd.acme import schedule
from gatewayd.acme.client import Account, IssueFailed, Issuer, Request
from gatewayd.acme.store import FileSignature, Store, StoredCertificate, file_signature
from gatewayd.certinfo import covers, describe
from gatewayd.config import AcmeSettings, Config, HostConfig
from gatewayd.config.build import usable_challenges
from gatewayd.metrics import Metrics

logger = logging.getLogger("gatewayd.acme")

#: How often every process looks for new certificates and retries the CA lock.
POLL_SECONDS = 5.0
#: How often the leader asks the CA for renewal information (ARI), when offered.
ARI_REFRESH = datetime.timedelta(hours=6)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _when(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def validity_of(stored: StoredCertificate, host: HostConfig) -> schedule.Validity:
    """The dates of a stored certificate, and whether it covers the host's names now."""
    info = describe(stored.leaf, stored.path)
    return schedule.Validity(
        not_before=info.not_before,
        not_after=info.not_after,
        covers_names=all(covers(info, name) for name in host.names),
    )


@dataclass
class HostStatus:
    """What the leader knows of one host beyond its certificate file (persisted as JSON)."""

    failures: int = 0
    last_failure: datetime.datetime | None = None
    last_error: str = ""
    suggested: datetime.datetime | None = None
    ari_checked: datetime.datetime | None = None
    next_attempt: datetime.datetime | None = None

    def to_json(self) -> dict[str, Any]:
        def stamp(moment: datetime.datetime | None) -> str | None:
            return moment.isoformat() if moment is not None else None

        return {
            "failures": self.failures,
            "last_failure": stamp(self.last_failure),
            "last_error": self.last_error,
            "suggested_renewal": stamp(self.suggested),
            "next_attempt": stamp(self.next_attempt),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> HostStatus:
        if not data:
            return cls()

        def moment(key: str) -> datetime.datetime | None:
            value = data.get(key)
            if not isinstance(value, str):
                return None
            try:
                parsed = datetime.datetime.fromisoformat(value)
            except ValueError:
                return None
            return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=datetime.timezone.utc)

        failures = data.get("failures")
        return cls(
            failures=failures if isinstance(failures, int) and failures >= 0 else 0,
            last_failure=moment("last_failure"),
            last_error=str(data.get("last_error") or ""),
            suggested=moment("suggested_renewal"),
            next_attempt=moment("next_attempt"),
        )


@dataclass(frozen=True)
class HostReport:
    """One ACME host's state, for ``gatewayd check`` and the start-up log."""

    host: HostConfig
    name: str
    valid_until: datetime.datetime | None
    next_attempt: datetime.datetime
    covers_names: bool
    failures: int
    last_error: str

    def describe(self, now: datetime.datetime) -> str:
        if self.valid_until is None:
            state = "no certificate yet"
        elif self.valid_until <= now:
            state = f"certificate EXPIRED on {_when(self.valid_until)}"
        else:
            state = f"certificate valid until {_when(self.valid_until)}"
        if self.valid_until is not None and not self.covers_names:
            state += " (does not cover every name: reissued)"
        due = "now" if self.next_attempt <= now else _when(self.next_attempt)
        text = f"{state}; next ACME order {due}"
        if self.failures:
            text += f" ({self.failures} failure(s) in a row, last: {self.last_error})"
        return text


def host_reports(config: Config, now: datetime.datetime | None = None) -> list[HostReport]:
    """Each ACME host's state as ``state_dir`` has it (reads files only, never the CA)."""
    acme = config.acme
    if acme is None:
        return []
    now = now or _now()
    store = Store(acme.state_dir)
    reports: list[HostReport] = []
    for host in config.acme_hosts:
        name = host.names[0]
        stored = store.load_certificate(name)
        status = HostStatus.from_json(store.read_json(store.status_path(name)))
        validity = validity_of(stored, host) if stored is not None else None
        due = schedule.next_attempt(
            now,
            validity,
            datetime.timedelta(days=acme.renew_before),
            failures=status.failures,
            last_failure=status.last_failure,
            suggested=status.suggested,
        )
        reports.append(
            HostReport(
                host=host,
                name=name,
                valid_until=validity.not_after if validity is not None else None,
                next_attempt=due,
                covers_names=validity.covers_names if validity is not None else False,
                failures=status.failures,
                last_error=status.last_error,
            )
        )
    return reports


@dataclass
class _Host:
    config: HostConfig
    status: HostStatus = field(default_factory=HostStatus)

    @property
    def name(self) -> str:
        return self.config.names[0]


class AcmeManager:
    """Issues and renews the certificates of one configuration's ``acme = true`` hosts."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        on_change: Callable[[], None],
        loaded: Callable[[], Mapping[str, FileSignature | None]],
        *,
        first_retry: float | None = None,
        poll_seconds: float | None = None,
    ) -> None:
        """Args:
            config: the configuration in force (needs ``[acme]``).
            metrics: where attempts and failures are counted.
            on_change: rebuilds the gateway's certificates from ``state_dir``.
            loaded: the signatures of the certificate files the gateway's
                certificates in force were loaded from (by host first name).
            first_retry: seconds before the first retry (default
                :data:`gatewayd.acme.schedule.FIRST_RETRY`).
            poll_seconds: how often to look for certificates others issued
                (default :data:`POLL_SECONDS`).
        """
        assert config.acme is not None
        self.metrics = metrics
        self.on_change = on_change
        self._loaded = loaded
        self.first_retry = schedule.FIRST_RETRY if first_retry is None else first_retry
        self.poll_seconds = POLL_SECONDS if poll_seconds is None else poll_seconds
        self._settings: AcmeSettings = config.acme
        self.store = Store(config.acme.state_dir)
        self._lock = self.store.lock()
        self._issuer: Issuer | None = None
        self._hosts: dict[str, _Host] = {}
        self._challenges: tuple[str, ...] = ()
        self._wake = trio.Event()
        self._failed_rotation: dict[str, FileSignature | None] | None = None
        self.configure(config)

    @property
    def leader(self) -> bool:
        """Whether this process holds the CA lock."""
        return self._lock.held

    def configure(self, config: Config) -> None:
        """Take a reloaded configuration (new or removed ACME hosts, other settings)."""
        acme = config.acme
        if acme is None:
            self._hosts = {}
            self._wake.set()
            return
        if acme != self._settings or self._issuer is None:
            if acme.state_dir != self._settings.state_dir:
                self._lock.release()
                self.store = Store(acme.state_dir)
                self._lock = self.store.lock()
            self._settings = acme
            self._issuer = Issuer(self.store, Account(acme.directory, acme.email, acme.ca_bundle))
        hosts: dict[str, _Host] = {}
        for host in config.acme_hosts:
            previous = self._hosts.get(host.names[0])
            hosts[host.names[0]] = _Host(host, previous.status if previous else HostStatus())
        self._hosts = hosts
        self._challenges = usable_challenges(acme.challenges, config.listeners)
        self._wake.set()

    def close(self) -> None:
        self._lock.release()

    # -- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled: rounds of pick-up, lock, and (leader) due orders."""
        try:
            self.store.prepare()
        except OSError as exc:
            logger.error("acme: cannot use state_dir %s: %s; no certificates will be issued", self.store.root, exc)
            return
        self._log_states()
        try:
            while True:
                self._wake = trio.Event()
                try:
                    wake_at = await self._round()
                except Exception:
                    # A bug, or the state directory failing under us: logged, and
                    # the next round tries again; the gateway serves on regardless.
                    logger.exception("acme: a round of the ACME manager failed")
                    wake_at = _now() + datetime.timedelta(seconds=self.poll_seconds)
                delay = max(0.0, (wake_at - _now()).total_seconds())
                with trio.move_on_after(delay):
                    await self._wake.wait()
        finally:
            self.close()

    async def _round(self) -> datetime.datetime:
        """Pick up, try the lock, order what is due (leader); when to run the next round."""
        self._pick_up()
        was_leader = self.leader
        if self._lock.acquire_nowait() and not was_leader:
            logger.info("acme: this process talks to the CA for %s (lock %s)", self.store.root, self._lock.path)
            for host in self._hosts.values():
                host.status = HostStatus.from_json(self.store.read_json(self.store.status_path(host.name)))
        wake_at = _now() + datetime.timedelta(seconds=self.poll_seconds)
        if self.leader:
            for host in list(self._hosts.values()):
                due = await self._maybe_order(host)
                if due is not None:
                    wake_at = min(wake_at, due)
        return wake_at

    def _pick_up(self) -> None:
        """Rebuild the gateway's certificates when a certificate file is not the one loaded."""
        loaded = self._loaded()
        current = {name: file_signature(self.store.certificate_path(name)) for name in self._hosts}
        if all(current[name] == loaded.get(name) for name in current):
            return
        if current == self._failed_rotation:
            return  # already tried and logged; wait for the files to change again
        try:
            self.on_change()
        except Exception:
            self._failed_rotation = current
            logger.exception("acme: the new certificates could not be put in service; the old ones stay")
        else:
            self._failed_rotation = None

    def _log_states(self) -> None:
        now = _now()
        for name, host in self._hosts.items():
            stored = self.store.load_certificate(name)
            if stored is None:
                logger.info(
                    "acme: %s (%s): no certificate yet; TLS handshakes fail until it is issued",
                    name,
                    host.config.key_path,
                )
            else:
                validity = validity_of(stored, host.config)
                renew = schedule.renewal_time(validity, self._renew_before(), host.status.suggested)
                logger.info(
                    "acme: %s: certificate valid until %s, renewal %s",
                    name,
                    _when(validity.not_after),
                    "now" if renew <= now else f"at {_when(renew)}",
                )

    def _renew_before(self) -> datetime.timedelta:
        return datetime.timedelta(days=self._settings.renew_before)

    async def _maybe_order(self, host: _Host) -> datetime.datetime | None:
        """Order now if due; when this host is due next."""
        stored = self.store.load_certificate(host.name)
        validity = validity_of(stored, host.config) if stored is not None else None
        if stored is not None and self._issuer is not None:
            await self._refresh_ari(host, stored)
        due = schedule.next_attempt(
            _now(),
            validity,
            self._renew_before(),
            failures=host.status.failures,
            last_failure=host.status.last_failure,
            suggested=host.status.suggested,
            first_retry=self.first_retry,
        )
        if due > _now():
            self._schedule(host, due)
            return due
        await self._order(host, stored)
        return host.status.next_attempt

    async def _refresh_ari(self, host: _Host, stored: StoredCertificate) -> None:
        now = _now()
        if host.status.ari_checked is not None and now - host.status.ari_checked < ARI_REFRESH:
            return
        host.status.ari_checked = now
        issuer = self._issuer
        assert issuer is not None
        suggested = await trio.to_thread.run_sync(
            issuer.suggested_renewal, stored.chain_pem, abandon_on_cancel=True
        )
        if suggested != host.status.suggested:
            host.status.suggested = suggested
            if suggested is not None:
                logger.info("acme: %s: the CA suggests renewing at %s (ARI)", host.name, _when(suggested))

    def _schedule(self, host: _Host, due: datetime.datetime) -> None:
        if host.status.next_attempt != due:
            host.status.next_attempt = due
            self.metrics.acme_scheduled(host.name, due.timestamp())

    async def _order(self, host: _Host, stored: StoredCertificate | None) -> None:
        issuer = self._issuer
        assert issuer is not None
        request = Request(host.name, host.config.names, self._challenges)
        reason = "first certificate" if stored is None else "renewal"
        logger.info(
            "acme: %s: ordering a certificate for %s from %s (%s)",
            host.name,
            ", ".join(host.config.names),
            self._settings.directory,
            reason,
        )
        self.metrics.acme_attempted(host.name)
        try:
            new = await trio.to_thread.run_sync(issuer.issue, request, abandon_on_cancel=True)
        except IssueFailed as failure:
            self._failed(host, stored, failure, failure.kind)
            return
        except Exception as exc:  # a bug or an unexpected library error: logged, retried
            logger.exception("acme: %s: the order failed unexpectedly", host.name)
            self._failed(host, stored, exc, "internal")
            return
        validity = validity_of(new, host.config)
        host.status = HostStatus(ari_checked=None)
        due = schedule.renewal_time(validity, self._renew_before())
        self._schedule(host, due)
        self._save_status(host)
        logger.info(
            "acme: %s: new certificate (serial %x) valid until %s; next renewal at %s",
            host.name,
            new.leaf.serial_number,
            _when(validity.not_after),
            _when(due),
        )
        self._pick_up()

    def _failed(
        self, host: _Host, stored: StoredCertificate | None, error: BaseException, kind: str
    ) -> None:
        now = _now()
        status = host.status
        status.failures += 1
        status.last_failure = now
        status.last_error = str(error)
        self.metrics.acme_failed(host.name, kind)
        delay = schedule.retry_delay(status.failures, self.first_retry)
        due = now + datetime.timedelta(seconds=delay)
        self._schedule(host, due)
        self._save_status(host)
        if stored is not None:
            keeping = f"the current certificate (valid until {_when(stored.leaf.not_valid_after_utc)}) stays in service"
        else:
            keeping = "no certificate to serve meanwhile: TLS handshakes for it fail"
        logger.warning(
            "acme: %s: order failed (%d in a row): %s; next attempt in %s at %s; %s",
            host.name,
            status.failures,
            error,
            _in_words(delay),
            _when(due),
            keeping,
        )

    def _save_status(self, host: _Host) -> None:
        try:
            self.store.write_json(self.store.status_path(host.name), host.status.to_json())
        except OSError as exc:
            logger.warning("acme: cannot write %s: %s", self.store.status_path(host.name), exc)


def _in_words(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:g}h"
    if seconds >= 60:
        return f"{seconds / 60:g}min"
    return f"{seconds:g}s"


def acme_warnings(config: Config) -> list[str]:
    """``gatewayd check`` warnings: challenges the CA cannot reach on its usual ports.

    Let's Encrypt validates TLS-ALPN-01 on port 443 and HTTP-01 on port 80
    (RFC 8737 section 3, RFC 8555 section 8.3); a gateway listening elsewhere
    needs a port forward (or a test CA configured otherwise), which check
    cannot see, so this is a warning, not an error.
    """
    acme = config.acme
    if acme is None or not config.acme_hosts:
        return []
    usable = usable_challenges(acme.challenges, config.listeners)
    tls_ports = {listener.address.port for listener in config.listeners if listener.tls}
    plain_ports = {listener.address.port for listener in config.listeners if not listener.tls}
    reachable = ("tls-alpn-01" in usable and 443 in tls_ports) or ("http-01" in usable and 80 in plain_ports)
    if reachable:
        return []
    wanted = " or ".join(
        {"tls-alpn-01": "a tls = true listener on port 443", "http-01": "a tls = false listener on port 80"}[kind]
        for kind in usable
    )
    return [
        f"acme.challenges: CAs validate on ports 443 (tls-alpn-01) and 80 (http-01) and no listener "
        f"uses them; issuance needs {wanted}, or a port forward to one"
    ]
