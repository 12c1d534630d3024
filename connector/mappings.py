"""Loading of the ``mappings/`` folder: ``routing.toml`` and ``templates.toml``.

Both files are optional. A missing folder, a missing file or a file with only comments
gives the defaults of ``connector.routing`` and ``connector.templates``. A file that is
not valid TOML, or that has an unknown key, a value of the wrong type or an invalid
rule, stops start-up with a MappingsError that names the file, the line and the fix.
Unknown keys are errors because a misspelled key would otherwise change routing silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connector.routing import Router, RouteRule
from connector.templates import (
    KNOWN_PAYLOAD_FIELDS,
    MARKERS,
    EventTemplate,
    StatusMarker,
    Template,
    TemplateSyntaxError,
    validate_color_id,
)

logger = logging.getLogger(__name__)

ROUTING_FILE_NAME = "routing.toml"
TEMPLATES_FILE_NAME = "templates.toml"

ROUTE_CRITERIA = ("host_email", "host_user_id", "event_type_slug")
ROUTE_KEYS = (*ROUTE_CRITERIA, "calendar_id", "acting_user")
EVENT_KEYS = ("summary", "description", "location", "color_id")
MARKER_KEYS = ("summary_prefix", "color_id", "description_note")
TEMPLATE_SECTIONS = ("event", *MARKERS)

# Example values that error messages suggest for each key.
EXAMPLE_VALUES = {
    "host_email": "jane@example.com",
    "host_user_id": "usr_host123",
    "event_type_slug": "30min-call",
    "calendar_id": "team@example.com",
    "acting_user": "jane@example.com",
    "summary": "{eventTypeName} with {invitee.name}",
    "description": "Email: {invitee.email}",
    "location": "{location.value}",
    "color_id": "8",
    "summary_prefix": "No-show: ",
    "description_note": "Marked as a no-show in Proximity.",
}

EMAIL_PATTERN = re.compile(r"[^@\s]+@[^@\s]+")
TOML_POSITION_PATTERN = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
TOML_END_PATTERN = re.compile(r"\s*\(at end of document\)$")


class MappingsError(Exception):
    """An invalid file in the mappings folder, with the line and the problem.

    ``line`` is 1-based, or None when the problem concerns the whole file.
    """

    def __init__(self, path: Path, line: int | None, problem: str) -> None:
        self.path = path
        self.line = line
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.path}: {self.problem}"
        return f"{self.path}, line {self.line}: {self.problem}"


@dataclass(frozen=True)
class Mappings:
    """The routing rules and event templates that the connector runs with."""

    router: Router = field(default_factory=Router)
    template: EventTemplate = field(default_factory=EventTemplate)


def load_mappings(directory: Path) -> Mappings:
    """Read ``routing.toml`` and ``templates.toml`` from a folder, raising MappingsError.

    Files that do not exist fall back to the defaults. Any other ``.toml`` file in the
    folder is an error, because it is most likely a misnamed routing or templates file.
    """
    router = Router(rules_file=str(directory / ROUTING_FILE_NAME))

    if not directory.exists():
        logger.info("Mappings folder %s does not exist; using the default mappings", directory)
        return Mappings(router=router)
    if not directory.is_dir():
        raise MappingsError(
            directory, None, "is not a folder; the mappings path must name a folder"
        )

    _reject_unknown_files(directory)

    routing_source = _read_source(directory / ROUTING_FILE_NAME)
    if routing_source is not None:
        router = _parse_routing(routing_source)

    template = EventTemplate()
    templates_source = _read_source(directory / TEMPLATES_FILE_NAME)
    if templates_source is not None:
        template = _parse_templates(templates_source)

    logger.info("Loaded %d routing rules from %s", len(router.rules), directory)
    return Mappings(router=router, template=template)


def _reject_unknown_files(directory: Path) -> None:
    """Raise MappingsError for a ``.toml`` file that the connector would not read."""
    for path in sorted(directory.glob("*.toml")):
        if path.name not in (ROUTING_FILE_NAME, TEMPLATES_FILE_NAME):
            raise MappingsError(
                path,
                None,
                f"unknown file; the folder may contain only {ROUTING_FILE_NAME} and "
                f"{TEMPLATES_FILE_NAME}, so rename or move this file",
            )


# --- Reading a file and finding lines -------------------------------------------------


@dataclass
class _LineEntry:
    """A line that starts a table header or a key/value pair, outside multi-line strings."""

    number: int
    header: tuple[str, ...] | None = None
    is_array_header: bool = False
    key: str | None = None


class _SourceFile:
    """A parsed TOML file, with an index of the lines where headers and keys start.

    The index is a best-effort scan for error messages. It understands headers,
    quoted names and multi-line strings, but not keys nested in inline tables.
    """

    def __init__(self, path: Path, text: str, data: dict[str, Any]) -> None:
        self.path = path
        self.text = text
        self.data = data
        self.lines = text.split("\n")
        self.entries = list(_scan_lines(self.lines))

    def error(self, line: int | None, problem: str) -> MappingsError:
        return MappingsError(self.path, line, problem)

    def section_line(self, name: str, occurrence: int = 0) -> int | None:
        """Return the line of the n-th ``[name]`` or ``[[name]]`` header, else of ``name =``."""
        headers = [entry for entry in self.entries if entry.header == (name,)]
        if occurrence < len(headers):
            return headers[occurrence].number

        return self.top_level_line(name)

    def top_level_line(self, name: str) -> int | None:
        """Return the first line that defines the top-level name as a key or a header."""
        in_top_level = True
        for entry in self.entries:
            if entry.header is not None:
                in_top_level = False
                if entry.header[0] == name:
                    return entry.number
            elif in_top_level and entry.key == name:
                return entry.number

        return None

    def key_line(self, section: str, key: str, occurrence: int = 0) -> int | None:
        """Return the line of ``key =`` in the n-th ``[section]`` table, else of the table."""
        section_start = self.section_line(section, occurrence)
        if section_start is None:
            return None

        for entry in self.entries:
            if entry.number <= section_start:
                continue
            if entry.header is not None:
                break
            if entry.key == key:
                return entry.number

        return section_start

    def starts_multiline_value(self, line: int) -> bool:
        """Return whether the value on a key line opens a multi-line string at line end.

        TOML drops the newline right after the opening quotes, so the string's first
        line is the next line of the file.
        """
        text = self.lines[line - 1]
        return re.search(r"=\s*(\"\"\"|''')\s*$", text) is not None


def _scan_lines(lines: list[str]) -> Iterable[_LineEntry]:
    """Yield the header and key lines of a TOML text, skipping multi-line string bodies."""
    open_quotes: str | None = None

    for number, line in enumerate(lines, start=1):
        if open_quotes is None:
            entry = _classify_line(line, number)
            if entry is not None:
                yield entry
        open_quotes = _quotes_open_after(line, open_quotes)


def _classify_line(line: str, number: int) -> _LineEntry | None:
    """Return the header or key that a line starts with, or None."""
    stripped = line.strip()

    if stripped.startswith("[["):
        name = stripped[2:].split("]]", 1)[0]
        return _LineEntry(number, header=_split_name(name), is_array_header=True)

    if stripped.startswith("["):
        name = stripped[1:].split("]", 1)[0]
        return _LineEntry(number, header=_split_name(name))

    match = re.match(r"""("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*[.=]""", stripped)
    if match:
        return _LineEntry(number, key=match.group(1).strip("\"'"))

    return None


def _split_name(name: str) -> tuple[str, ...]:
    """Split a dotted TOML name such as ``a."b.c"`` into its unquoted parts."""
    parts = re.findall(r""""[^"]*"|'[^']*'|[^.\s]+""", name)
    return tuple(part.strip("\"'") for part in parts)


def _quotes_open_after(line: str, open_quotes: str | None) -> str | None:
    """Return the multi-line string delimiter still open at the end of a line, if any."""
    index = 0
    while index < len(line):
        if open_quotes is not None:
            if open_quotes == '"""' and line[index] == "\\":
                index += 2
                continue
            if line.startswith(open_quotes, index):
                index += 3
                open_quotes = None
                continue
            index += 1
            continue

        character = line[index]
        if character == "#":
            break
        if line.startswith('"""', index) or line.startswith("'''", index):
            open_quotes = line[index : index + 3]
            index += 3
            continue
        if character in "\"'":
            index = _end_of_single_line_string(line, index)
            continue
        index += 1

    return open_quotes


def _end_of_single_line_string(line: str, start: int) -> int:
    """Return the index after the closing quote of the string that opens at ``start``."""
    quote = line[start]
    index = start + 1
    while index < len(line):
        if quote == '"' and line[index] == "\\":
            index += 2
            continue
        if line[index] == quote:
            return index + 1
        index += 1

    return index


def _read_source(path: Path) -> _SourceFile | None:
    """Read and parse a TOML file, or return None when it does not exist."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return None
    except IsADirectoryError as error:
        raise MappingsError(path, None, "is a folder, but must be a TOML file; remove or rename the folder") from error
    except UnicodeDecodeError as error:
        raise MappingsError(
            path, None, f"is not valid UTF-8 text ({error.reason}); save it as UTF-8"
        ) from error
    except OSError as error:
        raise MappingsError(path, None, f"cannot be read: {error.strerror}") from error

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        line, problem = _describe_toml_error(str(error), text)
        raise MappingsError(path, line, problem) from error

    return _SourceFile(path, text, data)


def _describe_toml_error(message: str, text: str) -> tuple[int | None, str]:
    """Split a tomllib message such as "Invalid value (at line 3, column 7)" into line and problem.

    tomllib in Python 3.11 ends its messages with "(at line L, column C)" or
    "(at end of document)". The latter is reported as the last line of the file.
    """
    position = TOML_POSITION_PATTERN.search(message)
    if position is not None:
        reason = _lower_first(message[: position.start()])
        return int(position.group(1)), f"invalid TOML at column {position.group(2)}: {reason}"

    end = TOML_END_PATTERN.search(message)
    if end is not None:
        reason = _lower_first(message[: end.start()])
        last_line = max(1, len(text.rstrip("\n").split("\n")))
        return last_line, f"invalid TOML at the end of the file: {reason}"

    return None, f"invalid TOML: {_lower_first(message)}"


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


# --- Checks shared by both files ------------------------------------------------------


def _unknown_key_problem(owner: str, key: str, valid: Iterable[str]) -> str:
    """Describe an unknown key, with the closest valid key and the list of valid keys."""
    valid_keys = sorted(valid)
    close = difflib.get_close_matches(key, valid_keys, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{owner} has unknown key '{key}'{hint}; valid keys: {', '.join(valid_keys)}"


def _type_name(value: Any) -> str:
    """Name a TOML value's type in the words of the TOML specification."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date or time"


def _require_text(
    value: Any, key: str, owner: str, line: int | None, source: _SourceFile, *, allow_empty: bool
) -> str:
    """Return a value that must be a string, raising MappingsError for another type."""
    example = EXAMPLE_VALUES[key]

    if not isinstance(value, str):
        raise source.error(
            line,
            f'{owner} sets {key} to {_type_name(value)}; write it as a quoted string, '
            f'such as {key} = "{example}"',
        )
    if not allow_empty and not value.strip():
        raise source.error(
            line,
            f'{owner} sets {key} to an empty string; write a value such as {key} = "{example}"',
        )

    return value


# --- routing.toml ---------------------------------------------------------------------


def _parse_routing(source: _SourceFile) -> Router:
    """Build the router from the ``[[route]]`` tables of ``routing.toml``."""
    for key in source.data:
        if key != "route":
            raise source.error(
                source.top_level_line(key), _unknown_key_problem("the file", key, ["route"])
            )

    tables = source.data.get("route", [])
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        raise source.error(
            source.section_line("route"),
            "route must be a list of tables; start each rule with a [[route]] line "
            "(two brackets)",
        )

    rules: list[RouteRule] = []
    first_with_criteria: dict[tuple[str | None, ...], int] = {}
    for index, table in enumerate(tables):
        rule = _parse_route(source, table, index)
        criteria = (
            rule.host_email.casefold() if rule.host_email else None,
            rule.host_user_id,
            rule.event_type_slug,
        )

        if criteria in first_with_criteria:
            raise source.error(
                source.section_line("route", index),
                f"route {index + 1} has the same criteria as route "
                f"{first_with_criteria[criteria]}, so it can never match; remove one of them",
            )
        first_with_criteria[criteria] = index + 1
        rules.append(rule)

    return Router(tuple(rules), rules_file=str(source.path))


def _parse_route(source: _SourceFile, table: dict[str, Any], index: int) -> RouteRule:
    """Check one ``[[route]]`` table and build its rule. ``index`` counts from 0."""
    owner = f"route {index + 1}"
    header_line = source.section_line("route", index)

    def line_of(key: str) -> int | None:
        return source.key_line("route", key, index)

    for key in table:
        if key not in ROUTE_KEYS:
            raise source.error(line_of(key), _unknown_key_problem(owner, key, ROUTE_KEYS))

    values: dict[str, str] = {}
    for key, value in table.items():
        values[key] = _require_text(value, key, owner, line_of(key), source, allow_empty=False)
        values[key] = values[key].strip()

    for key in ("host_email", "acting_user"):
        if key in values and not EMAIL_PATTERN.fullmatch(values[key]):
            raise source.error(
                line_of(key),
                f'{owner} sets {key} to "{values[key]}", which is not an email address; '
                f'write one such as {key} = "{EXAMPLE_VALUES[key]}"',
            )

    if "calendar_id" not in values:
        raise source.error(
            header_line, f'{owner} has no calendar_id; add calendar_id = "team@example.com"'
        )
    if not any(key in values for key in ROUTE_CRITERIA):
        raise source.error(
            header_line,
            f"{owner} has no match criteria; add host_email, host_user_id or event_type_slug",
        )
    if "host_user_id" in values and "host_email" not in values and "acting_user" not in values:
        raise source.error(
            header_line,
            f"{owner} matches host_user_id without host_email, so it must name the user "
            f'who writes the calendar; add acting_user = "jane@example.com"',
        )

    return RouteRule(
        calendar_id=values["calendar_id"],
        host_email=values.get("host_email"),
        host_user_id=values.get("host_user_id"),
        event_type_slug=values.get("event_type_slug"),
        acting_user=values.get("acting_user"),
    )


# --- templates.toml -------------------------------------------------------------------


def _parse_templates(source: _SourceFile) -> EventTemplate:
    """Build the event template from ``templates.toml`` over the defaults."""
    for key, value in source.data.items():
        line = source.top_level_line(key)
        if key not in TEMPLATE_SECTIONS:
            raise source.error(line, _unknown_key_problem("the file", key, TEMPLATE_SECTIONS))
        if not isinstance(value, dict):
            raise source.error(
                line,
                f"{key} must be a table; write [{key}] on its own line with its keys below",
            )

    template = EventTemplate()
    event_table = source.data.get("event", {})
    changes = _parse_section(source, "event", event_table, EVENT_KEYS)
    template = dataclasses.replace(template, **changes)

    for marker in MARKERS:
        marker_table = source.data.get(marker, {})
        changes = _parse_section(source, marker, marker_table, MARKER_KEYS)
        marker_value: StatusMarker = dataclasses.replace(template.marker(marker), **changes)
        template = dataclasses.replace(template, **{marker: marker_value})

    return template


def _parse_section(
    source: _SourceFile, section: str, table: dict[str, Any], valid_keys: tuple[str, ...]
) -> dict[str, Any]:
    """Check one table of ``templates.toml`` and return its settings as field values."""
    owner = f"[{section}]"
    changes: dict[str, Any] = {}

    def line_of(key: str) -> int | None:
        return source.key_line(section, key)

    for key, value in table.items():
        if key not in valid_keys:
            raise source.error(line_of(key), _unknown_key_problem(owner, key, valid_keys))

        if key == "color_id":
            changes[key] = _parse_color_id(source, owner, value, line_of(key))
        else:
            text = _require_text(value, key, owner, line_of(key), source, allow_empty=True)
            changes[key] = _parse_template(source, owner, key, text, line_of(key))

    return changes


def _parse_color_id(source: _SourceFile, owner: str, value: Any, line: int | None) -> str | None:
    """Return a Google event color id, or None for an empty string (the calendar's color).

    An integer such as ``8`` is accepted as well as the string ``"8"``.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)

    text = _require_text(value, "color_id", owner, line, source, allow_empty=True).strip()
    if not text:
        return None

    try:
        return validate_color_id(text)
    except ValueError as error:
        raise source.error(line, f"{owner} {error}") from error


def _parse_template(
    source: _SourceFile, owner: str, key: str, text: str, key_line: int | None
) -> Template:
    """Parse a template string, pointing a syntax error at its line in the file."""
    try:
        template = Template.parse(text)
    except TemplateSyntaxError as error:
        line = key_line
        if key_line is not None:
            opening_newline = 1 if source.starts_multiline_value(key_line) else 0
            line = key_line + opening_newline + error.line - 1
        raise source.error(
            line,
            f"{owner} {key} has an invalid placeholder at column {error.column}: "
            f"{error.problem}",
        ) from error

    _warn_about_unknown_fields(source, owner, key, template, key_line)
    return template


def _warn_about_unknown_fields(
    source: _SourceFile, owner: str, key: str, template: Template, line: int | None
) -> None:
    """Log a warning for each placeholder whose first name is not a known booking field.

    Such a placeholder is valid, because Proximity may add fields, but it is often a typo
    and renders as empty text for every booking that lacks the field.
    """
    for placeholder in template.placeholders:
        if placeholder.path[0] not in KNOWN_PAYLOAD_FIELDS:
            logger.warning(
                "%s, line %s: %s %s uses {%s}, which is not a known Proximity booking field; "
                "it renders as empty text unless the booking has that field",
                source.path,
                line,
                owner,
                key,
                ".".join(placeholder.path),
            )

