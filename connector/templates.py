"""Event text built from a booking payload: summary, description, location and color.

A template is plain text with placeholders. ``{invitee.name}`` is a dotted path into the
booking payload, and ``{{`` and ``}}`` are literal braces. A path that is missing or
null renders as empty text. A placeholder that names an object, such as
``{customFields}``, expands to one "Key: value" line per non-empty member, and a list
renders as its items joined by commas.

In a description, a template line that contains placeholders and renders none of them
non-empty is dropped, so a booking without a phone gets no "Phone: " line.

Status markers change the event of a booking that Proximity marks as a no-show, as
completed or as waiting for approval: a summary prefix, a color and a note at the top
of the description. Rendering is pure and performs no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Marker = Literal["no_show", "completed", "pending"]

MARKERS: tuple[Marker, ...] = ("no_show", "completed", "pending")

# Google Calendar API v3 defines event colors "1" to "11" (see the colors.get method).
EVENT_COLOR_IDS = frozenset(str(number) for number in range(1, 12))

DEFAULT_SUMMARY = "{eventTypeName} with {invitee.name}"

DEFAULT_DESCRIPTION = "\n".join(
    [
        "Email: {invitee.email}",
        "Phone: {invitee.phone}",
        "Time zone: {invitee.timezone}",
        "Location: {location.value}",
        "{customFields}",
        "Notes: {invitee.notes}",
    ]
)

DEFAULT_LOCATION = "{location.value}"

# Top-level fields of a Proximity booking payload. A placeholder whose first name part is
# not listed here is still valid, because Proximity may add fields, but it is likely a typo.
KNOWN_PAYLOAD_FIELDS = frozenset(
    {
        "id",
        "eventTypeId",
        "eventTypeName",
        "eventTypeSlug",
        "status",
        "startTime",
        "endTime",
        "hostUserId",
        "hostName",
        "hostEmail",
        "invitee",
        "location",
        "customFields",
        "source",
        "createdAt",
        "cancelledAt",
        "cancellationReason",
        "rescheduledFrom",
    }
)


class TemplateSyntaxError(ValueError):
    """A template text with an unbalanced brace or an invalid placeholder.

    ``line`` and ``column`` are 1-based positions inside the template text.
    """

    def __init__(self, problem: str, line: int, column: int) -> None:
        super().__init__(f"{problem} (template line {line}, column {column})")
        self.problem = problem
        self.line = line
        self.column = column


@dataclass(frozen=True)
class Placeholder:
    """A dotted path into the booking payload, such as ``("invitee", "name")``."""

    path: tuple[str, ...]

    def resolve(self, payload: Mapping[str, Any]) -> Any:
        """Return the value at the path, or None where a part is missing or not an object."""
        value: Any = payload
        for name in self.path:
            if not isinstance(value, Mapping):
                return None
            value = value.get(name)

        return value


TemplateLine = tuple[str | Placeholder, ...]


@dataclass(frozen=True)
class Template:
    """A parsed template text: per line, the literal text and placeholders in order."""

    source: str
    lines: tuple[TemplateLine, ...]

    @classmethod
    def parse(cls, source: str) -> Template:
        """Parse template text, raising TemplateSyntaxError for a brace it cannot pair."""
        lines = tuple(
            _parse_line(text, number) for number, text in enumerate(source.split("\n"), start=1)
        )
        return cls(source=source, lines=lines)

    @property
    def placeholders(self) -> tuple[Placeholder, ...]:
        """All placeholders of the template, in order of appearance."""
        return tuple(part for line in self.lines for part in line if isinstance(part, Placeholder))

    def render(self, payload: Mapping[str, Any], *, drop_empty_lines: bool = False) -> str:
        """Fill in the placeholders from the payload.

        With ``drop_empty_lines``, a line that has placeholders and none of them rendered
        to non-empty text is left out.
        """
        rendered_lines = []
        for line in self.lines:
            texts = []
            has_placeholder = False
            has_value = False
            for part in line:
                if isinstance(part, Placeholder):
                    value_text = format_value(part.resolve(payload))
                    has_placeholder = True
                    has_value = has_value or value_text != ""
                    texts.append(value_text)
                else:
                    texts.append(part)

            if drop_empty_lines and has_placeholder and not has_value:
                continue
            rendered_lines.append("".join(texts))

        return "\n".join(rendered_lines)


def _parse_line(text: str, line_number: int) -> TemplateLine:
    """Split one template line into literal text and placeholders."""
    parts: list[str | Placeholder] = []
    literal: list[str] = []
    index = 0

    while index < len(text):
        character = text[index]
        column = index + 1

        if text.startswith("{{", index) or text.startswith("}}", index):
            literal.append(character)
            index += 2
            continue

        if character == "}":
            raise TemplateSyntaxError(
                "'}' has no matching '{'; write '}}' for a literal brace", line_number, column
            )

        if character == "{":
            end = text.find("}", index + 1)
            opening = text.find("{", index + 1)
            if end == -1 or (opening != -1 and opening < end):
                raise TemplateSyntaxError(
                    "'{' is never closed; write '{{' for a literal brace", line_number, column
                )
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(_parse_placeholder(text[index + 1 : end], line_number, column))
            index = end + 1
            continue

        literal.append(character)
        index += 1

    if literal:
        parts.append("".join(literal))
    return tuple(parts)


def _parse_placeholder(name: str, line_number: int, column: int) -> Placeholder:
    """Turn the text between braces into a placeholder path."""
    path = tuple(part.strip() for part in name.strip().split("."))

    if path == ("",):
        raise TemplateSyntaxError(
            "empty placeholder '{}'; name a payload field such as {invitee.name}, "
            "or write '{{}}' for literal braces",
            line_number,
            column,
        )
    if "" in path:
        raise TemplateSyntaxError(
            f"placeholder {{{name}}} has an empty name between dots", line_number, column
        )
    return Placeholder(path)


def format_value(value: Any) -> str:
    """Render one payload value as text, where None and empty values become empty text.

    Booleans render as "yes" or "no". An object renders as "Key: value" lines with the
    first letter of each key capitalized, skipping empty members, and a list renders as
    its non-empty items joined by ", ".
    """
    if value is None:
        return ""

    if isinstance(value, bool):
        return "yes" if value else "no"

    if isinstance(value, str):
        return value.strip()

    if isinstance(value, Mapping):
        lines = []
        for key, member in value.items():
            member_text = format_value(member)
            if member_text:
                lines.append(f"{_capitalize(str(key))}: {member_text}")
        return "\n".join(lines)

    if isinstance(value, Sequence):
        item_texts = (format_value(item) for item in value)
        return ", ".join(text for text in item_texts if text)

    return str(value)


def _capitalize(key: str) -> str:
    """Upper-case the first letter only, so "jobTitle" becomes "JobTitle", not "Jobtitle"."""
    return key[:1].upper() + key[1:]


def _single_line(text: str) -> str:
    """Join the lines of a text with spaces, for the one-line summary and location."""
    return re.sub(r"\s*\n\s*", " ", text).strip()


def validate_color_id(color_id: str) -> str:
    """Return the Google event color id unchanged, or raise ValueError naming the valid ids."""
    if color_id not in EVENT_COLOR_IDS:
        raise ValueError(
            f'color_id "{color_id}" is not a Google Calendar event color; '
            'use "1" to "11", or "" for the calendar\'s own color'
        )
    return color_id


@dataclass(frozen=True)
class StatusMarker:
    """The changes that a status makes to an event: summary prefix, color and description note."""

    summary_prefix: Template = field(default_factory=lambda: Template.parse(""))
    color_id: str | None = None
    description_note: Template = field(default_factory=lambda: Template.parse(""))

    def __post_init__(self) -> None:
        if self.color_id is not None:
            validate_color_id(self.color_id)


@dataclass(frozen=True)
class RenderedText:
    """The text fields of a calendar event. An empty string or None leaves a field unset."""

    summary: str
    description: str
    location: str
    color_id: str | None


def _default_no_show() -> StatusMarker:
    return StatusMarker(
        summary_prefix=Template.parse("No-show: "),
        color_id="8",
        description_note=Template.parse("Marked as a no-show in Proximity."),
    )


def _default_completed() -> StatusMarker:
    return StatusMarker(
        summary_prefix=Template.parse("Completed: "),
        color_id="2",
        description_note=Template.parse("Marked as completed in Proximity."),
    )


def _default_pending() -> StatusMarker:
    return StatusMarker(
        summary_prefix=Template.parse("Pending: "),
        color_id=None,
        description_note=Template.parse("Waiting for the host's approval in Proximity."),
    )


@dataclass(frozen=True)
class EventTemplate:
    """The templates for an event's text fields, and the marker for each status.

    ``color_id`` applies to every event. A marker's own color, where set, replaces it.
    """

    summary: Template = field(default_factory=lambda: Template.parse(DEFAULT_SUMMARY))
    description: Template = field(default_factory=lambda: Template.parse(DEFAULT_DESCRIPTION))
    location: Template = field(default_factory=lambda: Template.parse(DEFAULT_LOCATION))
    color_id: str | None = None
    no_show: StatusMarker = field(default_factory=_default_no_show)
    completed: StatusMarker = field(default_factory=_default_completed)
    pending: StatusMarker = field(default_factory=_default_pending)

    def __post_init__(self) -> None:
        if self.color_id is not None:
            validate_color_id(self.color_id)

    def marker(self, name: Marker) -> StatusMarker:
        """Return the marker called ``name``, or raise ValueError for a name not in MARKERS."""
        if name not in MARKERS:
            raise ValueError(f"unknown marker {name!r}; valid markers are {', '.join(MARKERS)}")
        return getattr(self, name)

    def render(self, payload: Mapping[str, Any], marker: Marker | None = None) -> RenderedText:
        """Render the event text for a booking, with the status marker if one is given."""
        summary = self.summary.render(payload)
        description = self.description.render(payload, drop_empty_lines=True).strip("\n")
        location = _single_line(self.location.render(payload))
        color_id = self.color_id

        if marker is not None:
            status = self.marker(marker)
            summary = status.summary_prefix.render(payload) + summary
            note = status.description_note.render(payload, drop_empty_lines=True).strip("\n")
            if note and description:
                description = f"{note}\n\n{description}"
            elif note:
                description = note
            if status.color_id is not None:
                color_id = status.color_id

        return RenderedText(
            summary=_single_line(summary),
            description=description,
            location=location,
            color_id=color_id,
        )
