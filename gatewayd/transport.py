"""The transport interface of the splice's fast paths: receive and send in a loop.

A pump (:mod:`gatewayd.splice`) is a loop of ``receive`` then ``send_all``.
Any trio stream can do that, but the fast ends can do it cheaper when the
caller promises to loop (the ``receive`` is the loop's checkpoint, so the
``send_all`` need not yield when nothing had to wait) and when the bound on
a stalled peer is armed only while a send waits, not per chunk (a timer per
chunk cost ~40% of a small message, docs/performance.md). :class:`LoopIO` is
that promise: two callables, looked up once per pump, so the loop itself
pays no attribute chain and no extra await per chunk.

Where a stream's :class:`LoopIO` comes from (:func:`loop_io`):

* a stream that implements :class:`LoopStream` gives its own
  (:class:`gatewayd.tls.TLSStream`: ``receive_some`` and ``send_all_in_loop``);
* a plain TCP stream, trio's :class:`trio.SocketStream`, is driven through
  :class:`gatewayd.sockio.SocketIO` (see :func:`gatewayd.sockio.socket_io`);
* any other stream (in-memory test streams, a PROXY-protocol
  :class:`~gatewayd.connection.ReplayStream`, ``trio.SSLStream`` to a ``wss://``
  backend) gets ``receive_some`` and ``send_all`` under ``trio.fail_after(stall)``.

The contract of both callables: ``receive(max_bytes)`` returns between 1 and
``max_bytes`` bytes, or ``b""`` at the end, and is always a checkpoint;
``send_all(data, stall=seconds)`` sends all of ``data``, raises
:class:`trio.TooSlowError` when the peer takes nothing for ``stall`` seconds
(the stream is unusable afterwards), and may return without yielding. Errors
are the stream's own (:class:`trio.BrokenResourceError`,
:class:`trio.ClosedResourceError`).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import trio

from gatewayd.sockio import socket_io

__all__ = ["LoopIO", "LoopStream", "ReceiveInLoop", "SendInLoop", "loop_io"]


class ReceiveInLoop(Protocol):
    """``receive(max_bytes)``: 1 to ``max_bytes`` bytes, ``b""`` at the end; a checkpoint."""

    def __call__(self, max_bytes: int, /) -> Awaitable[bytes | bytearray]: ...


class SendInLoop(Protocol):
    """``send_all(data, stall=s)``: all of ``data``; TooSlowError after ``s`` seconds stalled."""

    def __call__(self, data: bytes | bytearray, /, *, stall: float) -> Awaitable[object]: ...


@dataclass(frozen=True, slots=True)
class LoopIO:
    """How a pump receives from one end and sends to it (see the module doc)."""

    receive: ReceiveInLoop
    send_all: SendInLoop


class LoopStream(abc.ABC):
    """A stream with its own fast :class:`LoopIO` (mixed into the stream's class)."""

    __slots__ = ()

    @abc.abstractmethod
    def loop_io(self) -> LoopIO:
        """This stream's receive and send for a receive-then-send loop."""


async def _send_all_bounded(stream: trio.abc.SendStream, data: bytes | bytearray, *, stall: float) -> None:
    """``stream.send_all`` that raises TooSlowError after ``stall`` seconds (any stream)."""
    with trio.fail_after(stall):
        await stream.send_all(data)


def loop_io(stream: trio.abc.Stream) -> LoopIO:
    """The :class:`LoopIO` for ``stream``: its own, SocketIO's for TCP, or the generic one."""
    if isinstance(stream, LoopStream):
        return stream.loop_io()
    io = socket_io(stream)
    if io is not None:
        return LoopIO(io.receive, io.send_all)
    return LoopIO(stream.receive_some, partial(_send_all_bounded, stream))


#: After a final answer we half-close and read (and drop) what the peer still
#: sends, so a TCP reset caused by unread data does not destroy the answer
#: (nginx's "lingering close"), for at most this long and this many bytes.
LINGER_SECONDS = 1.0
LINGER_BYTES = 65536


async def send_and_linger(stream: trio.abc.Stream, data: bytes, *, receive_size: int = 65536) -> None:
    """Send ``data``, half-close when the stream can, then drain the peer briefly.

    The drain ends at the peer's EOF, after LINGER_BYTES or after
    LINGER_SECONDS, whichever comes first. The stream's own errors propagate;
    closing the stream is the caller's business.
    """
    await stream.send_all(data)
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()
    with trio.move_on_after(LINGER_SECONDS):
        drained = 0
        while drained < LINGER_BYTES:
            chunk = await stream.receive_some(receive_size)
            if not chunk:
                break
            drained += len(chunk)
