"""Connection limits for the whole gateway: the total, per client address, handshake rate.

Theory of operation
-------------------
``[gateway] max_connections`` bounds the connections the gateway has open;
``max_connections_per_ip`` bounds those one client address has open at once;
``handshakes_per_ip_per_second`` bounds how fast an address may open new ones,
as a token bucket (the bucket holds :data:`BURST_SECONDS` seconds' worth of
tokens, at least one; each admitted connection takes one; tokens come back at
the configured rate). All are checked before any TLS work: a refused
connection is closed at once, which costs the attacker as much as it costs us
(a 429 after TLS would cost us a full handshake per attempt, the very thing
the limit is for).

"Client address" is the address the connection comes from after the PROXY
protocol (:mod:`gatewayd.proxy_protocol`). An IPv6 client is keyed by its
/64 prefix, the smallest block a site is given (RFC 6177): counting single
IPv6 addresses would give every attacker 2^64 separate allowances.

One table for every worker
~~~~~~~~~~~~~~~~~~~~~~~~~~
With ``workers > 1`` every worker process accepts on the same sockets, so a
count kept inside one process lets each worker admit the whole limit (two
workers: twice the configured number). The counts therefore live in one
:class:`Limits` table in shared memory, which makes every decision on the
gateway's true totals, whichever worker the kernel gives a connection to:

* the supervisor creates the table (:meth:`Limits.create_shared`: a memfd,
  mapped ``MAP_SHARED``) before it starts a worker, and hands each worker the
  descriptor, which maps the same pages (:meth:`Limits.attach`);
* each decision is one read-modify-write of the table under an exclusive
  POSIX record lock on that file (``fcntl.lockf``): a few microseconds,
  held by one process at a time (bench/limits.py measures the cost per
  accept);
* counts are kept per worker (one column each): a worker that dies, even
  killed, loses its lock with its process (the kernel releases it), and the
  supervisor clears its column (:meth:`Limits.reset_worker`) before starting
  its replacement, so the connections it held stop counting at once.

With one process the same table lives in a ``bytearray`` and takes no lock.

The alternatives, and why not: asking the supervisor means a round trip
between processes on every accept and every close, and one process on the
path of them all; kernel steering (``SO_REUSEPORT`` plus a BPF program that
sends each client address to one worker) makes per-address counts exact but
not ``max_connections`` (each worker would hold ``max_connections / N`` and
refuse while another is idle), and it cannot steer PROXY-protocol listeners,
where the client address is known only after the header.

The table
~~~~~~~~~
Open addressing with linear probing over fixed-size entries, so it fits in a
flat buffer: an entry holds a 16-byte key (a keyed BLAKE2b of the address
key, with a per-table random secret, so nobody can aim addresses at one probe
chain), the bucket (tokens, last update) and one connection count per worker.
A header holds the total per worker. Deletion shifts the entries behind back
(no tombstones). An address has an entry while it has connections open, or
while its bucket is not full again (a full bucket and no bucket are the same
thing); entries with neither are dropped on release, or by a sweep when the
table is three quarters full (at most once per :data:`SWEEP_INTERVAL`).

Capacity is fixed when the table is made, from ``max_connections``
(:func:`capacity_for`: room for every open connection's address at most half
full), since the total bounds the addresses with connections. A reload that
raises ``max_connections`` past that grows a one-process table; a shared
table keeps its size until a restart, and a new address that finds it full is
refused (``per_ip_table_full``) rather than admitted uncounted.

The caller passes the time (monotonic seconds, the same clock in every
process) in, so tests need no clock.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import ipaddress
import math
import mmap
import os
import secrets
import struct
from collections.abc import Iterator
from typing import Final, Literal

__all__ = [
    "BURST_SECONDS",
    "Limits",
    "Refusal",
    "capacity_for",
    "client_key",
]

#: The bucket holds this many seconds' worth of handshakes (at least 1).
BURST_SECONDS: Final = 2.0
#: A table that is three quarters full is swept at most this often.
SWEEP_INTERVAL: Final = 1.0

Refusal = Literal["per_ip_connections", "per_ip_handshake_rate", "per_ip_table_full"]

_MAGIC: Final = b"GWLIMIT1"
# magic, workers, capacity, used entries, (pad), hash secret, last sweep
_HEADER: Final = struct.Struct("<8sIIII16sd")
_USED: Final = 1      # entry flags
_BUCKET: Final = 2
_MIN_CAPACITY: Final = 1024


@functools.lru_cache(maxsize=4096)
def client_key(address: str) -> str:
    """What the limits count by: an IPv4 address, or an IPv6 address's /64.

    An IPv4-mapped IPv6 address counts as its IPv4 address; anything that is
    not an IP address (a unix socket peer) is its own key.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def capacity_for(max_connections: int) -> int:
    """Entries for a table serving ``max_connections``: a power of two, at most half used."""
    return max(_MIN_CAPACITY, 1 << max(0, 2 * max_connections - 1).bit_length())


def _entry_struct(workers: int) -> struct.Struct:
    # key, flags, (pad), tokens, updated, one count per worker; 8-byte aligned.
    pad = "4x" if workers % 2 else ""
    return struct.Struct(f"<16sB7xdd{workers}I{pad}")


def _size(workers: int, capacity: int) -> int:
    header = _HEADER.size + 8 * ((4 * workers + 7) // 8)
    return header + capacity * _entry_struct(workers).size


class _NoLock:
    """One process: nothing to exclude."""

    __slots__ = ()

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        pass


class _RecordLock:
    """An exclusive POSIX record lock on a file, released by the kernel if we die."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)


class Limits:
    """The gateway's connection counts and handshake buckets (see the module doc).

    The limits themselves are passed at each call (they come from the
    configuration in force), so a reload changes them without losing counts.

    Args:
        buffer: the table's memory, laid out by :meth:`local` or :meth:`create_shared`.
        worker: this process's column (0 to ``workers - 1``), or None for the
            supervisor, which counts nothing itself.
        lock: held around every access (None: one process, no lock needed).
    """

    def __init__(
        self, buffer: bytearray | mmap.mmap, worker: int | None, lock: _RecordLock | None = None
    ) -> None:
        magic, workers, capacity, _, _, secret, _ = _HEADER.unpack_from(buffer, 0)
        workers, capacity, secret = int(workers), int(capacity), bytes(secret)
        if magic != _MAGIC:
            raise ValueError("not a gatewayd limits table")
        if worker is not None and not 0 <= worker < workers:
            raise ValueError(f"worker {worker} out of range (table for {workers})")
        self._buffer = buffer
        self._lock = lock
        self._locked: _RecordLock | _NoLock = lock if lock is not None else _NoLock()
        self.worker = worker
        self.workers: int = workers
        self.capacity: int = capacity
        self._secret: bytes = secret
        self._entry = _entry_struct(workers)
        self._active = struct.Struct(f"<{workers}I")
        self._entries = _HEADER.size + 8 * ((4 * workers + 7) // 8)
        self._mask = capacity - 1
        self._max_used = capacity * 7 // 8      # an empty slot always ends a probe
        self._sweep_at = capacity * 3 // 4

    # ------------------------------------------------------------------ making one

    @staticmethod
    def _format(
        buffer: bytearray | mmap.mmap, workers: int, capacity: int, secret: bytes | None = None
    ) -> None:
        secret = secret if secret is not None else secrets.token_bytes(16)
        _HEADER.pack_into(buffer, 0, _MAGIC, workers, capacity, 0, 0, secret, -math.inf)

    @classmethod
    def local(cls, max_connections: int, *, _secret: bytes | None = None) -> Limits:
        """A table for one process (no lock)."""
        capacity = capacity_for(max_connections)
        buffer = bytearray(_size(1, capacity))
        cls._format(buffer, 1, capacity, _secret)
        return cls(buffer, 0)

    @classmethod
    def create_shared(cls, workers: int, max_connections: int) -> tuple[Limits, int]:
        """The supervisor's table for ``workers`` workers, and its descriptor for them.

        The descriptor is inheritable only where the caller passes it on.
        """
        capacity = capacity_for(max_connections)
        fd = os.memfd_create("gatewayd-limits", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, _size(workers, capacity))
            buffer = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
        cls._format(buffer, workers, capacity)
        return cls(buffer, None, _RecordLock(fd)), fd

    @classmethod
    def attach(cls, fd: int, worker: int) -> Limits:
        """A worker's view of the supervisor's table (``worker``: its column)."""
        buffer = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        return cls(buffer, worker, _RecordLock(fd))

    @property
    def shared(self) -> bool:
        """Whether other processes use this table too."""
        return self._lock is not None

    def fits(self, max_connections: int) -> bool:
        """Whether this table is big enough for ``max_connections`` (after a reload)."""
        return capacity_for(max_connections) <= self.capacity

    def grown(self, max_connections: int) -> Limits:
        """A one-process table with room for ``max_connections``, holding these counts."""
        if self._lock is not None:
            raise ValueError("a shared table keeps its size")
        bigger = Limits.local(max_connections, _secret=self._secret)  # the same digests
        bigger._set_active(self._get_active())
        for key, flags, tokens, updated, counts in self._live():
            bigger._insert(key, flags, tokens, updated, counts)
        return bigger

    # ------------------------------------------------------------------ the connection total

    def admit_connection(self, max_connections: int) -> bool:
        """Count one more open connection unless the gateway holds ``max_connections``.

        Returns:
            True when counted (:meth:`release_connection` must follow).
        """
        assert self.worker is not None
        with self._locked:
            active = self._get_active()
            if sum(active) >= max_connections:
                return False
            active[self.worker] += 1
            self._set_active(active)
            return True

    def release_connection(self) -> None:
        """A connection counted by :meth:`admit_connection` has ended."""
        assert self.worker is not None
        with self._locked:
            active = self._get_active()
            active[self.worker] = max(0, active[self.worker] - 1)
            self._set_active(active)

    @property
    def open_connections(self) -> int:
        """Connections open in the whole gateway."""
        with self._locked:
            return sum(self._get_active())

    # ------------------------------------------------------------------ per address

    def admit(
        self, key: str, now: float, *, max_connections: int, handshakes_per_second: float
    ) -> Refusal | None:
        """Count a new connection from ``key`` if the limits allow it.

        Args:
            key: from :func:`client_key`.
            now: monotonic seconds.
            max_connections: ``max_connections_per_ip`` (0 = no limit).
            handshakes_per_second: ``handshakes_per_ip_per_second`` (0 = off).

        Returns:
            None when admitted (then :meth:`release` must be called once when
            the connection ends), else which limit refused it.
        """
        assert self.worker is not None
        digest = self._digest(key)
        rate = handshakes_per_second
        with self._locked:
            slot, found = self._find(digest)
            if found:
                _, flags, tokens, updated, *counts = self._entry.unpack_from(self._buffer, self._at(slot))
            else:
                flags, tokens, updated, counts = _USED, 0.0, 0.0, [0] * self.workers
            if max_connections and sum(counts) >= max_connections:
                return "per_ip_connections"
            if rate > 0:
                burst = max(1.0, rate * BURST_SECONDS)
                # No bucket yet is a full one.
                refilled = tokens + max(0.0, now - updated) * rate
                tokens = min(burst, refilled) if flags & _BUCKET else burst
                if tokens < 1.0:
                    return "per_ip_handshake_rate"
                tokens, updated, flags = tokens - 1.0, now, flags | _BUCKET
            else:
                flags &= ~_BUCKET  # the limit is off (or was turned off by a reload)
            counts[self.worker] += 1
            if found:
                self._entry.pack_into(
                    self._buffer, self._at(slot), digest, flags, tokens, updated, *counts
                )
                return None
            if self._used() >= self._sweep_at:
                self._sweep(now, rate)
            if self._used() >= self._max_used:
                # Refused rather than admitted uncounted, while a limit is on.
                return "per_ip_table_full" if max_connections or rate > 0 else None
            self._insert(digest, flags, tokens, updated, counts)
            return None

    def release(self, key: str) -> None:
        """A connection admitted by :meth:`admit` has ended."""
        assert self.worker is not None
        digest = self._digest(key)
        with self._locked:
            slot, found = self._find(digest)
            if not found:
                return  # its worker's column was reset meanwhile
            _, flags, tokens, updated, *counts = self._entry.unpack_from(self._buffer, self._at(slot))
            counts[self.worker] = max(0, counts[self.worker] - 1)
            if not any(counts) and not flags & _BUCKET:
                self._delete(slot)
            else:
                self._entry.pack_into(
                    self._buffer, self._at(slot), digest, flags, tokens, updated, *counts
                )

    def open_count(self, key: str) -> int:
        """Connections ``key`` has open in the whole gateway."""
        digest = self._digest(key)
        with self._locked:
            slot, found = self._find(digest)
            if not found:
                return 0
            _, _, _, _, *counts = self._entry.unpack_from(self._buffer, self._at(slot))
            return sum(counts)

    @property
    def tracked(self) -> int:
        """Addresses held now (with connections, or a bucket not yet full)."""
        with self._locked:
            return self._used()

    def reset_worker(self, worker: int) -> None:
        """Forget everything ``worker`` held (it is gone): its total and its per-address counts."""
        with self._locked:
            active = self._get_active()
            active[worker] = 0
            self._set_active(active)
            live = []
            for key, flags, tokens, updated, counts in self._live():
                counts[worker] = 0
                if any(counts) or flags & _BUCKET:
                    live.append((key, flags, tokens, updated, counts))
            self._rebuild(live)

    # ------------------------------------------------------------------ the table itself

    def _digest(self, key: str) -> bytes:
        return hashlib.blake2b(key.encode(), digest_size=16, key=self._secret).digest()

    def _at(self, slot: int) -> int:
        return self._entries + slot * self._entry.size

    def _home(self, digest: bytes) -> int:
        return int.from_bytes(digest[:8], "little") & self._mask

    def _used(self) -> int:
        return int(struct.unpack_from("<I", self._buffer, 16)[0])

    def _set_used(self, used: int) -> None:
        struct.pack_into("<I", self._buffer, 16, used)

    def _get_active(self) -> list[int]:
        return list(self._active.unpack_from(self._buffer, _HEADER.size))

    def _set_active(self, active: list[int]) -> None:
        self._active.pack_into(self._buffer, _HEADER.size, *active)

    def _find(self, digest: bytes) -> tuple[int, bool]:
        """``digest``'s slot (True), or the empty slot that ends its probe (False)."""
        buffer = self._buffer
        slot = self._home(digest)
        while True:
            at = self._at(slot)
            if not buffer[at + 16] & _USED:
                return slot, False
            if buffer[at : at + 16] == digest:
                return slot, True
            slot = (slot + 1) & self._mask

    def _insert(
        self, digest: bytes, flags: int, tokens: float, updated: float, counts: list[int]
    ) -> None:
        slot, found = self._find(digest)
        assert not found
        self._entry.pack_into(
            self._buffer, self._at(slot), digest, flags | _USED, tokens, updated, *counts
        )
        self._set_used(self._used() + 1)

    def _delete(self, slot: int) -> None:
        # Backward-shift deletion (linear probing): move each later entry of
        # the run into the hole unless its home lies cyclically in (hole, it].
        buffer, size = self._buffer, self._entry.size
        hole = slot
        probe = slot
        while True:
            probe = (probe + 1) & self._mask
            at = self._at(probe)
            if not buffer[at + 16] & _USED:
                break
            home = self._home(bytes(buffer[at : at + 16]))
            wrapped = probe < hole
            if (hole < home <= probe) if not wrapped else (hole < home or home <= probe):
                continue
            buffer[self._at(hole) : self._at(hole) + size] = buffer[at : at + size]
            hole = probe
        buffer[self._at(hole) : self._at(hole) + size] = bytes(size)
        self._set_used(self._used() - 1)

    def _live(self) -> Iterator[tuple[bytes, int, float, float, list[int]]]:
        for slot in range(self.capacity):
            at = self._at(slot)
            if self._buffer[at + 16] & _USED:
                digest, flags, tokens, updated, *counts = self._entry.unpack_from(self._buffer, at)
                yield digest, flags, tokens, updated, counts

    def _rebuild(self, live: list[tuple[bytes, int, float, float, list[int]]]) -> None:
        start = self._entries
        self._buffer[start : start + self.capacity * self._entry.size] = bytes(
            self.capacity * self._entry.size
        )
        self._set_used(0)
        for entry in live:
            self._insert(*entry)

    def _sweep(self, now: float, rate: float) -> None:
        """Drop entries with no connection whose bucket is full again (at most once a second)."""
        last = struct.unpack_from("<d", self._buffer, _HEADER.size - 8)[0]
        if now - last < SWEEP_INTERVAL:
            return
        struct.pack_into("<d", self._buffer, _HEADER.size - 8, now)
        burst = max(1.0, rate * BURST_SECONDS)
        live = [
            entry
            for entry in self._live()
            if any(entry[4])
            or (rate > 0 and entry[1] & _BUCKET and entry[2] + (now - entry[3]) * rate < burst)
        ]
        self._rebuild(live)
