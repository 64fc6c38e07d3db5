"""Listening sockets: bind them, and tell when two listen addresses are one socket.

Used by the single process (:class:`gatewayd.server.Gateway`) and by the
supervisor of workers (:class:`gatewayd.workers.Supervisor`), which binds
once and hands the sockets to its workers.
"""

from __future__ import annotations

import socket

import trio

from gatewayd.config import Address, ListenerConfig

__all__ = ["address_key", "bind_address", "bind_listener"]


def address_key(address: Address) -> str:
    """What makes two listen addresses the same socket: the resolved IP and port.

    ``localhost:8443`` and ``127.0.0.1:8443`` are one socket, so a reload that
    rewrites one as the other keeps it instead of binding a second one.
    """
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return str(address)
    host = str(infos[0][4][0])
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"


async def bind_listener(listener: ListenerConfig) -> trio.socket.SocketType:
    """A listening socket for ``listener`` (IPv6 sockets are v6-only, like nginx)."""
    return await bind_address(listener.address)


async def bind_address(address: Address) -> trio.socket.SocketType:
    """A listening socket on ``address`` (raises OSError naming it)."""
    try:
        infos = await trio.socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve listener address {address}: {exc.strerror}") from None
    family, type_, proto, _, sockaddr = infos[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind(sockaddr)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    return sock
