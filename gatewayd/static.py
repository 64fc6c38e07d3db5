"""Static files and HTTP-to-HTTPS redirects: the pure decisions of SPEC section 7. No I/O.

Theory of operation
-------------------
A request on a ``static = "DIR"`` route is answered in three steps; the
file-system half lives in :mod:`gatewayd.staticio`, everything that can be
decided from strings and numbers is here, so that each rule has a table test:

1. **Method and kind** (:func:`check_request`): GET and HEAD are served; a
   WebSocket upgrade gets ``404`` (a static route has no WebSocket resource),
   any other method ``405`` with ``Allow: GET, HEAD``.
2. **Path mapping** (:func:`static_rest`, :func:`map_segments`): the request
   path was already normalized by :func:`gatewayd.routing.normalize_path`
   (unreserved escapes decoded, dot-segments removed, slashes merged); the
   part after the route's match is split into segments and each is
   percent-decoded once more into a file name. A segment that starts with
   ``.`` (dotfiles, ``..`` however it was spelled), or that decodes to a ``/``
   or a NUL, or is not UTF-8, maps to nothing: ``404``. The I/O half then
   resolves symlinks and refuses anything whose real path leaves DIR.
3. **The answer** (:func:`evaluate`): from the file's size and modification
   time, the validators (a strong ``ETag``, ``Last-Modified``), then the
   preconditions in the order of RFC 9110 section 13.2.2 (``If-Match``,
   ``If-Unmodified-Since`` -> 412; ``If-None-Match``, ``If-Modified-Since`` ->
   304), then ``Range`` (section 14.2, with ``If-Range``): one satisfiable
   byte range -> 206, an unsatisfiable one -> 416, several ranges or an
   invalid header -> the whole file (a server may ignore Range); a HEAD
   gets the same head as its GET, 206 and 416 included.

Redirects to HTTPS (``[[listener]] redirect_https``): :func:`https_redirect_url`
builds ``https://host[:port]/path?query`` from the Host header and the
request-target.
"""

from __future__ import annotations

import email.utils
import mimetypes
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from gatewayd.config import RouteConfig
from gatewayd.errors import HandshakeRejected, Redirected
from gatewayd.handshake import RequestHead, split_tokens
from gatewayd.record import Reason
from gatewayd.routing import HostTable, host_from_header

#: Methods a static route serves (SPEC 7); anything else gets 405 with this Allow.
STATIC_METHODS = ("GET", "HEAD")

#: Bytes read from a file at a time (each read runs in a worker thread, and is
#: sent before the next is read: memory per response is one chunk).
CHUNK = 65536

# --------------------------------------------------------------------------- request


def check_request(method: str, headers: Sequence[tuple[str, str]]) -> None:
    """SPEC 7 for a request on a static route: GET and HEAD only, no WebSocket.

    Raises:
        HandshakeRejected: 404 for a WebSocket upgrade (an ``Upgrade`` header
            with the ``websocket`` token), 405 with ``Allow: GET, HEAD`` for
            any other method than GET and HEAD.
    """
    upgrades = split_tokens(v for k, v in headers if k.lower() == "upgrade")
    if any(token.lower() == "websocket" for token in upgrades):
        raise HandshakeRejected(Reason.STATIC_UPGRADE, "WebSocket upgrade on a static route")
    if method not in STATIC_METHODS:
        # The answer's Allow header (GET, HEAD) is the STATIC_METHOD row's.
        raise HandshakeRejected(Reason.STATIC_METHOD, f"method {method} on a static route")


# --------------------------------------------------------------------------- path mapping


def static_rest(route: RouteConfig, path: str) -> str:
    """The part of ``path`` after the route's match (as in the backend rewrite).

    For an exact ``path`` route this is ``""`` (the folder itself: its index);
    for ``path_prefix = "/novnc/"`` and ``/novnc/app/ui.js`` it is ``app/ui.js``.
    """
    matched = route.path if route.path is not None else route.path_prefix
    assert matched is not None and path.startswith(matched)
    return path[len(matched) :]


_ESCAPE_RE = re.compile(r"%([0-9A-Fa-f]{2})")


def _decode_segment(segment: str) -> str | None:
    """One path segment percent-decoded into a file name (UTF-8), or None."""
    try:
        raw = segment.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate cannot be a file name
        return None
    decoded = _ESCAPE_RE.sub(lambda m: chr(int(m.group(1), 16)), raw.decode("latin-1"))
    try:
        return decoded.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return None


def map_segments(rest: str) -> tuple[str, ...] | None:
    """The file names ``rest`` (a normalized path suffix) names under DIR, or None for 404.

    ``"app/ui.js"`` -> ``("app", "ui.js")``; ``"app/"`` -> ``("app", "")``: the
    empty last name means "the path ends with /" (a directory was asked for);
    ``""`` -> ``()`` (DIR itself). None for a segment starting with ``.``
    (dotfiles and dot-directories, ``..`` in any spelling), a ``%2F`` or
    ``%00`` (a name may never gain a separator or a NUL by decoding), an
    empty segment inside the path, or a name that is not UTF-8.
    """
    if rest.startswith("/"):
        # A prefix without a trailing slash ("/files") matched "/files/x".
        rest = rest[1:]
    if not rest:
        return ()
    parts = rest.split("/")
    names: list[str] = []
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if part == "":
            if not last:
                return None
            names.append("")
            continue
        name = _decode_segment(part)
        if name is None or name.startswith(".") or "/" in name or "\x00" in name:
            return None
        names.append(name)
    return tuple(names)


# --------------------------------------------------------------------------- content type

# Web types where Python's built-in table is missing or dated (RFC 9239 for
# JavaScript; RFC 8081 for fonts).
_TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".html": "text/html",
    ".htm": "text/html",
    ".json": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".otf": "font/otf",
    ".oga": "audio/ogg",
    ".ogg": "audio/ogg",
    ".opus": "audio/ogg",
    ".mp3": "audio/mpeg",
    ".webp": "image/webp",
    ".avif": "image/avif",
    ".md": "text/markdown",
    # Compressed files are served as what they are (never with Content-Encoding).
    ".gz": "application/gzip",
    ".bz2": "application/x-bzip2",
    ".xz": "application/x-xz",
    ".zst": "application/zstd",
}
# Python's own table only (a MimeTypes instance does not read /etc/mime.types),
# so the answer does not depend on the machine.
_BUILTIN = mimetypes.MimeTypes()
#: Types that are text without a text/ prefix: they get charset=utf-8 too.
_TEXTUAL = frozenset(
    {
        "application/json",
        "application/manifest+json",
        "application/javascript",
        "application/xml",
        "image/svg+xml",
    }
)
DEFAULT_TYPE = "application/octet-stream"


def content_type(name: str) -> str:
    """``Content-Type`` for a file name: text types get ``; charset=utf-8`` (SPEC 7)."""
    dot = name.rfind(".")
    suffix = name[dot:].lower() if dot > 0 else ""
    kind = _TYPES.get(suffix) or _BUILTIN.guess_type("x" + suffix, strict=False)[0] or DEFAULT_TYPE
    if kind.startswith("text/") or kind in _TEXTUAL:
        return f"{kind}; charset=utf-8"
    return kind


# --------------------------------------------------------------------------- validators


@dataclass(frozen=True)
class FileInfo:
    """What the answer depends on: a regular file's size and identity."""

    size: int
    mtime_ns: int
    inode: int = 0

    @property
    def mtime(self) -> int:
        """Whole seconds (HTTP dates have no finer resolution)."""
        return self.mtime_ns // 1_000_000_000

    @property
    def etag(self) -> str:
        """A strong entity tag (RFC 9110 section 8.8.3): changes with content, size or inode.

        Like nginx's (modification time and length), plus the inode and the
        nanoseconds, so a file replaced within the same second gets a new tag.
        """
        return f'"{self.mtime_ns:x}-{self.size:x}-{self.inode:x}"'

    @property
    def last_modified(self) -> str:
        return http_date(self.mtime)


def http_date(seconds: float) -> str:
    """An IMF-fixdate (RFC 9110 section 5.6.7)."""
    return email.utils.formatdate(seconds, usegmt=True)


def parse_http_date(value: str) -> int | None:
    """Seconds since the epoch of an HTTP date (IMF-fixdate, RFC 850 or asctime), or None."""
    try:
        parsed = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        # asctime carries no zone: it is GMT (RFC 9110 section 5.6.7).
        parsed = parsed.replace(tzinfo=timezone.utc)
    return int((parsed - datetime(1970, 1, 1, tzinfo=timezone.utc)).total_seconds())


_ETAG_RE = re.compile(r'\s*(W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*')


def parse_etags(value: str) -> list[tuple[bool, str]] | None:
    """An If-Match / If-None-Match list as (weak, tag) pairs; None for ``*``.

    Malformed members are skipped (a list with none left matches nothing).
    """
    if value.strip() == "*":
        return None
    out: list[tuple[bool, str]] = []
    for member in value.split(","):
        match = _ETAG_RE.fullmatch(member)
        if match:
            out.append((match.group(1) is not None, match.group(2)))
    return out


def _strong_match(tags: list[tuple[bool, str]] | None, etag: str) -> bool:
    # RFC 9110 section 8.8.3.2: strong comparison (both strong, same opaque tag).
    return tags is None or any(not weak and tag == etag for weak, tag in tags)


def _weak_match(tags: list[tuple[bool, str]] | None, etag: str) -> bool:
    # Weak comparison: the opaque tags match, weak or not.
    return tags is None or any(tag == etag for _, tag in tags)


# --------------------------------------------------------------------------- ranges


@dataclass(frozen=True)
class ByteRange:
    """An inclusive byte range of a representation (RFC 9110 section 14.1.2)."""

    first: int
    last: int

    @property
    def length(self) -> int:
        return self.last - self.first + 1


class Unsatisfiable(Exception):
    """A syntactically valid Range that selects no byte of the file (416)."""


_RANGE_SPEC_RE = re.compile(r"\s*(\d*)\s*-\s*(\d*)\s*")


def parse_range(value: str, size: int) -> ByteRange | None:
    """The one byte range a ``Range`` header selects in a file of ``size`` bytes.

    Returns None when the header is to be ignored (the whole file is sent):
    another unit than ``bytes``, a syntax error, an invalid range-spec
    (``last < first``), several ranges (a server may ignore Range, RFC 9110
    section 14.2; SPEC 7 serves single ranges), or an empty file.

    Raises:
        Unsatisfiable: a valid single range that starts at or past the end
            (``bytes=100-`` on a 100-byte file) or a zero-length suffix.
    """
    unit, eq, specs = value.partition("=")
    if not eq or unit.strip().lower() != "bytes" or size == 0:
        return None
    members = [s for s in specs.split(",") if s.strip()]
    if len(members) != 1:
        return None
    match = _RANGE_SPEC_RE.fullmatch(members[0])
    if not match:
        return None
    first_text, last_text = match.groups()
    if first_text:
        first = int(first_text)
        if last_text and int(last_text) < first:
            return None  # invalid range-spec: ignored (section 14.1.1)
        if first >= size:
            raise Unsatisfiable(value)
        last = min(int(last_text), size - 1) if last_text else size - 1
        return ByteRange(first, last)
    if not last_text:
        return None  # "bytes=-": no number at all
    suffix = int(last_text)
    if suffix == 0:
        raise Unsatisfiable(value)
    return ByteRange(max(0, size - suffix), size - 1)


# --------------------------------------------------------------------------- the answer


@dataclass(frozen=True)
class Decision:
    """How a GET/HEAD of an existing file is answered.

    Attributes:
        status: 200, 206, 304, 412 or 416.
        headers: the response headers (without Connection, Server, Date).
        range: the bytes of the file to send after the head (GET 200 and
            206 only; None: no file bytes follow).
    """

    status: int
    headers: tuple[tuple[str, str], ...]
    range: ByteRange | None = None


def _get_all(headers: Sequence[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name]


def _one(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    values = _get_all(headers, name)
    return ", ".join(values) if values else None


def evaluate(
    method: str,
    headers: Sequence[tuple[str, str]],
    info: FileInfo,
    name: str,
    *,
    cache_control: str = "",
) -> Decision:
    """The answer to a GET or HEAD of a regular file (SPEC 7; RFC 9110 13.2.2 and 14).

    Args:
        method: "GET" or "HEAD".
        headers: the request's headers.
        info: the file's size and identity.
        name: the file's name (for its Content-Type).
        cache_control: the route's ``cache_control`` ("" = no header).
    """
    etag = info.etag
    validators: list[tuple[str, str]] = [("ETag", etag), ("Last-Modified", info.last_modified)]
    if cache_control:
        validators.append(("Cache-Control", cache_control))

    # RFC 9110 section 13.2.2 steps 1-2: If-Match, else If-Unmodified-Since.
    if_match = _one(headers, "if-match")
    if if_match is not None:
        if not _strong_match(parse_etags(if_match), etag):
            return _failed(validators)
    else:
        since = _one(headers, "if-unmodified-since")
        stamp = parse_http_date(since) if since is not None else None
        if stamp is not None and info.mtime > stamp:
            return _failed(validators)
    # Steps 3-4: If-None-Match, else If-Modified-Since (GET and HEAD: 304).
    if_none_match = _one(headers, "if-none-match")
    if if_none_match is not None:
        if _weak_match(parse_etags(if_none_match), etag):
            return Decision(304, tuple(validators))
    else:
        since = _one(headers, "if-modified-since")
        stamp = parse_http_date(since) if since is not None else None
        if stamp is not None and info.mtime <= stamp:
            return Decision(304, tuple(validators))

    entity: list[tuple[str, str]] = [
        ("Content-Type", content_type(name)),
        *validators,
        ("Accept-Ranges", "bytes"),
    ]
    # Step 5: Range, subject to If-Range. A HEAD gets the head its GET would
    # get (RFC 9110 section 9.3.2: 206 with Content-Range, or 416), as from
    # nginx and Caddy: section 14.2 defines range handling for GET, and a
    # HEAD is answered as that GET without the content.
    range_value = _one(headers, "range")
    if range_value is not None and _if_range_holds(headers, info):
        try:
            selected = parse_range(range_value, info.size)
        except Unsatisfiable:
            return Decision(
                416,
                (
                    *validators,
                    ("Accept-Ranges", "bytes"),
                    ("Content-Range", f"bytes */{info.size}"),
                ),
            )
        if selected is not None:
            return Decision(
                206,
                (
                    *entity,
                    ("Content-Range", f"bytes {selected.first}-{selected.last}/{info.size}"),
                    ("Content-Length", str(selected.length)),
                ),
                range=selected if method == "GET" else None,
            )
    whole = ByteRange(0, info.size - 1) if method == "GET" and info.size else None
    return Decision(200, (*entity, ("Content-Length", str(info.size))), range=whole)


def _failed(validators: list[tuple[str, str]]) -> Decision:
    return Decision(412, tuple(validators))


def _if_range_holds(headers: Sequence[tuple[str, str]], info: FileInfo) -> bool:
    """RFC 9110 section 13.1.5: the Range applies when If-Range is absent or matches."""
    value = _one(headers, "if-range")
    if value is None:
        return True
    value = value.strip()
    if value.startswith('"') or value.startswith("W/"):
        tags = parse_etags(value)
        return bool(tags) and _strong_match(tags, info.etag)
    stamp = parse_http_date(value)
    return stamp is not None and stamp == info.mtime


# --------------------------------------------------------------------------- redirects


def directory_location(path: str, query: str | None) -> str:
    """Where a directory asked for without its trailing slash is moved (301)."""
    location = path + "/"
    return f"{location}?{query}" if query is not None else location


def https_redirect_url(host_header: str, target: str, tls_port: int | None) -> str | None:
    """``https://host[:port]/path?query`` for a ``redirect_https`` listener (SPEC 7).

    Args:
        host_header: the request's Host value (its port, if any, is dropped:
            it is the plain listener's).
        target: the request-target as the client sent it: the path and query
            of an origin-form target go on unchanged; of an absolute-form one
            (``http://name/path?q``) the part after the authority.
        tls_port: the port of the first TLS listener; None or 443 omits it.

    Returns:
        The Location, or None when the Host is malformed.
    """
    name = host_from_header(host_header)
    if name is None:
        return None
    authority = f"[{name}]" if ":" in name else name
    if tls_port is not None and tls_port != 443:
        authority += f":{tls_port}"
    if not target.startswith("/"):
        after = target.split("://", 1)[1] if "://" in target else ""
        cut = min((i for i in (after.find("/"), after.find("?")) if i >= 0), default=len(after))
        target = after[cut:]
        if not target.startswith("/"):
            target = "/" + target
    return f"https://{authority}{target}"


def first_tls_port(listeners: Iterable[tuple[bool, int]]) -> int | None:
    """The port HTTPS is served on: the first TLS listener's, as (tls, bound port) pairs.

    None when no listener has TLS (the TLS side is elsewhere, on 443).
    """
    return next((port for tls, port in listeners if tls), None)


def https_redirect(
    request: RequestHead, hosts: HostTable, tls_port: int | None
) -> HandshakeRejected:
    """The answer of a ``redirect_https`` listener to any request (SPEC 7).

    A ``308 Permanent Redirect`` to the same host, path and query over
    https (308 keeps the method and body, unlike 301); ``404`` when the Host
    names no host and none is ``default`` (no open redirect to any name a
    client sends); ``400`` for a missing, repeated or malformed Host.
    """
    values = request.get_all("host")
    if len(values) != 1:
        return HandshakeRejected(Reason.MALFORMED, "missing or repeated Host header")
    host_value = request.authority if request.authority is not None else values[0]
    name = host_from_header(host_value)
    if name is None:
        return HandshakeRejected(Reason.MALFORMED, f"malformed Host {host_value!r}")
    if hosts.lookup(name) is None:
        return HandshakeRejected(Reason.UNKNOWN_HOST, f"Host {name!r} names no host")
    location = https_redirect_url(host_value, request.target, tls_port)
    assert location is not None, "the Host was parsed above"
    return Redirected(location, 308, f"redirect_https to {location}")
