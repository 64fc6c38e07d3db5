"""htpasswd-style users files for ``auth = "basic"``: ``user:bcrypt-hash`` lines.

Pure: parses bytes already read. Only bcrypt is accepted (what ``htpasswd -B``
writes); every other kind of hash is named in the error, never shown.
"""

from __future__ import annotations

import re

# bcrypt as htpasswd -B writes it: $2y$ (or $2b$/$2a$), a two-digit cost, 22
# characters of salt (the last one carries 2 bits: . O e u) and 31 of hash.
_BCRYPT_RE = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{21}[.Oeu][./A-Za-z0-9]{31}")
#: bcrypt costs accepted in users files: htpasswd -B allows 4 to 17; above
#: that one login costs seconds of CPU.
BCRYPT_MIN_COST = 4
BCRYPT_MAX_COST = 17


def _hash_kind(value: str) -> str | None:
    """What kind of htpasswd hash ``value`` is, in words; None for usable bcrypt.

    Never returns (part of) the value itself: it may be a plain-text password.
    """
    found = _BCRYPT_RE.fullmatch(value)
    if found is not None:
        cost = int(found.group(1))
        if BCRYPT_MIN_COST <= cost <= BCRYPT_MAX_COST:
            return None
        return (
            f"a bcrypt hash with cost {cost}, outside {BCRYPT_MIN_COST}..{BCRYPT_MAX_COST} "
            "(htpasswd -B -C 10 is a good choice)"
        )
    if value.startswith("$2"):
        return "a malformed bcrypt hash"
    if value.startswith("$apr1$"):
        return "an MD5-apr1 hash ($apr1$, htpasswd -m)"
    if value.startswith("$1$"):
        return "an MD5-crypt hash ($1$)"
    if value.startswith("$5$"):
        return "a SHA-256-crypt hash ($5$)"
    if value.startswith("$6$"):
        return "a SHA-512-crypt hash ($6$)"
    if value.startswith("$"):
        return "a crypt(3) hash of another kind"
    if value.upper().startswith("{SHA}"):
        return "an unsalted SHA-1 hash ({SHA}, htpasswd -s)"
    if value.upper().startswith("{SSHA}"):
        return "a salted SHA-1 hash ({SSHA})"
    if re.fullmatch(r"[./0-9A-Za-z]{13}", value):
        return "a DES crypt hash (htpasswd -d), or a plain-text password"
    return "a plain-text password (htpasswd -p) or a hash of an unknown kind"


def parse_users(raw: bytes, name: str) -> tuple[list[tuple[bytes, bytes]], list[str]]:
    """Parse an htpasswd-style users file: ``user:hash`` lines, bcrypt only.

    Blank lines and lines starting with ``#`` are skipped. Every problem is
    reported as ``FILE:LINE: ...``, naming the user but never the hash.

    Returns:
        ((user, hash) pairs in file order, problems).
    """
    problems: list[str] = []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = raw.count(b"\n", 0, exc.start) + 1
        return [], [f"{name}:{bad_line}: not valid UTF-8"]
    users: list[tuple[bytes, bytes]] = []
    first_line: dict[str, int] = {}
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            problems.append(f"{name}:{number}: expected 'user:bcrypt-hash' (as htpasswd -B writes)")
            continue
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in line):
            problems.append(f"{name}:{number}: user {user!r}: control characters in the line")
            continue
        kind = _hash_kind(hashed)
        if kind is not None:
            problems.append(
                f"{name}:{number}: user {user!r} has {kind}; only bcrypt hashes "
                f"($2y$, $2b$, $2a$) are accepted: re-create it with "
                f"'htpasswd -B {name} {user}'"
            )
            continue
        if user in first_line:
            problems.append(
                f"{name}:{number}: user {user!r} is listed twice (also line {first_line[user]})"
            )
            continue
        first_line[user] = number
        users.append((user.encode("utf-8"), hashed.encode("ascii")))
    if not users and not problems:
        problems.append(f"{name}: no users in the file (lines are 'user:bcrypt-hash')")
    return users, problems

