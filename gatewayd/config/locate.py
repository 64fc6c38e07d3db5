"""Key paths and the lines they are written on (``tomllib`` keeps no positions).

A key path names a place in the file, ``("host", 1, "route", 0, "backend")``,
written ``host[1].route[0].backend`` in messages (:func:`format_key_path`).
:class:`Locator` scans the text once and maps every key path it sees to its
line; :func:`syntax_error` turns a ``tomllib`` error into a located
:class:`~gatewayd.errors.ConfigError`.
"""

from __future__ import annotations

import re
import sys
from bisect import bisect_right

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from gatewayd.config.values import toml_string
from gatewayd.errors import ConfigError

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_\-]+")
# A number, boolean or date-time value; "1979-05-27 07:32:00" has one inner space.
_SCALAR_RE = re.compile(r"[^\s,\]}#]+(?: \d\d:[^\s,\]}#]*)?")
# The "(at line N, column M)" suffix of a TOMLDecodeError message.
_TOML_POSITION_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_AT_END_RE = re.compile(r"\s*\(at end of document\)\s*$")

KeyPath = tuple[str | int, ...]


def format_key_path(path: KeyPath) -> str:
    """Render a key path as written in messages: ``host[1].route[0].backend``.

    Keys that are not bare TOML keys are quoted: ``gateway."max conn"``.
    """
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = part if _BARE_KEY_RE.fullmatch(part) else toml_string(part)
            text += f".{name}" if text else name
    return text


def syntax_error(file: str, text: str, exc: tomllib.TOMLDecodeError) -> ConfigError:
    """One ConfigError with the line and column of a TOML syntax error."""
    message = str(exc)
    line = getattr(exc, "lineno", None)
    column = getattr(exc, "colno", None)
    found = _TOML_POSITION_RE.search(message)
    if found is not None:
        message = message[: found.start()]
        if not isinstance(line, int) or not isinstance(column, int):
            line, column = int(found.group(1)), int(found.group(2))
    else:
        at_end = _TOML_AT_END_RE.search(message)
        if at_end is not None:
            message = message[: at_end.start()] + " (at end of file)"
            if not isinstance(line, int) or not isinstance(column, int):
                lines = text.split("\n")
                line, column = len(lines), len(lines[-1]) + 1
    if message[:1].isupper() and not message[1:2].isupper():
        message = message[0].lower() + message[1:]
    return ConfigError(
        file,
        "",
        f"TOML syntax error: {message}",
        line=line if isinstance(line, int) else None,
        column=column if isinstance(column, int) else None,
    )


class _ScanError(Exception):
    """The locator met something it does not understand; it skips the line."""


class Locator:
    """Maps key paths to the line they are written on (best effort).

    Array-of-tables elements are indexed per parent (``[[host.route]]`` after
    the second ``[[host]]`` is ``("host", 1, "route", n)``), array elements get
    the line where they start, and inline-table keys their own line.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.lines: dict[KeyPath, int] = {}
        self._aot_counts: dict[KeyPath, int] = {}
        self._starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
        self._current: KeyPath = ()

    @classmethod
    def scan(cls, text: str) -> Locator:
        """Scan a TOML document (already known to parse) and return its locator."""
        locator = cls(text)
        locator._scan()
        return locator

    def line_of(self, path: KeyPath) -> int | None:
        """The line of ``path`` or, when it is not written, of its nearest parent."""
        for end in range(len(path), 0, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None

    # -- scanning ----------------------------------------------------------

    def _line_at(self, pos: int) -> int:
        return bisect_right(self._starts, pos)

    def _peek(self, offset: int = 0) -> str:
        index = self.pos + offset
        return self.text[index] if index < len(self.text) else ""

    def _record(self, path: KeyPath, pos: int) -> None:
        self.lines.setdefault(path, self._line_at(pos))

    def _scan(self) -> None:
        while True:
            self._skip_space(newlines=True)
            if self.pos >= len(self.text):
                return
            try:
                if self._peek() == "[":
                    self._header()
                else:
                    self._key_value(self._current)
            except _ScanError:
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end + 1

    def _skip_space(self, *, newlines: bool) -> None:
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in " \t\r" or (newlines and char == "\n"):
                self.pos += 1
            elif char == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            else:
                return

    def _header(self) -> None:
        start = self.pos
        array = self.text.startswith("[[", self.pos)
        self.pos += 2 if array else 1
        key = self._key()
        self._skip_space(newlines=False)
        closing = "]]" if array else "]"
        if not self.text.startswith(closing, self.pos):
            raise _ScanError
        self.pos += len(closing)
        resolved: KeyPath = ()
        for i, part in enumerate(key):
            resolved += (part,)
            if array and i == len(key) - 1:
                index = self._aot_counts.get(resolved, 0)
                self._aot_counts[resolved] = index + 1
                self._record(resolved, start)
                resolved += (index,)
            elif resolved in self._aot_counts:
                resolved += (self._aot_counts[resolved] - 1,)
        self._record(resolved, start)
        self._current = resolved

    def _key(self) -> tuple[str, ...]:
        parts: list[str] = []
        while True:
            self._skip_space(newlines=False)
            char = self._peek()
            if char == '"':
                parts.append(self._basic_string())
            elif char == "'":
                parts.append(self._literal_string())
            else:
                found = _BARE_KEY_RE.match(self.text, self.pos)
                if found is None:
                    raise _ScanError
                parts.append(found.group())
                self.pos = found.end()
            self._skip_space(newlines=False)
            if self._peek() != ".":
                return tuple(parts)
            self.pos += 1

    def _key_value(self, table: KeyPath) -> None:
        start = self.pos
        key = self._key()
        if self._peek() != "=":
            raise _ScanError
        self.pos += 1
        for end in range(1, len(key) + 1):
            self._record(table + key[:end], start)
        self._skip_space(newlines=False)
        self._value(table + key)

    def _value(self, path: KeyPath) -> None:
        text = self.text
        char = self._peek()
        if text.startswith('"""', self.pos) or text.startswith("'''", self.pos):
            self._multiline_string()
        elif char == '"':
            self._basic_string()
        elif char == "'":
            self._literal_string()
        elif char == "[":
            self._array(path)
        elif char == "{":
            self._inline_table(path)
        else:
            found = _SCALAR_RE.match(text, self.pos)
            if found is None:
                raise _ScanError
            self.pos = found.end()

    def _basic_string(self) -> str:
        text = self.text
        self.pos += 1
        out: list[str] = []
        while self.pos < len(text):
            char = text[self.pos]
            if char == '"':
                self.pos += 1
                return "".join(out)
            if char == "\n":
                raise _ScanError
            if char == "\\":
                code = text[self.pos + 1 : self.pos + 2]
                simple = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", "e": "\x1b",
                          '"': '"', "\\": "\\"}
                if code in simple:
                    out.append(simple[code])
                    self.pos += 2
                elif code in ("u", "U"):
                    size = 4 if code == "u" else 8
                    digits = text[self.pos + 2 : self.pos + 2 + size]
                    try:
                        out.append(chr(int(digits, 16)))
                    except ValueError:
                        raise _ScanError from None
                    self.pos += 2 + size
                else:
                    raise _ScanError
                continue
            out.append(char)
            self.pos += 1
        raise _ScanError

    def _literal_string(self) -> str:
        end = self.text.find("'", self.pos + 1)
        if end < 0 or "\n" in self.text[self.pos : end]:
            raise _ScanError
        value = self.text[self.pos + 1 : end]
        self.pos = end + 1
        return value

    def _multiline_string(self) -> None:
        text = self.text
        quote = text[self.pos] * 3
        index = self.pos + 3
        while index < len(text):
            if quote == '"""' and text[index] == "\\":
                index += 2
                continue
            if text.startswith(quote, index):
                end = index + 3
                # Up to two quotes may directly precede the closing delimiter.
                while end < len(text) and text[end] == quote[0] and end - index < 5:
                    end += 1
                self.pos = end
                return
            index += 1
        raise _ScanError

    def _array(self, path: KeyPath) -> None:
        self.pos += 1
        index = 0
        while True:
            self._skip_space(newlines=True)
            if self._peek() == "]":
                self.pos += 1
                return
            self._record(path + (index,), self.pos)
            self._value(path + (index,))
            index += 1
            self._skip_space(newlines=True)
            if self._peek() == ",":
                self.pos += 1
            elif self._peek() == "]":
                self.pos += 1
                return
            else:
                raise _ScanError

    def _inline_table(self, path: KeyPath) -> None:
        self.pos += 1
        while True:
            self._skip_space(newlines=True)
            if self._peek() == "}":
                self.pos += 1
                return
            self._key_value(path)
            self._skip_space(newlines=True)
            if self._peek() == ",":
                self.pos += 1
            elif self._peek() == "}":
                self.pos += 1
                return
            else:
                raise _ScanError


# ---------------------------------------------------------------------------
# The builder: parsed TOML -> Config, collecting every error.
# ---------------------------------------------------------------------------
