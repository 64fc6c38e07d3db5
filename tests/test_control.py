"""gatewayd.control: the signal/reload/watchdog loop shared by one process and the supervisor.

Signals are fed through a memory channel; systemd's notifications go to a
real AF_UNIX datagram socket, read back in order. Each case is a sequence of
signals and what the service and systemd must see.
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from gatewayd.control import control_loop
from gatewayd.notify import Notifier

BOUND = 10.0
HUP, TERM, INT = signal.SIGHUP, signal.SIGTERM, signal.SIGINT


class Service:
    """A Controlled that records what the loop asked of it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.reloads = 0
        self.reload_gate: trio.Event | None = None  # set: reloads wait for it

    def status(self) -> str:
        return f"generation {self.reloads + 1}"

    async def reload(self) -> bool:
        self.calls.append("reload")
        if self.reload_gate is not None:
            await self.reload_gate.wait()
        self.reloads += 1
        return True

    async def shutdown(self, signal_name: str) -> None:
        self.calls.append(f"shutdown {signal_name}")
        await trio.lowlevel.checkpoint()

    async def abort(self, signal_name: str) -> None:
        self.calls.append(f"abort {signal_name}")
        await trio.lowlevel.checkpoint()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "notify.sock"))
    receiver.setblocking(False)
    yield receiver
    receiver.close()


def received(receiver: socket.socket) -> list[str]:
    """The first line of every datagram received so far (MONOTONIC_USEC varies)."""
    lines = []
    while True:
        try:
            lines.append(receiver.recv(4096).decode())
        except BlockingIOError:
            return [line.split("\n")[0] if line.startswith("RELOADING") else line for line in lines]


@asynccontextmanager
async def looping(
    tmp_path: Path,
    service: Service,
    *,
    config_path: str | None = "/etc/gatewayd/gatewayd.toml",
    environ: dict[str, str] | None = None,
) -> AsyncIterator[Callable[[int], Awaitable[None]]]:
    """Run the loop; yield a function that delivers one signal and lets the loop settle."""
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), **(environ or {})})
    send, receive = trio.open_memory_channel[int](10)

    async def deliver(signum: int) -> None:
        await send.send(signum)
        await trio.testing.wait_all_tasks_blocked()

    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: control_loop(
                    service,
                    notifier,
                    receive,
                    config_path=config_path,
                    logger=logging.getLogger("gatewayd.test"),
                    status_interval=3600,
                )
            )
            yield deliver
            nursery.cancel_scope.cancel()
    notifier.close()


async def run_loop(
    tmp_path: Path,
    signals: list[int],
    service: Service,
    *,
    config_path: str | None = "/etc/gatewayd/gatewayd.toml",
    environ: dict[str, str] | None = None,
    then: float = 0.0,
) -> None:
    """Run the loop, deliver ``signals`` one at a time, let it settle, stop it."""
    async with looping(tmp_path, service, config_path=config_path, environ=environ) as deliver:
        for signum in signals:
            await deliver(signum)
        if then:
            await trio.sleep(then)


@pytest.mark.parametrize(
    ("signals", "calls", "notifications"),
    [
        ([HUP], ["reload"], ["RELOADING=1", "READY=1\nSTATUS=generation 2"]),
        ([HUP, HUP], ["reload", "reload"], ["RELOADING=1", "READY=1\nSTATUS=generation 2"] + ["RELOADING=1", "READY=1\nSTATUS=generation 3"]),
        ([TERM], ["shutdown SIGTERM"], ["STOPPING=1\nSTATUS=draining connections"]),
        ([INT, TERM], ["shutdown SIGINT", "abort SIGTERM"], ["STOPPING=1\nSTATUS=draining connections"]),
        ([TERM, TERM, TERM], ["shutdown SIGTERM", "abort SIGTERM", "abort SIGTERM"], ["STOPPING=1\nSTATUS=draining connections"]),
        ([TERM, HUP], ["shutdown SIGTERM"], ["STOPPING=1\nSTATUS=draining connections"]),
    ],
    ids=["reload", "two-reloads", "drain", "second-signal-aborts", "every-later-signal-aborts", "no-reload-after-stop"],
)
async def test_signals(
    tmp_path: Path, notify_socket: socket.socket, signals: list[int], calls: list[str], notifications: list[str]
) -> None:
    service = Service()
    await run_loop(tmp_path, signals, service)
    assert service.calls == calls
    assert received(notify_socket) == notifications


async def test_sighups_during_a_reload_make_exactly_one_more(tmp_path: Path, notify_socket: socket.socket) -> None:
    service = Service()
    service.reload_gate = trio.Event()
    async with looping(tmp_path, service, config_path="g.toml") as deliver:
        await deliver(HUP)
        assert service.calls == ["reload"]  # in progress, waiting at the gate
        for _ in range(3):
            await deliver(HUP)
        service.reload_gate.set()
        await trio.testing.wait_all_tasks_blocked()
    assert service.calls == ["reload", "reload"]
    assert received(notify_socket) == [
        "RELOADING=1", "READY=1\nSTATUS=generation 2", "RELOADING=1", "READY=1\nSTATUS=generation 3",
    ]


async def test_a_shutdown_during_a_reload_sends_no_ready_after_stopping(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    service = Service()
    service.reload_gate = trio.Event()
    async with looping(tmp_path, service, config_path="g.toml") as deliver:
        await deliver(HUP)
        await deliver(TERM)
        service.reload_gate.set()
        await trio.testing.wait_all_tasks_blocked()
    assert service.calls == ["reload", "shutdown SIGTERM"]
    assert received(notify_socket) == ["RELOADING=1", "STOPPING=1\nSTATUS=draining connections"]


async def test_sighup_without_a_file_warns_and_notifies_nothing(
    tmp_path: Path, notify_socket: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    service = Service()
    with caplog.at_level(logging.WARNING, logger="gatewayd.test"):
        await run_loop(tmp_path, [HUP], service, config_path=None)
    assert service.calls == []
    assert received(notify_socket) == []
    assert [r.getMessage() for r in caplog.records if r.name == "gatewayd.test"] == [
        "SIGHUP: nothing to reload (no configuration file)"
    ]


async def test_watchdog_pings_from_the_loop(tmp_path: Path, notify_socket: socket.socket) -> None:
    import os

    service = Service()
    # WATCHDOG_USEC=100000: a ping every 50 ms (half the period). Run it for
    # 0.3 s only: an unread AF_UNIX datagram queue holds ~10 messages, after
    # which the notifier's send would block.
    await run_loop(
        tmp_path, [], service, environ={"WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())}, then=0.3
    )
    pings = received(notify_socket)
    assert set(pings) == {"WATCHDOG=1"}
    assert len(pings) >= 2
