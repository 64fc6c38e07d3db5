"""Giving memory back to the system after bursts (stalled peers, bulk traffic).

The relay's buffers (a 64 KiB chunk per direction in flight, a TLS record of
ciphertext) are below glibc malloc's mmap threshold, so they come from its
heap; once freed they stay mapped in the process, fragmented between live
allocations, and glibc only trims the top of the heap. A burst of clients
that stop reading then raised the RSS for good (measured: ~290 KiB per
stalled connection, none of it returned after they left; nginx gives its
memory back).

``malloc_trim(0)`` gives back every free page of the heap (glibc >= 2.8
releases free chunks inside it too, not only its top). It walks the heap, so
it is never called per connection: a tunnel that ends after moving at least
:data:`TRIM_AFTER_BYTES` marks the process (:func:`note_release`, O(1)), and
:func:`trim_while_marked` trims at most once per :data:`TRIM_INTERVAL` while
marked, after a full garbage collection (ended connections can wait in
reference cycles until one). Elsewhere than glibc (musl, macOS) the trim is
a no-op; the collection still runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Callable

import trio

logger = logging.getLogger("gatewayd.memory")

#: A tunnel that moved at least this much has had a full relay buffer.
TRIM_AFTER_BYTES = 65536
#: Seconds between two trims at most (a trim and the full garbage collection
#: before it walk the whole heap: tens of ms with thousands of connections).
TRIM_INTERVAL = 5.0


def _find_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None   # not glibc
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _find_malloc_trim()
_marked = False


def note_release(bytes_moved: int) -> None:
    """A tunnel ended having moved ``bytes_moved``: trim soon if it had big buffers."""
    global _marked
    if bytes_moved >= TRIM_AFTER_BYTES:
        _marked = True


def release_free_memory() -> bool:
    """Collect garbage, then give the heap's free pages back to the system; True if any was.

    Ended connections can sit in reference cycles (a trio task's frames, an
    exception's traceback) with their OpenSSL objects until a full
    collection: measured, without it half of a burst's memory stayed, and
    more with every burst.
    """
    global _marked
    _marked = False
    gc.collect()
    if _malloc_trim is None:
        return False
    return bool(_malloc_trim(0))


async def trim_while_marked() -> None:
    """Run for ever: after tunnels with big buffers ended, trim (once per interval at most)."""
    while True:
        await trio.sleep(TRIM_INTERVAL)
        if _marked:
            released = release_free_memory()
            logger.debug("malloc_trim: %s", "memory released" if released else "nothing to release")
