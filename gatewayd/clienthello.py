"""The ALPN protocols a TLS ClientHello offers, read from the records before OpenSSL sees them.

Pure: no I/O, no OpenSSL. OpenSSL calls the servername callback (where the
certificate's context is chosen) before it calls the ALPN callback, and
pyOpenSSL exposes no ClientHello callback, yet TLS-ALPN-01 (RFC 8737 section
3) must choose the *certificate* by the ALPN offer: a ClientHello for a name
that offers ``acme-tls/1`` gets the challenge certificate. So the TLS stream
hands the records it feeds OpenSSL to a :class:`ClientHelloReader` until the
ClientHello is complete, and the servername callback reads the offer from it.

Wire format (RFC 8446 sections 4.1.2 and 5.1, RFC 7301 section 3.1): records
of content type 22 carry handshake messages, which may span records; the
first message is the ClientHello (type 1, 24-bit length), whose extensions
follow the legacy fields; extension 16 holds a 16-bit-length list of 8-bit-
length protocol names. Anything malformed or oversized simply gives no offer
(``None``): OpenSSL then judges the handshake on its own.
"""

from __future__ import annotations

from typing import Final

_HANDSHAKE: Final = 22
_CLIENT_HELLO: Final = 1
_ALPN_EXTENSION: Final = 16
#: A ClientHello larger than this is not read (OpenSSL still handles it).
MAX_HELLO: Final = 65536


class ClientHelloReader:
    """Collects handshake record payloads until the first ClientHello is complete.

    Feed it each whole record (header included) in order with :meth:`feed`;
    :attr:`done` becomes true when the ClientHello is complete or cannot be
    read, and :attr:`alpn` then holds the protocols offered (empty when the
    extension is absent) or None when the hello could not be read.
    """

    __slots__ = ("_buffer", "alpn", "done")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.done = False
        self.alpn: tuple[bytes, ...] | None = None

    def feed(self, record: bytes | bytearray | memoryview) -> None:
        if self.done:
            return
        if len(record) < 5 or record[0] != _HANDSHAKE:
            self.done = True
            return
        self._buffer += record[5:]
        if len(self._buffer) < 4:
            return
        if self._buffer[0] != _CLIENT_HELLO:
            self.done = True
            return
        length = int.from_bytes(self._buffer[1:4], "big")
        if length > MAX_HELLO:
            self.done = True
            return
        if len(self._buffer) < 4 + length:
            return
        self.done = True
        self.alpn = offered_alpn(bytes(self._buffer[4 : 4 + length]))
        self._buffer = bytearray()


def offered_alpn(body: bytes) -> tuple[bytes, ...] | None:
    """The ALPN protocol names in a ClientHello body (after its 4-byte header).

    Returns:
        The names in the client's order; ``()`` without the extension; None
        when the body is malformed.
    """
    try:
        position = 2 + 32  # legacy_version, random
        position += 1 + body[position]  # legacy_session_id
        position += 2 + int.from_bytes(body[position : position + 2], "big")  # cipher_suites
        position += 1 + body[position]  # legacy_compression_methods
        if position == len(body):
            return ()  # no extensions at all (TLS 1.2 allows it)
        end = position + 2 + int.from_bytes(body[position : position + 2], "big")
        if end != len(body):
            return None
        position += 2
        while position < end:
            kind = int.from_bytes(body[position : position + 2], "big")
            size = int.from_bytes(body[position + 2 : position + 4], "big")
            data = body[position + 4 : position + 4 + size]
            if len(data) != size:
                return None
            position += 4 + size
            if kind == _ALPN_EXTENSION:
                return _protocol_names(data)
        return () if position == end else None
    except IndexError:
        return None


def _protocol_names(data: bytes) -> tuple[bytes, ...] | None:
    if len(data) < 2 or int.from_bytes(data[:2], "big") != len(data) - 2:
        return None
    names: list[bytes] = []
    position = 2
    while position < len(data):
        size = data[position]
        name = data[position + 1 : position + 1 + size]
        if size == 0 or len(name) != size:
            return None
        names.append(name)
        position += 1 + size
    return tuple(names)
