"""Tests for routing rules, the router, and loading ``routing.toml``."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from connector.calendars.base import Target
from connector.mappings import Mappings, MappingsError, load_mappings
from connector.routing import NoRouteError, Router, RouteRule

SHIPPED_MAPPINGS = Path(__file__).resolve().parent.parent / "mappings"

BOOKING: dict[str, Any] = {
    "id": "bkg_xyz789",
    "eventTypeId": "evt_abc123",
    "eventTypeName": "30 Minute Call",
    "eventTypeSlug": "30min-call",
    "status": "Confirmed",
    "startTime": "2026-03-16T14:00:00Z",
    "endTime": "2026-03-16T14:30:00Z",
    "hostUserId": "usr_host123",
    "hostName": "Jane Doe",
    "hostEmail": "jane@example.com",
    "invitee": {"name": "Alex Johnson", "email": "alex@example.com"},
    "location": {"type": "GoogleMeet", "value": "https://meet.google.com/abc-defg-hij"},
    "customFields": {"company": "Acme Inc."},
    "source": "BookingPage",
    "createdAt": "2026-03-16T14:05:00Z",
    "cancelledAt": None,
    "cancellationReason": None,
    "rescheduledFrom": None,
}


def booking(**changes: Any) -> dict[str, Any]:
    """Return a copy of the example booking with some top-level fields replaced."""
    payload = copy.deepcopy(BOOKING)
    payload.update(changes)
    return payload


def write_routing(directory: Path, text: str) -> Path:
    """Write ``routing.toml`` into a mappings folder and return the folder."""
    directory.mkdir(exist_ok=True)
    (directory / "routing.toml").write_text(text, encoding="utf-8")
    return directory


def load_error(directory: Path) -> MappingsError:
    """Load a mappings folder that must be invalid and return the error."""
    with pytest.raises(MappingsError) as caught:
        load_mappings(directory)
    return caught.value


# --- Router -------------------------------------------------------------------------


def test_default_route_is_host_calendar() -> None:
    target = Router().route(booking())

    assert target == Target(calendar_id="jane@example.com", acting_user="jane@example.com")


def test_default_route_ignores_rule_that_does_not_match() -> None:
    router = Router([RouteRule(calendar_id="team@example.com", host_email="bob@example.com")])

    target = router.route(booking())

    assert target.calendar_id == "jane@example.com"
    assert target.acting_user == "jane@example.com"


def test_rule_by_email_is_case_insensitive() -> None:
    router = Router([RouteRule(calendar_id="team@example.com", host_email="JANE@Example.COM")])

    assert router.route(booking()).calendar_id == "team@example.com"
    assert router.route(booking(hostEmail="Jane@EXAMPLE.com")).calendar_id == "team@example.com"


def test_rule_by_user_id() -> None:
    router = Router([RouteRule(calendar_id="team@example.com", host_user_id="usr_host123")])

    assert router.route(booking()).calendar_id == "team@example.com"


def test_rule_by_user_id_is_case_sensitive() -> None:
    router = Router([RouteRule(calendar_id="team@example.com", host_user_id="USR_HOST123")])

    assert router.route(booking()).calendar_id == "jane@example.com"


def test_rule_by_slug() -> None:
    router = Router([RouteRule(calendar_id="demos@example.com", event_type_slug="30min-call")])

    assert router.route(booking()).calendar_id == "demos@example.com"
    assert router.route(booking(eventTypeSlug="other")).calendar_id == "jane@example.com"


def test_rule_with_all_criteria_needs_all_to_match() -> None:
    rule = RouteRule(
        calendar_id="team@example.com",
        host_email="jane@example.com",
        event_type_slug="30min-call",
    )

    assert rule.matches(booking())
    assert not rule.matches(booking(eventTypeSlug="60min-call"))
    assert not rule.matches(booking(hostEmail="bob@example.com"))
    assert not rule.matches(booking(hostEmail=None))


def test_host_and_slug_beats_host_only() -> None:
    host_only = RouteRule(calendar_id="host-only@example.com", host_email="jane@example.com")
    host_and_slug = RouteRule(
        calendar_id="host-and-slug@example.com",
        host_email="jane@example.com",
        event_type_slug="30min-call",
    )

    assert Router([host_only, host_and_slug]).route(booking()).calendar_id == (
        "host-and-slug@example.com"
    )
    assert Router([host_and_slug, host_only]).route(booking()).calendar_id == (
        "host-and-slug@example.com"
    )


def test_first_of_equal_rules_wins() -> None:
    by_slug = RouteRule(calendar_id="by-slug@example.com", event_type_slug="30min-call")
    by_host = RouteRule(calendar_id="by-host@example.com", host_user_id="usr_host123")

    assert Router([by_slug, by_host]).route(booking()).calendar_id == "by-slug@example.com"
    assert Router([by_host, by_slug]).route(booking()).calendar_id == "by-host@example.com"


def test_find_rule_returns_winning_rule() -> None:
    rule = RouteRule(calendar_id="demos@example.com", event_type_slug="30min-call")
    router = Router([rule])

    assert router.find_rule(booking()) is rule
    assert router.find_rule(booking(eventTypeSlug="other")) is None


def test_acting_user_defaults_to_host_email() -> None:
    router = Router([RouteRule(calendar_id="team@example.com", event_type_slug="30min-call")])

    target = router.route(booking())

    assert target == Target(calendar_id="team@example.com", acting_user="jane@example.com")


def test_acting_user_explicit() -> None:
    rule = RouteRule(
        calendar_id="team@example.com",
        event_type_slug="30min-call",
        acting_user="assistant@example.com",
    )

    target = Router([rule]).route(booking())

    assert target == Target(calendar_id="team@example.com", acting_user="assistant@example.com")


def test_host_without_email_routed_by_user_id() -> None:
    rule = RouteRule(
        calendar_id="shared@example.com",
        host_user_id="usr_host123",
        acting_user="assistant@example.com",
    )

    target = Router([rule]).route(booking(hostEmail=None))

    assert target == Target(calendar_id="shared@example.com", acting_user="assistant@example.com")


@pytest.mark.parametrize("host_email", [None, "", "   ", 42])
def test_no_route_error_for_host_without_email(host_email: Any) -> None:
    with pytest.raises(NoRouteError) as caught:
        Router().route(booking(hostEmail=host_email))

    message = str(caught.value)
    assert "usr_host123" in message
    assert "Jane Doe" in message
    assert "mappings/routing.toml" in message
    assert 'host_user_id = "usr_host123"' in message
    assert "event_type_slug" not in message
    assert caught.value.host_user_id == "usr_host123"
    assert caught.value.host_name == "Jane Doe"


def test_no_route_error_when_host_email_field_missing() -> None:
    payload = booking()
    del payload["hostEmail"]

    with pytest.raises(NoRouteError, match="usr_host123"):
        Router().route(payload)


def test_no_route_error_names_host_by_name_only() -> None:
    payload = booking(hostEmail=None, hostUserId=None)

    with pytest.raises(NoRouteError) as caught:
        Router().route(payload)

    message = str(caught.value)
    assert "Jane Doe" in message
    assert 'event_type_slug = "30min-call"' in message
    assert "routes every booking of that event type" in message


def test_no_route_error_without_any_criterion() -> None:
    payload = booking(hostEmail=None, hostUserId=None, hostName=None)
    del payload["eventTypeSlug"]

    with pytest.raises(NoRouteError) as caught:
        Router().route(payload)

    assert str(caught.value) == (
        "Host with no hostUserId or hostName has no email address and no rule, so the booking has no calendar; "
        "no [[route]] rule in mappings/routing.toml can match it, because the payload has none of hostEmail, "
        "hostUserId and eventTypeSlug, the fields that host_email, host_user_id and event_type_slug match. "
        "Check the booking's host in Proximity."
    )
    assert "add a [[route]] rule" not in str(caught.value)


@pytest.mark.parametrize("slug", [None, "", "  "])
def test_no_route_error_blank_slug_not_suggested(slug: Any) -> None:
    payload = booking(hostEmail=None, hostUserId=None, eventTypeSlug=slug)

    with pytest.raises(NoRouteError) as caught:
        Router().route(payload)

    message = str(caught.value)
    assert message.startswith("Host Jane Doe has no email address and no rule")
    assert "event_type_slug =" not in message
    assert "can match it" in message


def test_no_route_error_names_loaded_rules_file(tmp_path: Path) -> None:
    directory = write_routing(tmp_path / "custom", "")

    with pytest.raises(NoRouteError) as caught:
        load_mappings(directory).router.route(booking(hostEmail=None))

    assert str(directory / "routing.toml") in str(caught.value)


def test_rule_without_acting_user_for_host_without_email() -> None:
    router = Router([RouteRule(calendar_id="demos@example.com", event_type_slug="30min-call")])

    with pytest.raises(NoRouteError) as caught:
        router.route(booking(hostEmail=None))

    message = str(caught.value)
    assert "usr_host123" in message
    assert "acting_user" in message
    assert "demos@example.com" in message


def test_route_rule_rejects_missing_criteria() -> None:
    with pytest.raises(ValueError, match="at least one"):
        RouteRule(calendar_id="team@example.com")


def test_route_rule_rejects_empty_calendar_id() -> None:
    with pytest.raises(ValueError, match="calendar_id"):
        RouteRule(calendar_id="", host_email="jane@example.com")


# --- Loading routing.toml -----------------------------------------------------------


def test_missing_folder_gives_defaults(tmp_path: Path) -> None:
    mappings = load_mappings(tmp_path / "absent")

    assert mappings == Mappings()
    assert mappings.router.route(booking()) == Router().route(booking())


def test_empty_folder_gives_defaults(tmp_path: Path) -> None:
    assert load_mappings(tmp_path) == Mappings()


def test_empty_routing_file_gives_defaults(tmp_path: Path) -> None:
    directory = write_routing(tmp_path / "mappings", "# nothing yet\n")

    assert load_mappings(directory).router == Router()


def test_shipped_routing_file_behaves_as_default() -> None:
    mappings = load_mappings(SHIPPED_MAPPINGS)

    assert mappings.router.rules == ()
    assert mappings.router.route(booking()) == Router().route(booking())
    demo = booking(eventTypeSlug="product-demo")
    assert mappings.router.route(demo) == Router().route(demo)


def test_shipped_routing_examples_are_valid(tmp_path: Path) -> None:
    text = (SHIPPED_MAPPINGS / "routing.toml").read_text(encoding="utf-8")
    uncommented = re.sub(r"(?m)^#(?=\S)", "", text)
    directory = write_routing(tmp_path / "mappings", uncommented)

    router = load_mappings(directory).router

    assert len(router.rules) == 3
    assert router.route(booking(eventTypeSlug="product-demo", hostEmail="bob@example.com")) == (
        Target(calendar_id="sales-team@example.com", acting_user="bob@example.com")
    )
    assert router.route(booking(eventTypeSlug="product-demo")).calendar_id == "jane@example.com"
    assert router.route(booking(hostUserId="usr_host456", hostEmail=None)) == Target(
        calendar_id="c_0123456789abcdef@group.calendar.google.com",
        acting_user="assistant@example.com",
    )


def test_routing_file_rules_keep_file_order(tmp_path: Path) -> None:
    directory = write_routing(
        tmp_path / "mappings",
        '[[route]]\nevent_type_slug = "30min-call"\ncalendar_id = "first@example.com"\n'
        '[[route]]\nhost_user_id = "usr_host123"\ncalendar_id = "second@example.com"\n'
        'acting_user = "assistant@example.com"\n',
    )

    router = load_mappings(directory).router

    assert [rule.calendar_id for rule in router.rules] == [
        "first@example.com",
        "second@example.com",
    ]
    assert router.route(booking()).calendar_id == "first@example.com"


def test_routing_file_strips_spaces_in_values(tmp_path: Path) -> None:
    directory = write_routing(
        tmp_path / "mappings",
        '[[route]]\nhost_email = " jane@example.com "\ncalendar_id = " team@example.com "\n',
    )

    rule = load_mappings(directory).router.rules[0]

    assert rule.host_email == "jane@example.com"
    assert rule.calendar_id == "team@example.com"


def test_error_message_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (
        "# Team calendars\n"
        "[[route]]\n"
        'host_email = "jane@example.com"\n'
        'calendar_id = "jane-team@example.com"\n'
        "\n"
        "# Demos\n"
        "[[route]]\n"
        'event_type_slug = "product-demo"\n'
    )
    write_routing(tmp_path / "mappings", text)
    monkeypatch.chdir(tmp_path)

    error = load_error(Path("mappings"))

    assert str(error) == (
        'mappings/routing.toml, line 7: route 2 has no calendar_id; '
        'add calendar_id = "team@example.com"'
    )
    assert error.path == Path("mappings/routing.toml")
    assert error.line == 7


MALFORMED_ROUTING = [
    pytest.param(
        '[[route]]\nhost_email = "jane@example.com"\ncalendar_id = "team@example.com\n',
        3,
        "invalid TOML",
        id="unterminated-string",
    ),
    pytest.param(
        '[[route]]\nhost_email "jane@example.com"\n',
        2,
        "invalid TOML at column",
        id="missing-equals",
    ),
    pytest.param(
        '[[route]]\nhost_email = "jane@example.com"\n',
        1,
        "route 1 has no calendar_id",
        id="missing-calendar-id",
    ),
    pytest.param(
        '[[route]]\ncalendar_id = "team@example.com"\n',
        1,
        "route 1 has no match criteria; add host_email, host_user_id or event_type_slug",
        id="no-criteria",
    ),
    pytest.param(
        '[[route]]\nhost_email = "jane@example.com"\ncalender_id = "team@example.com"\n',
        3,
        "route 1 has unknown key 'calender_id' (did you mean 'calendar_id'?); valid keys: "
        "acting_user, calendar_id, event_type_slug, host_email, host_user_id",
        id="unknown-route-key",
    ),
    pytest.param(
        '[[routes]]\nhost_email = "jane@example.com"\ncalendar_id = "team@example.com"\n',
        1,
        "the file has unknown key 'routes' (did you mean 'route'?); valid keys: route",
        id="unknown-section",
    ),
    pytest.param(
        'default_calendar = "team@example.com"\n',
        1,
        "the file has unknown key 'default_calendar'",
        id="unknown-top-level-key",
    ),
    pytest.param(
        '[route]\nhost_email = "jane@example.com"\ncalendar_id = "team@example.com"\n',
        1,
        "route must be a list of tables; start each rule with a [[route]] line",
        id="single-bracket-route",
    ),
    pytest.param(
        '[[route]]\nhost_email = "jane@example.com"\ncalendar_id = 42\n',
        3,
        'route 1 sets calendar_id to an integer; write it as a quoted string, '
        'such as calendar_id = "team@example.com"',
        id="calendar-id-integer",
    ),
    pytest.param(
        '[[route]]\nhost_email = ["jane@example.com"]\ncalendar_id = "team@example.com"\n',
        2,
        "route 1 sets host_email to an array",
        id="host-email-array",
    ),
    pytest.param(
        '[[route]]\nevent_type_slug = ""\ncalendar_id = "team@example.com"\n',
        2,
        "route 1 sets event_type_slug to an empty string",
        id="empty-slug",
    ),
    pytest.param(
        '[[route]]\nhost_email = "jane.example.com"\ncalendar_id = "team@example.com"\n',
        2,
        'route 1 sets host_email to "jane.example.com", which is not an email address',
        id="host-email-invalid",
    ),
    pytest.param(
        '[[route]]\nevent_type_slug = "x"\ncalendar_id = "t@example.com"\n'
        'acting_user = "assistant"\n',
        4,
        'route 1 sets acting_user to "assistant", which is not an email address',
        id="acting-user-invalid",
    ),
    pytest.param(
        '[[route]]\nhost_email = "jane@example.com"\ncalendar_id = "a@example.com"\n\n'
        '[[route]]\nhost_user_id = "usr_host456"\ncalendar_id = "b@example.com"\n',
        5,
        "route 2 matches host_user_id without host_email, so it must name the user who "
        'writes the calendar; add acting_user = "jane@example.com"',
        id="user-id-rule-without-acting-user",
    ),
    pytest.param(
        '[[route]]\nhost_email = "jane@example.com"\ncalendar_id = "a@example.com"\n'
        '[[route]]\nhost_email = "JANE@example.com"\ncalendar_id = "b@example.com"\n',
        4,
        "route 2 has the same criteria as route 1, so it can never match",
        id="duplicate-criteria",
    ),
    pytest.param(
        'route = [{ host_email = "jane@example.com" }]\n',
        1,
        "route 1 has no calendar_id",
        id="inline-route-without-calendar-id",
    ),
    pytest.param(
        '[[route]]\nhost_email = "a@example.com"\ncalendar_id = """\n[[route]]\nteam"""\n'
        '[[route]]\nhost_email = "b@example.com"\n',
        6,
        "route 2 has no calendar_id",
        id="header-inside-multiline-string",
    ),
]


@pytest.mark.parametrize(("text", "line", "problem"), MALFORMED_ROUTING)
def test_malformed_routing_file(tmp_path: Path, text: str, line: int, problem: str) -> None:
    directory = write_routing(tmp_path / "mappings", text)

    error = load_error(directory)

    assert error.path == directory / "routing.toml"
    assert error.line == line
    assert problem in error.problem
    assert str(error).startswith(f"{directory / 'routing.toml'}, line {line}: ")


def test_routing_rule_error_points_at_its_header(tmp_path: Path) -> None:
    text = (
        "[[route]]\n"
        'host_email = "jane@example.com"\n'
        'calendar_id = "a@example.com"\n'
        "\n"
        "[[route]]\n"
        'host_email = "bob@example.com"\n'
        'calendar_id = "b@example.com"\n'
        "\n"
        "[[route]]  # the broken one\n"
        'calendar_id = "c@example.com"\n'
    )
    directory = write_routing(tmp_path / "mappings", text)

    error = load_error(directory)

    assert error.line == 9
    assert error.problem.startswith("route 3 has no match criteria")


def test_unknown_toml_file_in_folder(tmp_path: Path) -> None:
    directory = tmp_path / "mappings"
    directory.mkdir()
    (directory / "routes.toml").write_text("", encoding="utf-8")

    error = load_error(directory)

    assert error.path == directory / "routes.toml"
    assert error.line is None
    assert "unknown file" in error.problem
    assert "routing.toml" in error.problem


def test_routing_file_not_utf8(tmp_path: Path) -> None:
    directory = tmp_path / "mappings"
    directory.mkdir()
    (directory / "routing.toml").write_bytes(b'# caf\xe9\n')

    error = load_error(directory)

    assert error.path == directory / "routing.toml"
    assert error.line is None
    assert "UTF-8" in error.problem


def test_routing_file_that_is_a_folder(tmp_path: Path) -> None:
    directory = tmp_path / "mappings"
    (directory / "routing.toml").mkdir(parents=True)

    error = load_error(directory)

    assert error.path == directory / "routing.toml"
    assert error.line is None
    assert error.problem == "is a folder, but must be a TOML file; remove or rename the folder"


def test_routing_file_with_byte_order_mark(tmp_path: Path) -> None:
    directory = tmp_path / "mappings"
    directory.mkdir()
    text = '[[route]]\nhost_email = "jane@example.com"\ncalendar_id = "team@example.com"\n'
    (directory / "routing.toml").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))

    assert load_mappings(directory).router.route(booking()).calendar_id == "team@example.com"


def test_mappings_path_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "mappings"
    path.write_text("", encoding="utf-8")

    error = load_error(path)

    assert error.path == path
    assert "is not a folder" in error.problem
