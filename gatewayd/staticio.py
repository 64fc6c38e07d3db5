"""Static files, the I/O half (SPEC section 7): find, open and stream a file off the event loop.

Theory of operation
-------------------
:func:`open_static` turns a request on a ``static`` route into a
:class:`StaticAnswer`: the status, the headers and what follows them. Every
file-system call (``realpath``, ``open``, ``fstat``, each ``pread``) runs in a
worker thread (``trio.to_thread``) under a limiter of its own, so a slow disk,
an NFS mount that hangs or a 2 GiB file delays only the requests that read
it, never the event loop nor another connection.

Safety, in order (the pure rules are :mod:`gatewayd.static`'s):

1. the request path maps to file names, or 404 (dotfiles, ``..``, encoded
   separators: :func:`gatewayd.static.map_segments`);
2. the joined path's real path (symlinks resolved) must be DIR's real path
   or below it, and no part of it below DIR may start with ``.`` (a symlink
   named ``public`` pointing at ``.git`` is refused too);
3. the file is opened ``O_NONBLOCK | O_NOFOLLOW`` (a FIFO cannot hang the
   open), and what was opened is checked again through ``/proc/self/fd``:
   a symlink swapped in between the check and the open is caught. Only
   regular files are served; a directory is served by its ``index`` file,
   never listed.

Memory per response is one chunk (:data:`gatewayd.static.CHUNK`): a chunk is
read only after the previous one was sent, so a slow reader slows the reads.
The descriptor belongs to a :class:`_OpenFile`, closed by whichever of the
response and an abandoned read (a cancelled request) finishes last, so a
descriptor number is never reused under a read still running.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from gatewayd.config import RouteConfig
from gatewayd.handshake import REASONS, RequestHead
from gatewayd.static import (
    CHUNK,
    STATIC_METHODS,
    ByteRange,
    FileInfo,
    directory_location,
    evaluate,
    map_segments,
    static_rest,
)

logger = logging.getLogger("gatewayd.static")

#: Worker threads reading files at once (each holds at most one chunk).
FILE_THREADS = 16

_limiter: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("static_limiter")


def _file_limiter() -> trio.CapacityLimiter:
    try:
        return _limiter.get()
    except LookupError:
        limiter = trio.CapacityLimiter(FILE_THREADS)
        _limiter.set(limiter)
        return limiter


class _OpenFile:
    """A file descriptor shared by the response and the worker thread reading it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False

    def pread(self, size: int, offset: int) -> bytes:
        """Read in a worker thread (the caller may abandon it: see :meth:`close`)."""
        with self._lock:
            if self._closed:
                return b""
            self._users += 1
        try:
            return os.pread(self._fd, size, offset)
        finally:
            with self._lock:
                self._users -= 1
                last = self._closed and self._users == 0
            if last:
                os.close(self._fd)

    def close(self) -> None:
        """Close now, or when the read still running in a worker thread ends."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            now = self._users == 0
        if now:
            os.close(self._fd)


@dataclass
class StaticAnswer:
    """The answer to one request on a static route.

    Attributes:
        status: the HTTP status.
        headers: every header but Connection, Server and Date (the exchange's:
            it also closes the connection after a request whose body was not read).
        body: a small body of our own (error answers), or b"".
        range: the bytes of the file to send after ``body`` (None: none).
        detail: why, for the log (error answers).
    """

    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    range: ByteRange | None = None
    detail: str = ""
    _file: _OpenFile | None = field(default=None, repr=False)

    @property
    def length(self) -> int:
        """Bytes that follow the head."""
        return len(self.body) + (self.range.length if self.range is not None else 0)

    async def body_chunks(self) -> AsyncIterator[bytes]:
        """The body in chunks of at most CHUNK bytes, each file read in a worker thread.

        Raises:
            OSError: the file could not be read (the head was sent already:
                the caller closes the connection); a file that shrank while
                being sent ends early the same way (``EOFError``).
        """
        if self.body:
            yield self.body
        if self.range is None or self._file is None:
            return
        offset, end = self.range.first, self.range.last + 1
        limiter = _file_limiter()
        while offset < end:
            size = min(CHUNK, end - offset)
            chunk = await trio.to_thread.run_sync(
                self._file.pread, size, offset, limiter=limiter, abandon_on_cancel=True
            )
            if not chunk:
                raise EOFError(f"the file shrank while being sent ({offset} of {end} bytes)")
            offset += len(chunk)
            yield chunk

    def close(self) -> None:
        """Release the file (safe to call more than once)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def _text(
    status: int, text: str, detail: str, headers: Sequence[tuple[str, str]] = ()
) -> StaticAnswer:
    """An answer of our own (404, 403, 301 ...) with a one-line text body.

    Not a :class:`~gatewayd.errors.HandshakeRejected`: these answers keep the
    connection alive, like nginx's for a missing file.
    """
    body = (text + "\n").encode("utf-8")
    return StaticAnswer(
        status,
        [
            *headers,
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
        ],
        body,
        detail=detail,
    )


# --------------------------------------------------------------------------- lookup


@dataclass(frozen=True)
class _Found:
    file: _OpenFile
    info: FileInfo
    name: str


@dataclass(frozen=True)
class _Missing:
    status: int   # 404 or 403
    detail: str


@dataclass(frozen=True)
class _Directory:
    """A directory asked for without its trailing slash (301)."""


def _inside(real: str, root: str) -> bool:
    if real == root:
        return True
    prefix = root if root.endswith(os.sep) else root + os.sep
    if not real.startswith(prefix):
        return False
    # No dot-name below DIR, wherever the symlinks led.
    return not any(part.startswith(".") for part in real[len(prefix) :].split(os.sep))


def _lookup(root: Path, names: tuple[str, ...], index: str, slash_redirect: bool) -> _Found | _Missing | _Directory:
    """Find and open the file ``names`` designate under ``root`` (in a worker thread)."""
    root_real = os.path.realpath(root)
    wants_directory = bool(names) and names[-1] == ""
    parts = [name for name in names if name]
    real = os.path.realpath(os.path.join(root_real, *parts))
    if not _inside(real, root_real):
        return _Missing(404, f"{'/'.join(parts)!r} resolves outside the static folder")
    try:
        st = os.stat(real)
    except (FileNotFoundError, NotADirectoryError):
        return _Missing(404, f"no file {'/'.join(parts)!r}")
    except PermissionError:
        return _Missing(403, f"{'/'.join(parts)!r}: permission denied")
    name = parts[-1] if parts else ""
    if stat.S_ISDIR(st.st_mode):
        if slash_redirect and not wants_directory:
            return _Directory()
        real = os.path.realpath(os.path.join(real, index))
        name = index
        if not _inside(real, root_real):
            return _Missing(404, f"the index of {'/'.join(parts)!r} resolves outside the folder")
    elif wants_directory:
        return _Missing(404, f"{'/'.join(parts)!r} is not a directory")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return _Missing(404, f"no file {'/'.join(parts)!r} (or no index {index!r})")
    except PermissionError:
        return _Missing(403, f"{'/'.join(parts)!r}: permission denied")
    except OSError as exc:  # ELOOP: the last part became a symlink after the check
        return _Missing(404, f"{'/'.join(parts)!r}: {exc.strerror}")
    opened = _OpenFile(fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            opened.close()
            return _Missing(404, f"{'/'.join(parts) or '/'!r} is not a regular file")
        try:
            actual = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            actual = real  # no /proc: the realpath check above stands
        if not _inside(actual, root_real):
            opened.close()
            return _Missing(404, f"{'/'.join(parts)!r} moved outside the static folder")
    except BaseException:
        opened.close()
        raise
    return _Found(opened, FileInfo(st.st_size, st.st_mtime_ns, st.st_ino), name)


class _Abandonable:
    """A :func:`_lookup` in a worker thread that the request may abandon (cancelled).

    A hung mount must not hold a shutdown or a connection's deadline, so the
    lookup is abandoned on cancellation; a file it opens afterwards is closed
    by whichever side comes last, the thread or :meth:`abandon`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._result: _Found | _Missing | _Directory | None = None

    def run(
        self, root: Path, names: tuple[str, ...], index: str, slash_redirect: bool
    ) -> _Found | _Missing | _Directory:
        result = _lookup(root, names, index, slash_redirect)
        with self._lock:
            self._result = result
            abandoned = self._abandoned
        if abandoned and isinstance(result, _Found):
            result.file.close()
        return result

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            result = self._result
        if isinstance(result, _Found):
            result.file.close()


async def open_static(request: RequestHead, route: RouteConfig) -> StaticAnswer:
    """The answer to ``request`` on the static ``route`` (SPEC 7); the caller sends it.

    The caller must :meth:`StaticAnswer.close` it when done (the file is open
    for 200 and 206 answers to GET). Never raises for a client's request: a
    file that cannot be read is a 404 (403 when permission is denied, 500
    for an I/O error, logged).
    """
    # The dispatch (gatewayd.http.kind_of) applied static.check_request: this
    # is a GET or a HEAD, and not a WebSocket upgrade.
    assert route.static is not None and request.method in STATIC_METHODS
    names = map_segments(static_rest(route, request.path))
    if names is None:
        answer = _text(404, "Not Found", f"path {request.path!r} maps to no file name")
        return answer
    slash_redirect = route.path is None and not request.path.endswith("/")
    lookup = _Abandonable()
    try:
        found = await trio.to_thread.run_sync(
            lookup.run,
            route.static,
            names,
            route.index,
            slash_redirect,
            limiter=_file_limiter(),
            abandon_on_cancel=True,
        )
    except trio.Cancelled:
        lookup.abandon()
        raise
    except OSError as exc:
        logger.warning("static %s: cannot open %s: %s", route.key_path, request.path, exc)
        found = _Missing(500, str(exc))
    if isinstance(found, _Directory):
        location = directory_location(request.path, request.query)
        answer = _text(301, "Moved Permanently", "directory without its slash", [("Location", location)])
    elif isinstance(found, _Missing):
        text = REASONS.get(found.status, "Not Found")
        answer = _text(found.status, text, found.detail)
    else:
        decision = evaluate(
            request.method, request.headers, found.info, found.name, cache_control=route.cache_control
        )
        headers = list(decision.headers)
        if decision.status in (412, 416):
            found.file.close()
            body = (REASONS[decision.status] + "\n").encode("utf-8")
            headers += [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
            ]
            answer = StaticAnswer(decision.status, headers, body)
        elif decision.range is None:
            found.file.close()  # HEAD, 304, or an empty file: no bytes to read
            answer = StaticAnswer(decision.status, headers)
        else:
            answer = StaticAnswer(decision.status, headers, range=decision.range, _file=found.file)
    return answer


class Exchange(Protocol):
    """What :func:`serve` needs from one request/response on a client connection.

    The request loop's :class:`gatewayd.exchange.Exchange` (h11, server
    role) provides it: it adds Connection, Date and (``own``: an answer the
    gateway makes itself) Server, frames the body from Content-Length (none
    for HEAD and 304), and counts the request for the access line and the
    metrics.
    """

    @property
    def request(self) -> RequestHead: ...

    async def send_head(
        self, status: int, headers: Sequence[tuple[str, str]], *, own: bool = False
    ) -> None: ...

    async def send_data(self, data: bytes) -> None: ...

    async def end(self) -> None: ...


async def serve(exchange: Exchange, route: RouteConfig) -> None:
    """Answer the exchange's request on the static ``route``: head, then the body in chunks.

    Each chunk is read (in a worker thread) only after the previous one was
    sent, so a slow reader slows the reads and memory stays at one chunk.

    Raises:
        trio.BrokenResourceError, trio.ClosedResourceError: the client went away.
        OSError, EOFError: the file failed after the head was sent; the
            connection must be closed (the body is short of Content-Length).
    """
    answer = await open_static(exchange.request, route)
    try:
        if answer.status >= 400:
            logger.debug("static %s %s: %d (%s)", route.key_path, exchange.request.path, answer.status, answer.detail)
        await exchange.send_head(answer.status, answer.headers, own=True)
        if exchange.request.method != "HEAD":  # HEAD: the same head, never a body
            async for chunk in answer.body_chunks():
                await exchange.send_data(chunk)
        await exchange.end()
    finally:
        answer.close()
