"""Choice of the calendar that receives a booking, and the user who writes to it.

Without a matching rule, a booking goes to its host's own calendar: the calendar id is
``hostEmail`` and the connector impersonates ``hostEmail`` to write it. A rule matches
by host and/or event type and names another calendar. Among the rules that match, the
one with the most criteria wins, and between equally specific rules the first one wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from connector.calendars.base import Target

DEFAULT_ROUTING_FILE = "mappings/routing.toml"


class NoRouteError(Exception):
    """A booking whose host has no calendar and no rule that names one."""

    def __init__(self, message: str, *, host_user_id: str | None, host_name: str | None) -> None:
        super().__init__(message)
        self.host_user_id = host_user_id
        self.host_name = host_name


@dataclass(frozen=True)
class RouteRule:
    """A rule that sends the bookings it matches to ``calendar_id``.

    The rule matches when every criterion it sets matches. ``host_email`` is compared
    case-insensitively, ``host_user_id`` and ``event_type_slug`` exactly. Without
    ``acting_user``, the connector writes the calendar as the booking's host.
    """

    calendar_id: str
    host_email: str | None = None
    host_user_id: str | None = None
    event_type_slug: str | None = None
    acting_user: str | None = None

    def __post_init__(self) -> None:
        if not self.calendar_id:
            raise ValueError("a route rule needs a non-empty calendar_id")
        if self.specificity == 0:
            raise ValueError(
                "a route rule needs at least one of host_email, host_user_id, event_type_slug"
            )

    @property
    def specificity(self) -> int:
        """Number of criteria the rule sets."""
        criteria = (self.host_email, self.host_user_id, self.event_type_slug)
        return sum(criterion is not None for criterion in criteria)

    def matches(self, payload: Mapping[str, Any]) -> bool:
        """Return whether every criterion of the rule matches the booking."""
        if self.host_email is not None:
            host_email = _text_field(payload, "hostEmail")
            if host_email is None or host_email.casefold() != self.host_email.casefold():
                return False

        if self.host_user_id is not None:
            if _text_field(payload, "hostUserId") != self.host_user_id:
                return False

        if self.event_type_slug is not None:
            if _text_field(payload, "eventTypeSlug") != self.event_type_slug:
                return False

        return True


@dataclass(frozen=True)
class Router:
    """Routes bookings to calendars by the rules of ``mappings/routing.toml``.

    ``rules`` keeps file order. ``rules_file`` is the path that error messages name.
    """

    rules: tuple[RouteRule, ...] = ()
    rules_file: str = field(default=DEFAULT_ROUTING_FILE, compare=False)

    def __post_init__(self) -> None:
        # A list passed by a caller becomes a tuple, so the router stays immutable.
        object.__setattr__(self, "rules", tuple(self.rules))

    def find_rule(self, payload: Mapping[str, Any]) -> RouteRule | None:
        """Return the most specific matching rule, the first in file order among equals."""
        best: RouteRule | None = None
        for rule in self.rules:
            if not rule.matches(payload):
                continue
            if best is None or rule.specificity > best.specificity:
                best = rule

        return best

    def route(self, payload: Mapping[str, Any]) -> Target:
        """Return the calendar and acting user for a booking, or raise NoRouteError."""
        host_email = _text_field(payload, "hostEmail")
        rule = self.find_rule(payload)

        if rule is None:
            if host_email is None:
                raise self._no_route_error(payload, "has no email address and no rule", self._no_rule_fix(payload))
            return Target(calendar_id=host_email, acting_user=host_email)

        acting_user = rule.acting_user or host_email
        if acting_user is None:
            raise self._no_route_error(
                payload,
                f'has no email address, and the rule for calendar_id = "{rule.calendar_id}" '
                "sets no acting_user",
                f"add acting_user to that rule in {self.rules_file}",
            )
        return Target(calendar_id=rule.calendar_id, acting_user=acting_user)

    def _no_rule_fix(self, payload: Mapping[str, Any]) -> str:
        """Return the fix for a booking without hostEmail, suggesting only rule keys that its payload can match."""
        host_user_id = _text_field(payload, "hostUserId")
        if host_user_id:
            return f'add a [[route]] rule with host_user_id = "{host_user_id}", calendar_id and acting_user to {self.rules_file}'

        event_type_slug = _text_field(payload, "eventTypeSlug")
        if event_type_slug:
            return (
                f'add a [[route]] rule with event_type_slug = "{event_type_slug}", calendar_id and acting_user '
                f"to {self.rules_file}, which routes every booking of that event type, because the payload "
                "has no hostUserId to match"
            )

        return (
            f"no [[route]] rule in {self.rules_file} can match it, because the payload has none of hostEmail, "
            "hostUserId and eventTypeSlug, the fields that host_email, host_user_id and event_type_slug match. "
            "Check the booking's host in Proximity"
        )

    def _no_route_error(self, payload: Mapping[str, Any], reason: str, fix: str) -> NoRouteError:
        """Build the error that names the host, why it has no calendar, and the fix."""
        host_user_id = _text_field(payload, "hostUserId")
        host_name = _text_field(payload, "hostName")

        if host_user_id and host_name:
            host = f"{host_user_id} ({host_name})"
        else:
            host = host_user_id or host_name or "with no hostUserId or hostName"

        message = f"Host {host} {reason}, so the booking has no calendar; {fix}."
        return NoRouteError(message, host_user_id=host_user_id, host_name=host_name)


def _text_field(payload: Mapping[str, Any], name: str) -> str | None:
    """Return a payload field as stripped text, or None when it is missing, null or blank."""
    value = payload.get(name)
    if not isinstance(value, str):
        return None

    value = value.strip()
    return value or None
