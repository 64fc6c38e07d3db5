"""The key declarations against everything derived from them or written about them.

Each configuration key is declared once, on its dataclass field
(gatewayd/config/schema.py). These tests hold the rest to that declaration:

* docs/configuration.md lists every declared key in its table's section, with
  the declared type and default, and documents no key that is not declared;
* the annotated config/gatewayd.toml writes every declared key (set to its
  default) under its table, and no undeclared one;
* the builder reports a wrong value of every declared key (a declaration
  that no builder step reads fails here);
* every ``Step`` names a builder method that exists.

The checkers return their findings, so that they are tested on doctored
copies too: a checker that cannot fail would prove nothing.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatewayd.config import loads
from gatewayd.config.build import Builder
from gatewayd.config.locate import format_key_path
from gatewayd.config.schema import PLACES, REQUIRED, Address, Key
from gatewayd.config.values import File, Step, Table, Tables, Value
from gatewayd.errors import ConfigErrors

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "configuration.md"
ANNOTATED = REPO / "config" / "gatewayd.toml"

#: How the file writes each table's header: place name -> "host.route".
HEADERS = {name: place.header.strip("[]") for name, place in PLACES.items() if place.header.startswith("[")}


def all_keys() -> Iterator[tuple[str, Key]]:
    for name, place in PLACES.items():
        for key in place.keys.values():
            yield name, key


def key_id(item: tuple[str, Key]) -> str:
    place, key = item
    return f"{place or 'top'}.{key.name}"


def is_table(key: Key) -> bool:
    return isinstance(key.kind, (Table, Tables))


# ---------------------------------------------------------------------------
# Comparing a written value with a declared default
# ---------------------------------------------------------------------------


def comparable_default(key: Key) -> object:
    """The declared default as TOML would write it, or REQUIRED when there is none to show."""
    default = key.default
    if default is REQUIRED or default is None or isinstance(key.kind, Table):
        return REQUIRED
    if isinstance(default, tuple):
        return list(default)
    if isinstance(default, (Address, Path)):
        return str(default)
    return default


def same_value(written: object, declared: object) -> bool:
    """Equal as TOML values: true is not 1, 10 is 10.0."""
    if isinstance(written, bool) or isinstance(declared, bool):
        return type(written) is type(declared) and written == declared
    return written == declared


# ---------------------------------------------------------------------------
# docs/configuration.md
# ---------------------------------------------------------------------------


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def doc_sections(text: str) -> dict[str, list[str]]:
    """Each heading's anchor -> the lines under it (up to the next heading of any level)."""
    sections: dict[str, list[str]] = {}
    current: list[str] = sections.setdefault("", [])
    for line in text.splitlines():
        found = re.match(r"#{1,6} (.*)", line)
        if found:
            current = sections.setdefault(anchor(found.group(1)), [])
        else:
            current.append(line)
    return sections


def doc_rows(lines: list[str]) -> dict[str, list[str]]:
    """The rows of the key tables in ``lines``: key -> its cells (type, default, meaning)."""
    rows: dict[str, list[str]] = {}
    for line in lines:
        found = re.match(r"\| `([a-z_]+)` \|(.*)\|\s*$", line)
        if found:
            rows[found.group(1)] = [cell.strip() for cell in found.group(2).split("|")]
    return rows


def docs_problems(text: str) -> list[str]:
    """Where the configuration reference and the declarations disagree."""
    problems: list[str] = []
    sections = doc_sections(text)
    headings = {name for name in sections if name}
    for name, place in PLACES.items():
        keys = place.keys
        if name == "":
            for key in keys.values():
                if key.name not in headings:
                    problems.append(f"top level: no section for [{key.name}]")
            continue
        if place.docs not in sections:
            problems.append(f"{place.header}: no section #{place.docs}")
            continue
        rows = doc_rows(sections[place.docs])
        if name == "certificates":
            # Its keys are written in the host table's `certificates` row.
            row = " ".join(rows.get("certificates", []))
            problems.extend(
                f"{place.header}: {key.name} not shown in the certificates row"
                for key in keys.values()
                if f"{key.name} =" not in row
            )
            continue
        for key in keys.values():
            if key.name not in rows:
                own = f"{anchor(place.header.strip('[]'))}{key.name}"
                if not (is_table(key) and own in headings):
                    problems.append(f"{place.header}: {key.name} is declared but not documented")
                continue
            doc_type, doc_default = rows[key.name][0], rows[key.name][1]
            if doc_type != key.kind.docs_type:
                problems.append(
                    f"{place.header}: {key.name}: documented as {doc_type!r}, "
                    f"declared {key.kind.docs_type!r}"
                )
            problems.extend(default_problems(place.header, key, doc_default))
        for documented in rows:
            if documented not in keys:
                problems.append(f"{place.header}: {documented} is documented but not declared")
    for _, key in all_keys():
        if key.see and key.see not in headings:
            problems.append(f"{key.name}: see={key.see!r} is not a section")
    return problems


def default_problems(header: str, key: Key, cell: str) -> list[str]:
    """The default column against the declared default, where the column gives a value."""
    if cell.startswith("*required*"):
        if key.default is not REQUIRED:
            return [f"{header}: {key.name}: documented as required, declared {key.default!r}"]
        return []
    found = re.fullmatch(r"`([^`]*)`", cell)
    if found is None:
        return []  # "—", "from `[tls]`": no value to compare
    written = tomllib.loads(f"v = {found.group(1)}")["v"]
    declared = comparable_default(key)
    if declared is REQUIRED and isinstance(key.kind, File) and written == "":
        return []  # "" is how a file key is switched off
    if not same_value(written, declared):
        return [f"{header}: {key.name}: documented default {cell}, declared {key.default!r}"]
    return []


# ---------------------------------------------------------------------------
# config/gatewayd.toml
# ---------------------------------------------------------------------------


def annotated_keys(text: str) -> dict[str, set[str]]:
    """Place name -> the keys written in it, commented out ("# [admin]") or not."""
    by_header = {header: place for place, header in HEADERS.items()}
    found: dict[str, set[str]] = {name: set() for name in PLACES}
    place = ""
    last = ""
    for line in text.splitlines():
        if last == "certificates" and re.match(r"\s+#", line):
            # The comment under `certificates = []` shows an entry's keys.
            found["certificates"].update(re.findall(r"\b([a-z_]+) = ", line))
            continue
        last = ""
        header = re.match(r"(?:# )?\[\[?([\w.]+)\]\]?", line)
        if header:
            name = header.group(1)
            place = by_header.get(name, f"?{name}")
            found[""].add(name.split(".")[0])
            if "." in name:
                parent, child = name.rsplit(".", 1)
                found.setdefault(by_header.get(parent, parent), set()).add(child)
            found.setdefault(place, set())
            continue
        assignment = re.match(r"(?:# )?([A-Za-z_]+) = (.*)", line)
        if assignment:
            found.setdefault(place, set()).add(assignment.group(1))
            last = assignment.group(1)
    return found


def annotated_tables(data: dict[str, object]) -> dict[str, list[dict[str, object]]]:
    """Place name -> every table of it in the parsed annotated file."""
    def tables(value: object) -> list[dict[str, object]]:
        if isinstance(value, dict):
            return [value]
        return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []

    hosts = tables(data.get("host"))
    return {
        "gateway": tables(data.get("gateway")),
        "log": tables(data.get("log")),
        "admin": tables(data.get("admin")),
        "tls": tables(data.get("tls")),
        "listener": tables(data.get("listener")),
        "host": hosts,
        "certificates": [c for h in hosts for c in tables(h.get("certificates"))],
        "route": [r for h in hosts for r in tables(h.get("route"))],
    }


def annotated_problems(text: str) -> list[str]:
    """Where the annotated configuration and the declarations disagree."""
    problems: list[str] = []
    written = annotated_keys(text)
    for name, keys in written.items():
        place = PLACES.get(name)
        if place is None:
            problems.append(f"[{name.lstrip('?')}]: not a table of the configuration")
            continue
        problems.extend(
            f"{place.header or 'top level'}: {key} is written but not declared"
            for key in sorted(keys - set(place.keys))
        )
        problems.extend(
            f"{place.header or 'top level'}: {key} is declared but not written"
            for key in place.keys
            if key not in keys
        )
    # "every supported key, set to its default (required keys show an example value)"
    for name, tables in annotated_tables(tomllib.loads(text)).items():
        for key in PLACES[name].keys.values():
            declared = comparable_default(key)
            if declared is REQUIRED or isinstance(key.kind, Step):
                continue  # an example value, not a default
            for table in tables:
                if key.name in table and not same_value(table[key.name], declared):
                    problems.append(
                        f"{PLACES[name].header}: {key.name} = {table[key.name]!r}, "
                        f"but its default is {key.default!r}"
                    )
    return problems


def test_docs_agree_with_the_declarations() -> None:
    assert docs_problems(DOCS.read_text()) == []


def test_annotated_config_agrees_with_the_declarations() -> None:
    assert annotated_problems(ANNOTATED.read_text()) == []


def test_docs_checker_finds_a_missing_an_extra_and_a_wrong_row() -> None:
    text = DOCS.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `max_fails` |"))
    doctored = (
        text.replace(row + "\n", "")
        .replace("| `realm` | string |", "| `realm` | integer |")
        .replace("| `idle_timeout` | duration | `0` |", "| `idle_timeout` | duration | `5` |")
        .replace("| `level` |", "| `colour` | string | `\"red\"` | x |\n| `level` |")
    )
    assert sorted(docs_problems(doctored)) == [
        "[[host.route]]: max_fails is declared but not documented",
        "[[host.route]]: realm: documented as 'integer', declared 'string'",
        "[gateway]: idle_timeout: documented default `5`, declared 0.0",
        "[log]: colour is documented but not declared",
    ]


def test_annotated_checker_finds_a_missing_an_extra_and_a_changed_default() -> None:
    text = ANNOTATED.read_text()
    doctored = (
        text.replace("max_fails = 1 ", "max_fails = 3 ")
        .replace("access_log = true", "access_log = true\ncolour = \"red\"")
        .replace("\nrealm = ", "\n#realm = ")
    )
    assert sorted(annotated_problems(doctored)) == [
        "[[host.route]]: max_fails = 3, but its default is 1",
        "[[host.route]]: realm is declared but not written",
        "[log]: colour is written but not declared",
    ]


def test_every_see_anchor_and_every_step_resolves() -> None:
    for _, key in all_keys():
        if isinstance(key.kind, Step):
            assert callable(getattr(Builder, key.kind.builder, None)), (key.name, key.kind.builder)
        else:
            assert isinstance(key.kind, Value), key.name


def test_keys_are_unique_per_table_and_groups_are_route_keys() -> None:
    route = PLACES["route"]
    assert {key.name for key in route.group("backend")} <= set(route.keys)
    for name, key in all_keys():
        assert key.group in ("", "request", "backend"), (name, key.name)
        assert key.with_auth in (None, "any", "basic", "request"), (name, key.name)
        if key.with_auth is not None:
            assert name == "route" and key.group == "request", key.name


# ---------------------------------------------------------------------------
# The builder reads every declared key
# ---------------------------------------------------------------------------

CERT = "certs/a.crt"

#: A valid file as (header, keys) sections; "" is the top level.
BASE: list[tuple[str, dict[str, str]]] = [
    ("", {}),
    ("[gateway]", {}),
    ("[log]", {}),
    ("[tls]", {}),
    ("[admin]", {"listen": '"127.0.0.1:0"'}),
    ("[[listener]]", {"address": '"127.0.0.1:0"'}),
    ("[[host]]", {"names": '["a.example"]', "certificate": f'"{CERT}"',
                  "private_key": f'"{CERT}"'}),
    ("[[host.route]]", {"path": '"/"', "backend": '"wss://127.0.0.1:9000/"'}),
]

# What a key needs beside it to be read at all, and what it replaces.
NEEDS: dict[str, dict[str, str | None]] = {
    "path_prefix": {"path": None},
    "backends": {"backend": None},
    "redirect": {"backend": None},
    "redirect_status": {"backend": None, "redirect": '"https://b.example/"'},
    "client_subject_header": {"client_ca": f'"{CERT}"'},
}
AUTH = {
    "basic": {"auth": '"basic"', "auth_users": f'"{CERT}"'},
    "request": {"auth": '"request"', "auth_url": '"http://127.0.0.1:9100/"'},
    "any": {"auth": '"request"', "auth_url": '"http://127.0.0.1:9100/"'},
}


def document(place: str, key: Key) -> tuple[str, str]:
    """A valid file with one wrong value of ``key``, and the key's path."""
    sections = [(header, dict(keys)) for header, keys in BASE]
    wrong = "5" if is_table(key) else "{}"
    if place == "":
        sections = [s for s in sections if s[0].strip("[]").split(".")[0] != key.name]
        sections[0][1][key.name] = wrong
        return render(sections), key.name
    if place == "certificates":
        host = sections[6][1]
        pair = {"certificate": f'"{CERT}"', "private_key": f'"{CERT}"', key.name: wrong}
        host["certificates"] = "[{" + ", ".join(f"{k} = {v}" for k, v in pair.items()) + "}]"
        return render(sections), f"host[0].certificates[0].{key.name}"
    header = PLACES[place].header
    if place == "host" and key.name == "route":
        sections = [s for s in sections if s[0] != "[[host.route]]"]
    if header not in (name for name, _ in sections):
        sections.append((header, {}))  # a table the base file does not have
    table = next(keys for name, keys in sections if name == header)
    extra = dict(NEEDS.get(key.name, {}))
    if key.with_auth is not None:
        extra.update(AUTH[key.with_auth])
    for name, value in extra.items():
        if value is None:
            table.pop(name, None)
        else:
            table[name] = value
    table[key.name] = wrong
    prefix = {"listener": "listener[0]", "host": "host[0]", "route": "host[0].route[0]"}.get(place, place)
    return render(sections), f"{prefix}.{key.name}"


def render(sections: list[tuple[str, dict[str, str]]]) -> str:
    lines: list[str] = []
    for header, keys in sections:
        if header:
            lines.append(header)
        lines.extend(f"{name} = {value}" for name, value in keys.items())
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("item", list(all_keys()), ids=key_id)
def test_builder_reports_a_wrong_value_of_every_declared_key(
    item: tuple[str, Key], tmp_path: Path
) -> None:
    place, key = item
    (tmp_path / "certs").mkdir()
    (tmp_path / CERT).write_text("dummy\n")
    text, key_path = document(place, key)
    with pytest.raises(ConfigErrors) as info:
        loads(text, tmp_path / "gatewayd.toml")
    paths = [error.key_path for error in info.value.errors]
    assert any(path == key_path or path.startswith(key_path + "[") for path in paths), (
        key_path,
        [str(error) for error in info.value.errors],
    )


def test_the_base_document_is_valid(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / CERT).write_text("dummy\n")
    config = loads(render(BASE), tmp_path / "gatewayd.toml")
    assert format_key_path(("host", 0, "route", 0)) == config.hosts[0].routes[0].key_path
