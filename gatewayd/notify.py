"""systemd integration without native dependencies: sd_notify and socket activation.

sd_notify (``man sd_notify``): datagrams of ``KEY=VALUE`` lines sent to the
AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a leading "@" means the Linux
abstract namespace). Without ``$NOTIFY_SOCKET`` every call is a no-op, so the
same code runs under systemd and in a terminal. Like caddy's
``notify/notify_linux.go``, failures to notify are logged, never fatal.

Socket activation (``man sd_listen_fds``): when ``$LISTEN_PID`` is our pid,
file descriptors 3 .. 3+``$LISTEN_FDS``-1 are listening sockets handed to us,
optionally named by ``$LISTEN_FDNAMES``. The variables are removed from the
environment once read, so child processes do not mistake them for theirs.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import MutableMapping
from dataclasses import dataclass

logger = logging.getLogger("gatewayd.notify")

SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET`` (no-op without one)."""

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if path.startswith("@"):
            self.address = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self.address = path
        self._sock: socket.socket | None = None
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            # Ping at half the period, as sd_watchdog_enabled(3) recommends.
            self.watchdog_interval = int(usec) / 1e6 / 2

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> None:
        """Send one datagram of ``KEY=VALUE`` lines."""
        if self._sock is None or self.address is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            logger.warning("sd_notify to %r failed: %s", self.address, exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd >= 253 tell this reload from an older one.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=draining connections")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


@dataclass
class InheritedSocket:
    """A listening socket passed by systemd."""

    sock: socket.socket
    name: str
    address: tuple[str, int] | None   # None for non-IP sockets


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[InheritedSocket]:
    """The sockets passed by socket activation (empty when there are none).

    Removes LISTEN_PID / LISTEN_FDS / LISTEN_FDNAMES from the environment.
    """
    env = os.environ if environ is None else environ
    pid = env.pop("LISTEN_PID", "")
    count = env.pop("LISTEN_FDS", "")
    names = env.pop("LISTEN_FDNAMES", "")
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    name_list = names.split(":") if names else []
    result: list[InheritedSocket] = []
    for index in range(int(count)):
        fd = SD_LISTEN_FDS_START + index
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            logger.warning("inherited file descriptor %d is not a socket: %s", fd, exc)
            continue
        os.set_inheritable(fd, False)
        name = name_list[index] if index < len(name_list) else f"fd{fd}"
        address: tuple[str, int] | None = None
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            bound = sock.getsockname()
            address = (str(bound[0]), int(bound[1]))
        result.append(InheritedSocket(sock, name, address))
    return result
