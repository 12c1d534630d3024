"""Tests for event templates, status markers, and loading ``templates.toml``."""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from connector.mappings import MappingsError, load_mappings
from connector.operator.send_test import SAMPLE_BOOKING
from connector.templates import (
    EventTemplate,
    Placeholder,
    RenderedText,
    StatusMarker,
    Template,
    TemplateSyntaxError,
    format_value,
)

SHIPPED_MAPPINGS = Path(__file__).resolve().parent.parent / "mappings"

# The documented sample booking, with notes whose rendering the description tests check.
BOOKING: dict[str, Any] = {
    **SAMPLE_BOOKING,
    "invitee": {**SAMPLE_BOOKING["invitee"], "notes": "Wants to talk about pricing."},
}

DEFAULT_DESCRIPTION = (
    "Email: alex@example.com\n"
    "Phone: +1-555-0123\n"
    "Time zone: America/New_York\n"
    "Location: https://meet.google.com/abc-defg-hij\n"
    "Company: Acme Inc.\n"
    "Role: Engineering Manager\n"
    "Notes: Wants to talk about pricing."
)


def booking(**changes: Any) -> dict[str, Any]:
    """Return a copy of the example booking with some top-level fields replaced."""
    payload = copy.deepcopy(BOOKING)
    payload.update(changes)
    return payload


def render(source: str, payload: dict[str, Any], *, drop_empty_lines: bool = False) -> str:
    return Template.parse(source).render(payload, drop_empty_lines=drop_empty_lines)


def write_templates(directory: Path, text: str) -> Path:
    """Write ``templates.toml`` into a mappings folder and return the folder."""
    directory.mkdir(exist_ok=True)
    (directory / "templates.toml").write_text(text, encoding="utf-8")
    return directory


def load_template(directory: Path) -> EventTemplate:
    return load_mappings(directory).template


# --- Placeholders -------------------------------------------------------------------


def test_top_level_placeholder() -> None:
    assert render("{eventTypeName}", BOOKING) == "30 Minute Call"


def test_dotted_placeholder() -> None:
    assert render("{invitee.name} <{invitee.email}>", BOOKING) == (
        "Alex Johnson <alex@example.com>"
    )
    assert render("{customFields.company}", BOOKING) == "Acme Inc."
    assert render("{location.value}", BOOKING) == "https://meet.google.com/abc-defg-hij"


def test_placeholder_tolerates_spaces_inside_braces() -> None:
    assert render("{ invitee.name }", BOOKING) == "Alex Johnson"


def test_non_ascii_and_emoji() -> None:
    payload = booking(
        eventTypeName="Kaffee-Gespräch ☕",
        invitee={"name": "Zoë Ångström 🚀", "email": "zoë@exämple.com"},
        customFields={"société": "Café Crème 🥐", "部署": "開発"},
    )

    rendered = EventTemplate().render(payload)

    assert rendered.summary == "Kaffee-Gespräch ☕ with Zoë Ångström 🚀"
    assert "Email: zoë@exämple.com" in rendered.description.split("\n")
    assert "Société: Café Crème 🥐" in rendered.description.split("\n")
    assert "部署: 開発" in rendered.description.split("\n")


def test_emoji_in_template_text() -> None:
    assert render("📞 {invitee.phone} ✅", BOOKING) == "📞 +1-555-0123 ✅"


def test_missing_field_renders_empty() -> None:
    assert render("[{invitee.middleName}]", BOOKING) == "[]"
    assert render("[{notAField}]", BOOKING) == "[]"
    assert render("[{invitee.name.first}]", BOOKING) == "[]"


def test_null_field_renders_empty() -> None:
    assert render("[{cancellationReason}]", BOOKING) == "[]"
    assert render("[{invitee.name}]", booking(invitee=None)) == "[]"


def test_missing_parent_object_renders_empty() -> None:
    payload = booking()
    del payload["invitee"]

    assert render("[{invitee.name}]", payload) == "[]"


def test_value_types() -> None:
    assert format_value(None) == ""
    assert format_value(True) == "yes"
    assert format_value(False) == "no"
    assert format_value(12) == "12"
    assert format_value(2.5) == "2.5"
    assert format_value("  padded  ") == "padded"
    assert format_value(["a", "", None, "b"]) == "a, b"
    assert format_value({}) == ""


def test_literal_braces() -> None:
    assert render("{{not a placeholder}}", BOOKING) == "{not a placeholder}"
    assert render("{{{invitee.name}}}", BOOKING) == "{Alex Johnson}"
    assert render("a {{ b }} c", BOOKING) == "a { b } c"
    assert render("{{}}", BOOKING) == "{}"


def test_literal_brace_line_is_not_dropped() -> None:
    assert render("{{literal}}\n{invitee.fax}", BOOKING, drop_empty_lines=True) == "{literal}"


def test_placeholders_listed_in_order() -> None:
    template = Template.parse("{a.b} and {{c}} and {d}")

    assert template.placeholders == (Placeholder(("a", "b")), Placeholder(("d",)))


SYNTAX_ERRORS = [
    pytest.param("Call with {invitee.name", 1, 11, "never closed", id="unclosed"),
    pytest.param("Call } with", 1, 6, "no matching '{'", id="stray-closing"),
    pytest.param("line one\nempty {} here", 2, 7, "empty placeholder", id="empty"),
    pytest.param("{invitee.{name}}", 1, 1, "never closed", id="nested"),
    pytest.param("{invitee..name}", 1, 1, "empty name between dots", id="empty-part"),
    pytest.param("{.name}", 1, 1, "empty name between dots", id="leading-dot"),
    pytest.param("{a\n}", 1, 1, "never closed", id="across-lines"),
]


@pytest.mark.parametrize(("source", "line", "column", "problem"), SYNTAX_ERRORS)
def test_template_syntax_error(source: str, line: int, column: int, problem: str) -> None:
    with pytest.raises(TemplateSyntaxError) as caught:
        Template.parse(source)

    assert caught.value.line == line
    assert caught.value.column == column
    assert problem in caught.value.problem


# --- Dropped lines ------------------------------------------------------------------


def test_line_with_only_empty_placeholders_is_dropped() -> None:
    source = "Email: {invitee.email}\nPhone: {invitee.phone}\nEnd"
    payload = booking(invitee={"email": "alex@example.com", "phone": None})

    assert render(source, payload, drop_empty_lines=True) == "Email: alex@example.com\nEnd"


def test_line_with_one_of_two_values_is_kept() -> None:
    source = "Contact: {invitee.email} {invitee.phone}"
    payload = booking(invitee={"email": "alex@example.com"})

    assert render(source, payload, drop_empty_lines=True) == "Contact: alex@example.com "


def test_literal_line_and_blank_line_are_kept() -> None:
    source = "Booked via Proximity\n\n{invitee.fax}\nBye"

    assert render(source, BOOKING, drop_empty_lines=True) == "Booked via Proximity\n\nBye"


def test_empty_lines_kept_without_dropping() -> None:
    assert render("A\nPhone: {invitee.fax}", BOOKING) == "A\nPhone: "


def test_default_description() -> None:
    assert EventTemplate().render(BOOKING).description == DEFAULT_DESCRIPTION


def test_default_description_without_optional_fields() -> None:
    payload = booking(
        invitee={"name": "Alex Johnson", "email": "alex@example.com", "phone": None},
        location=None,
    )
    del payload["customFields"]

    description = EventTemplate().render(payload).description

    assert description == "Email: alex@example.com"


def test_default_description_with_empty_payload() -> None:
    rendered = EventTemplate().render({})

    assert rendered == RenderedText(summary="with", description="", location="", color_id=None)


# --- Custom fields ------------------------------------------------------------------


def test_custom_fields_expand_to_lines() -> None:
    payload = booking(customFields={"company": "Acme Inc.", "teamSize": 12, "newsletter": True})

    assert render("{customFields}", payload) == "Company: Acme Inc.\nTeamSize: 12\nNewsletter: yes"


def test_custom_fields_skip_empty_values() -> None:
    payload = booking(customFields={"company": "", "role": None, "referrer": "Podcast"})

    assert render("{customFields}", payload) == "Referrer: Podcast"


def test_custom_field_list_value() -> None:
    payload = booking(customFields={"topics": ["pricing", "security"]})

    assert render("{customFields}", payload) == "Topics: pricing, security"


def test_empty_custom_fields_line_is_dropped() -> None:
    source = "Before\n{customFields}\nAfter"

    for custom_fields in ({}, None, {"company": ""}):
        payload = booking(customFields=custom_fields)
        assert render(source, payload, drop_empty_lines=True) == "Before\nAfter"


def test_custom_fields_with_prefix_text() -> None:
    payload = booking(customFields={"company": "Acme Inc.", "role": "CTO"})

    assert render("Answers:\n{customFields}", payload) == "Answers:\nCompany: Acme Inc.\nRole: CTO"


# --- Event text ---------------------------------------------------------------------


def test_default_summary() -> None:
    assert EventTemplate().render(BOOKING).summary == "30 Minute Call with Alex Johnson"


def test_summary_without_invitee_name() -> None:
    assert EventTemplate().render(booking(invitee={})).summary == "30 Minute Call with"


def test_default_location() -> None:
    assert EventTemplate().render(BOOKING).location == "https://meet.google.com/abc-defg-hij"


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ({"type": "Zoom", "value": "https://zoom.us/j/123"}, "https://zoom.us/j/123"),
        ({"type": "Phone", "value": "+1-555-0100"}, "+1-555-0100"),
        ({"type": "InPerson", "value": "Main St 1\nSpringfield"}, "Main St 1 Springfield"),
        ({"type": "Custom"}, ""),
        (None, ""),
    ],
)
def test_location_field(location: Any, expected: str) -> None:
    assert EventTemplate().render(booking(location=location)).location == expected


def test_summary_is_one_line() -> None:
    template = EventTemplate(summary=Template.parse("{invitee.notes}"))
    payload = booking(invitee={"notes": "first line\n  second line"})

    assert template.render(payload).summary == "first line second line"


def test_notes_keep_their_line_breaks_in_description() -> None:
    payload = booking(invitee={"notes": "first line\nsecond line"})

    description = EventTemplate().render(payload).description

    assert description.endswith("\nNotes: first line\nsecond line")


def test_no_marker_has_no_color() -> None:
    assert EventTemplate().render(BOOKING).color_id is None


def test_render_does_not_change_payload() -> None:
    payload = booking()

    EventTemplate().render(payload, "no_show")

    assert payload == BOOKING


# --- Status markers -----------------------------------------------------------------


def test_no_show_marker() -> None:
    rendered = EventTemplate().render(BOOKING, "no_show")

    assert rendered.summary == "No-show: 30 Minute Call with Alex Johnson"
    assert rendered.color_id == "8"
    assert rendered.description == "Marked as a no-show in Proximity.\n\n" + DEFAULT_DESCRIPTION
    assert rendered.location == "https://meet.google.com/abc-defg-hij"


def test_completed_marker() -> None:
    rendered = EventTemplate().render(BOOKING, "completed")

    assert rendered.summary == "Completed: 30 Minute Call with Alex Johnson"
    assert rendered.color_id == "2"
    assert rendered.description.startswith("Marked as completed in Proximity.\n\n")


def test_pending_marker() -> None:
    rendered = EventTemplate().render(BOOKING, "pending")

    assert rendered.summary == "Pending: 30 Minute Call with Alex Johnson"
    assert rendered.color_id is None
    assert rendered.description.startswith("Waiting for the host's approval in Proximity.\n\n")


def test_unknown_marker_is_rejected() -> None:
    with pytest.raises(ValueError, match="no_show, completed, pending"):
        EventTemplate().render(BOOKING, "cancelled")  # type: ignore[arg-type]


def test_marker_note_alone_when_description_empty() -> None:
    template = EventTemplate(description=Template.parse("{invitee.fax}"))

    assert template.render(BOOKING, "no_show").description == "Marked as a no-show in Proximity."


def test_marker_color_replaces_event_color() -> None:
    template = EventTemplate(color_id="5")

    assert template.render(BOOKING).color_id == "5"
    assert template.render(BOOKING, "no_show").color_id == "8"
    assert template.render(BOOKING, "pending").color_id == "5"


def test_marker_texts_take_placeholders() -> None:
    marker = StatusMarker(
        summary_prefix=Template.parse("[{status}] "),
        description_note=Template.parse("Reason: {cancellationReason}\nBy {hostName}"),
    )
    template = EventTemplate(no_show=marker)

    rendered = template.render(booking(status="NoShow"), "no_show")

    assert rendered.summary == "[NoShow] 30 Minute Call with Alex Johnson"
    assert rendered.description.startswith("By Jane Doe\n\n")
    assert rendered.color_id is None


@pytest.mark.parametrize("color_id", ["0", "12", "red", "08", ""])
def test_invalid_color_id_is_rejected(color_id: str) -> None:
    with pytest.raises(ValueError, match='"1" to "11"'):
        StatusMarker(color_id=color_id)


# --- Loading templates.toml ---------------------------------------------------------


def test_shipped_templates_file_behaves_as_default() -> None:
    template = load_mappings(SHIPPED_MAPPINGS).template

    assert template == EventTemplate()
    for marker in (None, "no_show", "completed", "pending"):
        assert template.render(BOOKING, marker) == EventTemplate().render(BOOKING, marker)


def test_shipped_templates_examples_equal_defaults(tmp_path: Path) -> None:
    text = (SHIPPED_MAPPINGS / "templates.toml").read_text(encoding="utf-8")
    uncommented = re.sub(r"(?m)^#(?=\S)", "", text)
    directory = write_templates(tmp_path / "mappings", uncommented)

    mappings = load_mappings(directory)

    assert "[event]" in uncommented.split("\n")
    assert mappings.template == EventTemplate()


def test_missing_templates_file_gives_defaults(tmp_path: Path) -> None:
    assert load_template(tmp_path) == EventTemplate()


def test_templates_file_overrides_one_key(tmp_path: Path) -> None:
    directory = write_templates(tmp_path / "mappings", '[event]\nsummary = "{eventTypeName}"\n')

    template = load_template(directory)

    assert template.render(BOOKING).summary == "30 Minute Call"
    assert template.description == EventTemplate().description
    assert template.no_show == EventTemplate().no_show


def test_templates_file_multiline_description(tmp_path: Path) -> None:
    text = '[event]\ndescription = """\nWho: {invitee.name}\nFax: {invitee.fax}\nSee you!"""\n'
    directory = write_templates(tmp_path / "mappings", text)

    rendered = load_template(directory).render(BOOKING)

    assert rendered.description == "Who: Alex Johnson\nSee you!"


def test_templates_file_marker_settings(tmp_path: Path) -> None:
    text = (
        "[no_show]\n"
        'summary_prefix = "❌ "\n'
        "color_id = 11\n"
        'description_note = ""\n'
        "\n"
        "[completed]\n"
        'color_id = ""\n'
    )
    directory = write_templates(tmp_path / "mappings", text)

    template = load_template(directory)
    no_show = template.render(BOOKING, "no_show")
    completed = template.render(BOOKING, "completed")

    assert no_show.summary == "❌ 30 Minute Call with Alex Johnson"
    assert no_show.color_id == "11"
    assert no_show.description == DEFAULT_DESCRIPTION
    assert completed.summary == "Completed: 30 Minute Call with Alex Johnson"
    assert completed.color_id is None


def test_templates_file_event_color(tmp_path: Path) -> None:
    directory = write_templates(tmp_path / "mappings", '[event]\ncolor_id = "7"\n')

    template = load_template(directory)

    assert template.render(BOOKING).color_id == "7"
    assert template.render(BOOKING, "no_show").color_id == "8"


def test_unknown_placeholder_name_logs_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = write_templates(tmp_path / "mappings", '[event]\nsummary = "{invitees.name}"\n')

    with caplog.at_level(logging.WARNING, logger="connector.mappings"):
        load_template(directory)

    assert "line 2" in caplog.text
    assert "{invitees.name}" in caplog.text


def test_known_placeholder_names_log_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = (SHIPPED_MAPPINGS / "templates.toml").read_text(encoding="utf-8")
    directory = write_templates(tmp_path / "mappings", re.sub(r"(?m)^#(?=\S)", "", text))

    with caplog.at_level(logging.WARNING, logger="connector.mappings"):
        load_template(directory)

    assert caplog.records == []


MALFORMED_TEMPLATES = [
    pytest.param(
        '[event]\nsummary = "{eventTypeName"\n',
        2,
        "[event] summary has an invalid placeholder at column 1: '{' is never closed",
        id="unclosed-brace-in-summary",
    ),
    pytest.param(
        '[event]\nsummary = "a } b"\n',
        2,
        "[event] summary has an invalid placeholder at column 3: '}' has no matching '{'",
        id="stray-brace-in-summary",
    ),
    pytest.param(
        '[event]\ndescription = """\nEmail: {invitee.email}\nPhone: {invitee.phone\n"""\n',
        4,
        "[event] description has an invalid placeholder at column 8",
        id="unclosed-brace-in-multiline-description",
    ),
    pytest.param(
        '[event]\ndescription = """Email: {invitee.email}\nNotes: {}"""\n',
        3,
        "empty placeholder",
        id="empty-placeholder-on-second-line",
    ),
    pytest.param(
        '[no_show]\nsummary_prefix = "No-show {"\n',
        2,
        "[no_show] summary_prefix has an invalid placeholder",
        id="brace-in-marker-prefix",
    ),
    pytest.param(
        '[no-show]\ncolor_id = "8"\n',
        1,
        "the file has unknown key 'no-show' (did you mean 'no_show'?); valid keys: "
        "completed, event, no_show, pending",
        id="unknown-section",
    ),
    pytest.param(
        'summary = "{eventTypeName}"\n',
        1,
        "the file has unknown key 'summary'",
        id="key-outside-section",
    ),
    pytest.param(
        '[event]\nsumary = "{eventTypeName}"\n',
        2,
        "[event] has unknown key 'sumary' (did you mean 'summary'?); valid keys: "
        "color_id, description, location, summary",
        id="unknown-event-key",
    ),
    pytest.param(
        '[completed]\nsummary = "Done"\n',
        2,
        "[completed] has unknown key 'summary' (did you mean 'summary_prefix'?); valid keys: "
        "color_id, description_note, summary_prefix",
        id="unknown-marker-key",
    ),
    pytest.param(
        '[event]\nsummary = 3\n',
        2,
        "[event] sets summary to an integer; write it as a quoted string",
        id="summary-integer",
    ),
    pytest.param(
        '[pending]\ndescription_note = ["a", "b"]\n',
        2,
        "[pending] sets description_note to an array",
        id="note-array",
    ),
    pytest.param(
        '[no_show]\ncolor_id = "12"\n',
        2,
        '[no_show] color_id "12" is not a Google Calendar event color; use "1" to "11"',
        id="color-too-high",
    ),
    pytest.param(
        '[event]\nlocation = "{location.value}"\ncolor_id = "0"\n',
        3,
        '[event] color_id "0" is not a Google Calendar event color',
        id="color-zero",
    ),
    pytest.param(
        '[completed]\ncolor_id = true\n',
        2,
        "[completed] sets color_id to a boolean",
        id="color-boolean",
    ),
    pytest.param(
        '[completed]\ncolor_id = 2.0\n',
        2,
        "[completed] sets color_id to a float",
        id="color-float",
    ),
    pytest.param(
        'event = "{eventTypeName}"\n',
        1,
        "event must be a table; write [event] on its own line with its keys below",
        id="section-not-table",
    ),
    pytest.param(
        '[event]\nsummary = "x"\n[event]\nlocation = "y"\n',
        3,
        "invalid TOML at column",
        id="section-twice",
    ),
    pytest.param(
        '[event\nsummary = "x"\n',
        1,
        "invalid TOML at column",
        id="unclosed-header",
    ),
]


@pytest.mark.parametrize(("text", "line", "problem"), MALFORMED_TEMPLATES)
def test_malformed_templates_file(tmp_path: Path, text: str, line: int, problem: str) -> None:
    directory = write_templates(tmp_path / "mappings", text)

    with pytest.raises(MappingsError) as caught:
        load_mappings(directory)

    error = caught.value
    assert error.path == directory / "templates.toml"
    assert error.line == line
    assert problem in error.problem
    assert str(error).startswith(f"{directory / 'templates.toml'}, line {line}: ")


def test_template_error_reads_as_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_templates(tmp_path / "mappings", '# Event text\n[event]\nsummary = "{invitee.name"\n')
    monkeypatch.chdir(tmp_path)

    with pytest.raises(MappingsError) as caught:
        load_mappings(Path("mappings"))

    assert str(caught.value) == (
        "mappings/templates.toml, line 3: [event] summary has an invalid placeholder at "
        "column 1: '{' is never closed; write '{{' for a literal brace"
    )
