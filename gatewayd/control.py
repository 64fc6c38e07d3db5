"""The control loop of a running gatewayd: signals, reloads, systemd's watchdog and status.

One loop for both ways gatewayd runs: one process (:func:`gatewayd.cli.serve_until_signal`
over a :class:`~gatewayd.server.Gateway`) and the supervisor of worker
processes (:class:`gatewayd.workers.Supervisor`). What differs between them,
how to reload, drain or abort and what the status line says, is the
:class:`Controlled` they hand to :func:`control_loop`.

Theory of operation
-------------------
* **SIGHUP** asks for a reload. One reloader task runs them one at a time:
  a SIGHUP during a reload makes exactly one more afterwards (any number of
  them coalesce into that one). systemd hears ``RELOADING=1`` before and
  ``READY=1`` with the new status after, unless a shutdown began meanwhile
  (no ``READY=1`` after ``STOPPING=1``). Without a configuration file there
  is nothing to reload: a warning, and no notification.
* The first **SIGTERM or SIGINT** starts the drain: ``STOPPING=1``, then
  :meth:`Controlled.shutdown`. A second one (either) calls
  :meth:`Controlled.abort`: close every connection now. Reloads asked for
  after the first are dropped.
* **WATCHDOG=1** every ``notifier.watchdog_interval``, sent from the event
  loop itself, so a wedged loop stops the pings and systemd restarts us.
* **STATUS=** every ``status_interval`` while serving, so ``systemctl status``
  stays current (connection and worker counts move).

The loop runs until cancelled: its owner cancels it once the service has
stopped. Log lines go to the caller's logger, so they keep the names they
have always had (``gatewayd.cli`` for one process, ``gatewayd.workers`` for
the supervisor).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator
from typing import Protocol

import trio

from gatewayd.notify import Notifier

__all__ = ["Controlled", "control_loop"]


class Controlled(Protocol):
    """What the control loop drives."""

    def status(self) -> str:
        """The one-line status for systemd (``STATUS=``)."""
        ...

    async def reload(self) -> object:
        """Re-read the configuration file and swap to it; logs its outcome, never raises."""
        ...

    async def shutdown(self, signal_name: str) -> None:
        """The first SIGTERM/SIGINT: log it, stop accepting, drain."""
        ...

    async def abort(self, signal_name: str) -> None:
        """A second SIGTERM/SIGINT: log it, close every connection now."""
        ...


async def control_loop(
    service: Controlled,
    notifier: Notifier,
    signals: AsyncIterator[int],
    *,
    config_path: str | None,
    logger: logging.Logger,
    status_interval: float,
) -> None:
    """Handle ``signals`` (SIGTERM, SIGINT, SIGHUP) for ``service`` until cancelled.

    Args:
        service: what the signals act on.
        notifier: systemd's notification socket (a disabled one outside systemd).
        signals: from ``trio.open_signal_receiver(SIGTERM, SIGINT, SIGHUP)``,
            opened by the caller before start-up so that no signal is lost.
        config_path: the file SIGHUP reloads; None when there is none.
        logger: where the loop's own lines go.
        status_interval: seconds between ``STATUS=`` refreshes.
    """
    loop = _Loop(service, notifier, config_path, logger)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop.reloader)
        if notifier.watchdog_interval:
            nursery.start_soon(loop.watchdog, notifier.watchdog_interval)
        if notifier.enabled:
            nursery.start_soon(loop.refresh_status, status_interval)
        async for signum in signals:
            await loop.on_signal(signum)


class _Loop:
    """The state of one control loop: whether we are stopping, whether a reload is wanted."""

    def __init__(
        self, service: Controlled, notifier: Notifier, config_path: str | None, logger: logging.Logger
    ) -> None:
        self.service = service
        self.notifier = notifier
        self.config_path = config_path
        self.logger = logger
        self.stopping = False
        self.reload_wanted = trio.Event()

    async def on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self.reload_wanted.set()
            return
        name = signal.Signals(signum).name
        if self.stopping:
            await self.service.abort(name)
            return
        self.stopping = True
        self.notifier.stopping()
        await self.service.shutdown(name)

    async def reloader(self) -> None:
        while True:
            await self.reload_wanted.wait()
            self.reload_wanted = trio.Event()
            if self.stopping:
                return
            if self.config_path is None:
                self.logger.warning("SIGHUP: nothing to reload (no configuration file)")
                continue
            self.notifier.reloading()
            self.logger.info("SIGHUP received: reloading %s", self.config_path)
            await self.service.reload()
            if self.stopping:
                return  # STOPPING=1 is sent: no READY=1 after it
            self.notifier.ready(self.service.status())

    async def watchdog(self, interval: float) -> None:
        # From the event loop itself: a wedged loop stops the pings.
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval)

    async def refresh_status(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            if not self.stopping:
                self.notifier.status(self.service.status())
