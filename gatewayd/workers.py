"""Several worker processes on the same listeners (``[gateway] workers`` > 1).

Theory of operation
-------------------
One **supervisor** process (``gatewayd run``) owns everything shared and serves
no client itself; N **worker** processes (``python -m gatewayd.workers``) each
run an ordinary :class:`~gatewayd.server.Gateway` over the supervisor's sockets.

* **Sockets.** The supervisor binds every ``[[listener]]`` once (or takes it
  from socket activation) and hands the listening sockets to each worker over
  its control channel (``SCM_RIGHTS``). All workers accept on the same sockets
  and the kernel gives each new connection to one of them; a busy worker comes
  back to ``accept`` later, so load spreads by itself. Because the sockets
  outlive any worker, a worker that dies or is replaced never closes a
  listener, nothing is refused meanwhile, and socket activation works as with
  one process. The supervisor also serves ``[admin]`` (workers never bind it).
* **Control channel.** One ``AF_UNIX`` ``SOCK_SEQPACKET`` socket pair per
  worker. Messages are JSON objects, split into datagrams of at most
  :data:`_PIECE` bytes (first byte ``M``: more follows, ``E``: the end); file
  descriptors ride on a message's first datagram. Supervisor to worker:
  ``start`` and ``reload`` (the configuration text the supervisor validated,
  the generation number, and the listening sockets, by ``str(address)``),
  ``metrics``. Worker to supervisor: ``ready``, ``reloaded`` (ok or the
  error), ``metrics`` (the worker's Prometheus text). A worker that sees its
  channel close (the supervisor is gone, even killed) drains and exits.
* **Reload (SIGHUP).** The supervisor alone reads and fully validates the file
  (certificates included): a bad file is logged once and no worker hears of
  it. A good one: new listen addresses are bound by the supervisor (a bind
  failure fails the reload, nothing changed), then every worker gets
  ``reload`` with the validated text and the sockets, swaps (its own
  :meth:`Gateway.reload`: established connections untouched, removed listeners
  closed), and answers; then the supervisor closes the sockets of removed
  listeners. systemd hears ``RELOADING=1`` before and ``READY=1`` once every
  worker answered.
* **Shutdown (SIGTERM/SIGINT).** Forwarded to every worker, which drains as
  one process does; a second signal is forwarded too (close at once). The
  supervisor exits 0 once every worker has exited. ``STOPPING=1`` first.
* **A worker that dies** is logged and replaced after a backoff (0.1 s,
  doubling up to :data:`MAX_BACKOFF`, back to 0.1 s once a worker has lived
  :data:`STABLE_SECONDS`), with the current configuration and sockets. A worker
  that fails before its first ``ready`` at start-up stops the whole start
  (exit 1), like a bad listener does with one process.
* ``READY=1`` is sent once every worker reported ``ready`` (listening).
* **Limits.** ``max_connections`` and the per-address limits hold for the
  whole gateway: the supervisor creates one shared table of counts
  (:meth:`gatewayd.limits.Limits.create_shared`) before any worker, passes its
  descriptor to each (``--limits-fd``), and clears a dead worker's counts
  (:meth:`~gatewayd.limits.Limits.reset_worker`) before replacing it.

The supervisor's signals, reload serialization and systemd notifications
(``RELOADING=1``, ``READY=1``, ``STOPPING=1``, ``WATCHDOG=1``, ``STATUS=``) are
:func:`gatewayd.control.control_loop`'s, the same loop one process runs; the
supervisor is the :class:`~gatewayd.control.Controlled` it drives.

Workers ignore SIGHUP and SIGINT (a terminal's Ctrl-C reaches the whole
process group; the supervisor forwards it as SIGTERM): only the supervisor
decides. Worker log lines carry ``[worker N]``.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import trio

from gatewayd import log as gatewayd_log
from gatewayd.admin import AdminServer
from gatewayd.config import Address, Config, loads
from gatewayd.control import control_loop
from gatewayd.errors import ConfigErrors
from gatewayd.limits import Limits
from gatewayd.listen import address_key, bind_address, bind_listener
from gatewayd.metrics import process_metrics_text
from gatewayd.notify import Notifier
from gatewayd.server import Gateway, Generation, ReloadAbandoned, describe_changes

logger = logging.getLogger("gatewayd.workers")

#: Largest datagram on a control channel (well under the socket buffer).
_PIECE = 65000
#: File descriptors one message may carry (listeners of one configuration).
_MAX_FDS = 250
#: Restart backoff: first delay, cap, and the lifetime after which it resets.
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 10.0
STABLE_SECONDS = 10.0
#: Bound on a worker's start (configuration, certificates, listeners) and on its
#: answer to a reload or a metrics request.
START_SECONDS = 30.0
ANSWER_SECONDS = 30.0
#: A worker still running this long after the drain should have ended is killed.
EXIT_GRACE = 10.0
#: How often STATUS= is refreshed for systemd (as with one process).
STATUS_INTERVAL = 5.0


# -- the control channel ------------------------------------------------------------


async def send_message(
    sock: trio.socket.SocketType, message: dict[str, Any], fds: Sequence[int] = ()
) -> None:
    """Send one message (and ``fds`` with its first datagram)."""
    data = json.dumps(message, separators=(",", ":")).encode()
    pieces = [data[i : i + _PIECE] for i in range(0, len(data), _PIECE)] or [b""]
    for number, piece in enumerate(pieces):
        flag = b"E" if number == len(pieces) - 1 else b"M"
        ancillary = []
        if number == 0 and fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        await sock.sendmsg([flag + piece], ancillary)


async def receive_message(sock: trio.socket.SocketType) -> tuple[dict[str, Any], list[int]] | None:
    """The next message and the descriptors it carried; None once the peer is gone."""
    parts: list[bytes] = []
    fds: list[int] = []
    while True:
        data, ancillary, _, _ = await sock.recvmsg(_PIECE + 1, socket.CMSG_SPACE(_MAX_FDS * 4))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                fds.extend(received)
        if not data:
            for fd in fds:
                os.close(fd)
            return None
        parts.append(data[1:])
        if data[:1] == b"E":
            return json.loads(b"".join(parts)), fds


# -- the worker ---------------------------------------------------------------------


def _worker_config(text: str, path: str) -> Config:
    """The supervisor's validated text; the worker never serves ``[admin]``."""
    return replace(loads(text, path), admin=None)


def _adopt(keys: Sequence[str], fds: Sequence[int]) -> dict[str, trio.socket.SocketType]:
    sockets: dict[str, trio.socket.SocketType] = {}
    for key, fd in zip(keys, fds, strict=False):  # fds may hold more (closed below)
        sockets[key] = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
    for fd in fds[len(keys) :]:
        os.close(fd)
    return sockets


async def _worker(control: socket.socket, index: int, path: str, limits: Limits) -> int:
    channel = trio.socket.from_stdlib_socket(control)
    gateway = await _start_gateway(channel, index, path, limits)
    if gateway is None:
        return 1
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def serve_then_stop(task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED) -> None:
                await gateway.serve(task_status=task_status)
                nursery.cancel_scope.cancel()

            await nursery.start(serve_then_stop)
            await send_message(channel, {"op": "ready", "pid": os.getpid()})

            async def watch_signals() -> None:
                # Only the supervisor decides: SIGTERM once drains, twice aborts.
                async for _ in signals:
                    if gateway.shutting_down:
                        gateway.abort()
                    else:
                        gateway.shutdown()

            nursery.start_soon(watch_signals)
            nursery.start_soon(_obey, channel, gateway, path, index)
    return 0


async def _start_gateway(
    channel: trio.socket.SocketType, index: int, path: str, limits: Limits
) -> Gateway | None:
    """The worker's Gateway from the supervisor's ``start`` message, bound; None (reported) if it fails."""
    received = await receive_message(channel)
    if received is None or received[0].get("op") != "start":
        return None
    message, fds = received
    try:
        config = _worker_config(message["config"], path)
        gatewayd_log.setup(config.log.level, config.log.format, worker=index)
        generation = Generation.build(config, int(message["generation"]))
    except ConfigErrors as errors:
        for fd in fds:
            os.close(fd)
        for error in errors.errors:
            logger.error("worker %d: %s", index, error)
        await send_message(channel, {"op": "failed", "error": str(errors)})
        return None
    gateway = Gateway(
        config, generation=generation, inherited=_adopt(message["listeners"], fds), limits=limits
    )
    try:
        await gateway.bind()
    except OSError as exc:
        logger.error("%s", exc.strerror or exc)
        await send_message(channel, {"op": "failed", "error": str(exc.strerror or exc)})
        return None
    for sock in gateway.take_unused_sockets():
        sock.close()
    return gateway


async def _obey(channel: trio.socket.SocketType, gateway: Gateway, path: str, index: int) -> None:
    """Answer the supervisor's messages until its channel closes (then drain)."""
    while True:
        received = await receive_message(channel)
        if received is None:
            logger.warning("the supervisor is gone: shutting down")
            gateway.shutdown()
            return
        message, fds = received
        op = message.get("op")
        if op == "reload":
            answer = await _reload(gateway, message, fds, path, index)
            await send_message(channel, answer)
        elif op == "metrics":
            await send_message(channel, {"op": "metrics", "text": gateway.metrics.render().decode()})
        else:
            for fd in fds:
                os.close(fd)
            logger.error("unknown control message %r", op)


async def _reload(gateway: Gateway, message: dict[str, Any], fds: list[int], path: str, index: int) -> dict[str, Any]:
    old = gateway.generation.number
    try:
        config = _worker_config(message["config"], path)
    except ConfigErrors as errors:
        for fd in fds:
            os.close(fd)
        return {"op": "reloaded", "ok": False, "error": str(errors)}
    gateway.offer_sockets(_adopt(message["listeners"], fds))
    try:
        await gateway.reload(config)
        gateway.generation = replace(gateway.generation, number=int(message["generation"]))
    except (ConfigErrors, OSError, ReloadAbandoned) as exc:
        logger.error("reload failed: %s: still serving generation %d", exc, old)
        return {"op": "reloaded", "ok": False, "error": str(exc)}
    finally:
        for sock in gateway.take_unused_sockets():
            sock.close()
    gatewayd_log.setup(config.log.level, config.log.format, worker=index)
    logger.info("generation %d -> %d", old, gateway.generation.number)
    return {"op": "reloaded", "ok": True}


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of a worker process (started by the supervisor only)."""
    parser = argparse.ArgumentParser(prog="gatewayd-worker")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--limits-fd", type=int, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # No PR_SET_PDEATHSIG: it fires when the *thread* that forked us exits,
    # and trio starts processes from a cached thread that ends after 10 s
    # idle. The control channel's EOF is how a worker learns it is orphaned.
    gatewayd_log.setup(worker=args.index)
    control = socket.socket(fileno=args.control_fd)
    # The gateway-wide counts: the supervisor's table, this worker's column.
    limits = Limits.attach(args.limits_fd, args.index - 1)
    return trio.run(_worker, control, args.index, args.config, limits)


# -- the supervisor -----------------------------------------------------------------


@dataclass
class _Worker:
    """One worker slot: the process running in it now, and its restart history."""

    index: int
    process: trio.Process | None = None
    channel: trio.socket.SocketType | None = None
    ready: bool = False
    started: float = 0.0
    failures: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)
    replies: trio.MemorySendChannel[dict[str, Any]] | None = None
    inbox: trio.MemoryReceiveChannel[dict[str, Any]] | None = None


@dataclass
class _Listener:
    address: str            # str(ListenerConfig.address), how workers match it
    sock: socket.socket


class Supervisor:
    """Runs ``config.gateway.workers`` workers over sockets it owns (see the module doc)."""

    def __init__(
        self,
        path: str,
        config: Config,
        text: str,
        *,
        notifier: Notifier | None = None,
        inherited: dict[str, socket.socket] | None = None,
    ) -> None:
        self.path = path
        self.config = config
        self.text = text
        self.generation = 1
        self.notifier = notifier or Notifier({})
        self._inherited = dict(inherited or {})
        self._listeners: dict[str, _Listener] = {}      # by address_key
        self._admin: AdminServer | None = None
        self._workers = [_Worker(index) for index in range(1, config.gateway.workers + 1)]
        #: The connection counts every worker shares (gatewayd.limits): one
        #: column per worker slot, cleared when the slot's process dies.
        self.limits, self._limits_fd = Limits.create_shared(
            config.gateway.workers, config.gateway.max_connections
        )
        self._stopping = False
        self._started = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._start_failed: str | None = None

    # -- sockets

    async def _listen(self, config: Config) -> dict[str, _Listener]:
        """Sockets for every listener of ``config``: kept, inherited, or bound now."""
        result: dict[str, _Listener] = {}
        try:
            for listener in config.listeners:
                key = address_key(listener.address)
                if key in result:
                    continue
                kept = self._listeners.get(key)
                if kept is not None:
                    result[key] = _Listener(str(listener.address), kept.sock)
                    continue
                inherited = self._inherited.pop(str(listener.address), None)
                if inherited is not None:
                    logger.info("using the inherited socket for %s (socket activation)", listener.address)
                    sock = inherited
                else:
                    sock = socket.socket(fileno=(await bind_listener(listener)).detach())
                result[key] = _Listener(str(listener.address), sock)
        except OSError:
            for key, item in result.items():
                if key not in self._listeners:
                    item.sock.close()
            raise
        return result

    def _listener_message(self) -> tuple[list[str], list[int]]:
        items = list(self._listeners.values())
        return [item.address for item in items], [item.sock.fileno() for item in items]

    # -- workers

    async def _spawn(self, worker: _Worker) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        argv = [
            sys.executable, "-m", "gatewayd.workers",
            "--control-fd", str(theirs.fileno()), "--index", str(worker.index), "--config", self.path,
            "--limits-fd", str(self._limits_fd),
        ]
        try:
            process = await trio.lowlevel.open_process(
                argv, pass_fds=(theirs.fileno(), self._limits_fd), env=env
            )
        finally:
            theirs.close()
        worker.process = process
        worker.channel = trio.socket.from_stdlib_socket(ours)
        worker.ready = False
        worker.started = time.monotonic()
        send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        worker.replies, worker.inbox = send, receive
        logger.info("worker %d started (pid %d)", worker.index, process.pid)
        keys, fds = self._listener_message()
        await send_message(
            worker.channel,
            {"op": "start", "config": self.text, "generation": self.generation, "listeners": keys},
            fds,
        )

    async def _run_worker(self, worker: _Worker) -> None:
        """Keep slot ``worker`` running until shutdown: spawn, watch, replace."""
        while not self._stopping:
            async with worker.lock:
                await self._spawn(worker)
            assert worker.process is not None and worker.channel is not None
            process, channel = worker.process, worker.channel
            async with trio.open_nursery() as watch:
                watch.start_soon(self._read_channel, worker, channel)
                await process.wait()
                watch.cancel_scope.cancel()
            channel.close()
            # What the process held no longer counts, before anything replaces it.
            self.limits.reset_worker(worker.index - 1)
            worker.ready = False
            if worker.replies is not None:
                worker.replies.close()
            lived = time.monotonic() - worker.started
            code = process.returncode if process.returncode is not None else 0
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            if self._stopping:
                logger.info("worker %d (pid %d) exited (%s)", worker.index, process.pid, how)
                return
            if not self._started.is_set():
                self._start_failed = f"worker {worker.index} failed to start ({how})"
                self._started.set()
                return
            worker.failures = 0 if lived >= STABLE_SECONDS else worker.failures + 1
            delay = (
                min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** max(0, worker.failures - 1))
                if worker.failures
                else FIRST_BACKOFF
            )
            logger.error(
                "worker %d (pid %d) died (%s) after %.1fs; replacing it in %.1fs",
                worker.index, process.pid, how, lived, delay,
            )
            await trio.sleep(delay)

    async def _read_channel(self, worker: _Worker, channel: trio.socket.SocketType) -> None:
        while True:
            try:
                received = await receive_message(channel)
            except OSError:
                return
            if received is None:
                return
            message, fds = received
            for fd in fds:
                os.close(fd)
            if message.get("op") == "ready":
                worker.ready = True
                logger.debug("worker %d ready", worker.index)
                if all(w.ready for w in self._workers):
                    self._started.set()
            elif message.get("op") == "failed":
                logger.error("worker %d could not start: %s", worker.index, message.get("error"))
            elif worker.replies is not None:
                worker.replies.send_nowait(message)

    async def _ask(self, worker: _Worker, message: dict[str, Any], fds: Sequence[int] = ()) -> dict[str, Any] | None:
        """Send ``message`` to a ready worker and wait for its answer (None: no answer)."""
        async with worker.lock:
            if not worker.ready or worker.channel is None or worker.inbox is None:
                return None
            with trio.move_on_after(ANSWER_SECONDS):
                try:
                    await send_message(worker.channel, message, fds)
                    return await worker.inbox.receive()
                except (OSError, trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError):
                    return None
            logger.error("worker %d did not answer %r within %.0fs", worker.index, message.get("op"), ANSWER_SECONDS)
            return None

    async def collect_metrics(self) -> bytes:
        """Every worker's metrics, each sample labelled ``worker="N"``."""
        texts: dict[int, str] = {}

        async def one(worker: _Worker) -> None:
            answer = await self._ask(worker, {"op": "metrics"})
            if answer is not None:
                texts[worker.index] = str(answer.get("text", ""))

        async with trio.open_nursery() as nursery:
            for worker in self._workers:
                nursery.start_soon(one, worker)
        return merge_metrics(texts, supervisor=process_metrics_text()).encode()

    # -- the lifecycle

    def status(self) -> str:
        """The one-line status for systemd: generation, hosts, listeners, workers ready."""
        listeners = ", ".join(
            (f"[{h}]:{p}" if ":" in h else f"{h}:{p}")
            for h, p in (item.sock.getsockname()[:2] for item in self._listeners.values())
        )
        ready = sum(1 for w in self._workers if w.ready)
        return (
            f"generation {self.generation}: {len(self.config.hosts)} host(s) on {listeners}; "
            f"{ready}/{len(self._workers)} worker(s)"
        )

    async def run(self) -> int:
        """Bind, start the workers, serve signals until every worker has exited."""
        try:
            self._listeners = await self._listen(self.config)
            if self.config.admin is not None:
                self._admin = await self._open_admin(self.config.admin.listen)
        except OSError as exc:
            logger.error("%s", exc.strerror or exc)
            return 1
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as services:
                if self._admin is not None:
                    services.start_soon(self._admin.serve)
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    for worker in self._workers:
                        nursery.start_soon(self._run_worker, worker)
                    with trio.move_on_after(START_SECONDS):
                        await self._started.wait()
                    if self._start_failed or not self._started.is_set():
                        logger.error(
                            "%s; stopping",
                            self._start_failed or f"workers not ready within {START_SECONDS:.0f}s",
                        )
                        await self._stop_workers(signal.SIGKILL)
                        nursery.cancel_scope.cancel()
                        services.cancel_scope.cancel()
                        return 1
                    logger.info("%d workers serving: %s", len(self._workers), self.status())
                    self.notifier.ready(self.status())
                    nursery.start_soon(
                        partial(
                            control_loop,
                            self,
                            self.notifier,
                            signals,
                            config_path=self.path,
                            logger=logger,
                            status_interval=STATUS_INTERVAL,
                        )
                    )
                    # The nursery ends when every worker slot has returned
                    # (only after shutdown) and the helpers are cancelled.
                    await self._wait_workers_done()
                    nursery.cancel_scope.cancel()
                services.cancel_scope.cancel()
        for item in self._listeners.values():
            item.sock.close()
        logger.info("stopped")
        return 0

    async def _wait_workers_done(self) -> None:
        while not (
            self._stopping
            and all(w.process is None or w.process.returncode is not None for w in self._workers)
        ):
            await trio.sleep(0.05)

    # -- what the control loop (gatewayd.control) drives

    async def shutdown(self, signal_name: str) -> None:
        """The first SIGTERM/SIGINT: forward it; the workers drain."""
        self._stopping = True
        logger.info("%s received: shutting down %d worker(s)", signal_name, len(self._workers))
        await self._stop_workers(signal.SIGTERM)
        # The workers close their copies as they stop accepting; once ours
        # are closed too, new connections are refused, as with one process.
        for item in self._listeners.values():
            item.sock.close()
        assert self._nursery is not None
        self._nursery.start_soon(self._kill_late, self.config.gateway.shutdown_timeout + EXIT_GRACE)

    async def abort(self, signal_name: str) -> None:
        """A second SIGTERM/SIGINT: forwarded too; the workers close every connection."""
        logger.warning("%s received again: workers close every connection now", signal_name)
        await self._stop_workers(signal.SIGTERM)

    async def _stop_workers(self, signum: int) -> None:
        for worker in self._workers:
            process = worker.process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)
        await trio.lowlevel.checkpoint()

    async def _kill_late(self, after: float) -> None:
        await trio.sleep(after)
        for worker in self._workers:
            if worker.process is not None and worker.process.returncode is None:
                logger.error("worker %d still running %.0fs after SIGTERM: killing it", worker.index, after)
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()

    async def _open_admin(self, address: Address) -> AdminServer:
        sock = await bind_address(address)
        return AdminServer(
            address,
            sock,
            ready=lambda: not self._stopping and all(w.ready for w in self._workers),
            metrics=lambda: b"",
            collect=self.collect_metrics,
        )

    async def reload(self) -> bool:
        """SIGHUP: validate once, bind new addresses, swap every worker (see the module doc).

        The control loop has sent RELOADING=1 and sends READY=1 afterwards.
        Returns whether the new configuration is being served.
        """
        old = self.generation
        loaded = await self._read_new_config(old)
        if loaded is None:
            return False
        text, config = loaded
        try:
            listeners = await self._listen(config)
            admin_changed = _admin_address(config) != _admin_address(self.config)
            admin = self._admin
            if admin_changed and config.admin is not None:
                admin = await self._open_admin(config.admin.listen)
        except OSError as exc:
            logger.error("reload failed: %s: still serving generation %d, unchanged", exc.strerror or exc, old)
            return False
        if self._stopping:
            for key, item in listeners.items():
                if key not in self._listeners:
                    item.sock.close()
            logger.warning("reload abandoned: shutting down (generation %d unchanged)", old)
            return False
        removed = [item for key, item in self._listeners.items() if key not in listeners]
        changes = describe_changes(self.config, config)
        self.generation += 1
        self.config, self.text, self._listeners = config, text, listeners
        failures = await self._swap_workers()
        for item in removed:
            item.sock.close()
        if admin_changed:
            self._swap_admin(admin if config.admin is not None else None)
        gatewayd_log.setup(config.log.level, config.log.format)
        for failure in failures:
            logger.error("reload: %s", failure)
        logger.info(
            "reload succeeded: generation %d -> %d: %s (%d worker(s) swapped)",
            old, self.generation, "; ".join(changes) if changes else "no changes (certificates re-read)",
            len(self._workers) - len(failures),
        )
        return True

    async def _read_new_config(self, old: int) -> tuple[str, Config] | None:
        """The file's text and configuration, fully validated; None (logged) when it is bad."""
        try:
            text, config = await trio.to_thread.run_sync(_read_and_validate, self.path, abandon_on_cancel=True)
        except ConfigErrors as errors:
            for error in errors.errors:
                logger.error("reload: %s", error)
            logger.error(
                "reload failed (%d error(s)): still serving generation %d, unchanged", len(errors.errors), old
            )
            return None
        if config.gateway.workers != self.config.gateway.workers:
            logger.warning(
                "[gateway] workers changed from %d to %d: takes effect when gatewayd restarts",
                self.config.gateway.workers, config.gateway.workers,
            )
        return text, config

    async def _swap_workers(self) -> list[str]:
        """Send the current configuration and sockets to every worker; what failed, per worker."""
        keys, fds = self._listener_message()
        message = {"op": "reload", "config": self.text, "generation": self.generation, "listeners": keys}
        failures: list[str] = []

        async def one(worker: _Worker) -> None:
            answer = await self._ask(worker, message, fds)
            if answer is None:
                failures.append(f"worker {worker.index}: no answer (it is being replaced)")
            elif not answer.get("ok"):
                failures.append(f"worker {worker.index}: {answer.get('error')}")

        async with trio.open_nursery() as nursery:
            for worker in self._workers:
                nursery.start_soon(one, worker)
        return failures

    def _swap_admin(self, admin: AdminServer | None) -> None:
        """Replace the admin endpoint (``[admin] listen`` changed, or was added or removed)."""
        assert self._nursery is not None
        if self._admin is not None:
            self._admin.stop()
            logger.info("admin endpoint on %s closed", self._admin.url)
        self._admin = admin
        if self._admin is not None:
            self._nursery.start_soon(self._admin.serve)
            logger.info("admin endpoint on %s (/healthz, /readyz, /metrics)", self._admin.url)


def _admin_address(config: Config) -> Address | None:
    return config.admin.listen if config.admin else None


def _read_and_validate(path: str) -> tuple[str, Config]:
    """The file's text and its configuration, fully validated (certificates loaded)."""
    from gatewayd.config import load

    config = load(path)  # every error a file can have, reported the usual way
    with open(path, encoding="utf-8") as stream:
        text = stream.read()
    config = loads(text, path)  # exactly the text the workers will get
    Generation.build(config)
    return text, config


def merge_metrics(texts: dict[int, str], supervisor: str = "") -> str:
    """Several Prometheus texts as one: each sample gets ``worker="N"``, families stay whole.

    ``supervisor`` (the supervisor's own process metrics) is merged in last,
    labelled ``worker="supervisor"``: one ``process_resident_memory_bytes``
    family holds every process of the gateway.
    """
    families: dict[str, list[str]] = {}
    order: list[str] = []
    headers: dict[str, list[str]] = {}
    sources: list[tuple[str, str]] = [(str(index), texts[index]) for index in sorted(texts)]
    if supervisor:
        sources.append(("supervisor", supervisor))
    for index, text in sources:
        family = ""
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    if family not in families:
                        families[family] = []
                        headers[family] = []
                        order.append(family)
                    if line not in headers[family]:
                        headers[family].append(line)
                continue
            name, brace, rest = line.partition("{")
            label = f'worker="{index}"'
            if brace:
                sample = f"{name}{{{label},{rest}" if not rest.startswith("}") else f"{name}{{{label}{rest}"
            else:
                metric, _, value = line.partition(" ")
                sample = f"{metric}{{{label}}} {value}"
            families.setdefault(family, [])
            if family not in order:
                order.append(family)
                headers.setdefault(family, [])
            families[family].append(sample)
    lines: list[str] = []
    for family in order:
        lines.extend(headers.get(family, []))
        lines.extend(families[family])
    return "\n".join(lines) + "\n"


def run_supervisor(
    path: str, notifier: Notifier, inherited: dict[str, trio.socket.SocketType]
) -> int:
    """``gatewayd run`` with ``workers`` > 1 (called by the CLI once the file was checked)."""
    try:
        text, config = _read_and_validate(path)
    except ConfigErrors as errors:
        print(f"gatewayd: {errors}", file=sys.stderr)
        return 1
    sockets = {key: socket.socket(fileno=sock.detach()) for key, sock in inherited.items()}
    supervisor = Supervisor(path, config, text, notifier=notifier, inherited=sockets)
    return trio.run(supervisor.run)


if __name__ == "__main__":
    sys.exit(worker_main())
