"""Tests of the tenacity retry policy for calendar calls, on a fake clock."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from connector.calendars.base import (
    CalendarNotFoundError,
    EventAlreadyExistsError,
    EventGoneError,
    PermanentCalendarError,
    RateLimitedError,
    TransientCalendarError,
)
from connector.retries import RetryPolicy


class FakeClock:
    """A clock that moves only when the policy sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def make_policy(clock: FakeClock, **overrides: object) -> RetryPolicy:
    settings: dict[str, object] = {
        "max_attempts": 5,
        "base_wait": 1.0,
        "max_wait": 30.0,
        "max_total": 100.0,
        "sleep": clock.sleep,
        "clock": clock,
        "random_fraction": lambda: 1.0,
    }
    settings.update(overrides)
    return RetryPolicy(**settings)  # type: ignore[arg-type]


def failing(errors: list[BaseException], result: str = "done") -> tuple[Callable[[], str], list[int]]:
    """Return a function that raises `errors` one per call and then returns `result`."""
    calls: list[int] = []

    def function() -> str:
        calls.append(len(calls) + 1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result

    return function, calls


def transient(status: int = 503, retry_after: float | None = None) -> TransientCalendarError:
    return TransientCalendarError(
        "server error", status=status, reason="backendError", retry_after=retry_after
    )


def test_success_needs_no_retry() -> None:
    clock = FakeClock()
    function, calls = failing([])

    result = make_policy(clock).call(function, method="events.get", calendar_id="cal")

    assert result == "done"
    assert calls == [1]
    assert clock.sleeps == []


def test_transient_errors_are_retried() -> None:
    clock = FakeClock()
    function, calls = failing([transient(), transient()])

    result = make_policy(clock).call(function, method="events.insert", calendar_id="cal")

    assert result == "done"
    assert len(calls) == 3
    assert clock.sleeps == [1.0, 2.0]


def test_rate_limited_errors_are_retried() -> None:
    clock = FakeClock()
    function, calls = failing([RateLimitedError("slow down", status=429)])

    make_policy(clock).call(function, method="events.insert", calendar_id="cal")

    assert len(calls) == 2


def test_attempts_are_limited() -> None:
    clock = FakeClock()
    errors = [transient() for _ in range(10)]
    function, calls = failing(errors)

    with pytest.raises(TransientCalendarError) as caught:
        make_policy(clock, max_attempts=4).call(function, method="events.get", calendar_id="cal")

    assert len(calls) == 4
    assert caught.value is errors[3]
    assert len(clock.sleeps) == 3


@pytest.mark.parametrize(
    "error",
    [
        PermanentCalendarError("bad request", status=400),
        CalendarNotFoundError("no calendar", status=404),
        EventAlreadyExistsError("taken", status=409),
        EventGoneError("deleted", status=410),
        ValueError("a bug"),
    ],
    ids=["permanent", "calendar-not-found", "already-exists", "gone", "other-exception"],
)
def test_non_transient_errors_are_not_retried(error: Exception) -> None:
    clock = FakeClock()
    function, calls = failing([error])

    with pytest.raises(type(error)) as caught:
        make_policy(clock).call(function, method="events.patch", calendar_id="cal")

    assert caught.value is error
    assert calls == [1]
    assert clock.sleeps == []


def test_backoff_doubles_up_to_max_wait() -> None:
    policy = make_policy(FakeClock(), base_wait=1.0, max_wait=5.0)

    waits = [policy.backoff(number) for number in range(1, 6)]

    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_backoff_uses_full_jitter() -> None:
    fractions = iter([0.0, 0.5, 0.25])
    policy = make_policy(FakeClock(), base_wait=2.0, random_fraction=lambda: next(fractions))

    waits = [policy.backoff(number) for number in range(1, 4)]

    assert waits == [0.0, 2.0, 2.0]


def test_default_jitter_stays_in_range() -> None:
    policy = RetryPolicy(base_wait=1.0, max_wait=8.0)

    waits = [policy.backoff(4) for _ in range(200)]

    assert all(0.0 <= wait <= 8.0 for wait in waits)
    assert len(set(waits)) > 1


def test_longer_retry_after_replaces_backoff() -> None:
    clock = FakeClock()
    function, _ = failing([transient(retry_after=7.5)])

    make_policy(clock).call(function, method="events.insert", calendar_id="cal")

    assert clock.sleeps == [7.5]


def test_shorter_retry_after_keeps_backoff() -> None:
    clock = FakeClock()
    function, _ = failing([transient(), transient(retry_after=0.5)])

    make_policy(clock).call(function, method="events.insert", calendar_id="cal")

    assert clock.sleeps == [1.0, 2.0]


def test_retry_after_past_budget_gives_up_at_once() -> None:
    clock = FakeClock()
    error = RateLimitedError("quota", status=403, reason="quotaExceeded", retry_after=1800)
    function, calls = failing([error])

    with pytest.raises(RateLimitedError) as caught:
        make_policy(clock, max_total=60).call(function, method="events.insert", calendar_id="cal")

    assert caught.value is error
    assert calls == [1]
    assert clock.sleeps == []


def test_budget_stops_backoff() -> None:
    clock = FakeClock()
    function, calls = failing([transient() for _ in range(10)])

    with pytest.raises(TransientCalendarError):
        make_policy(clock, max_attempts=10, max_total=10.0).call(
            function, method="events.get", calendar_id="cal"
        )

    # Waits of 1, 2 and 4 s fit in 10 s, but the next 8 s wait would end at 15 s.
    assert clock.sleeps == [1.0, 2.0, 4.0]
    assert len(calls) == 4


def test_no_retries_policy_makes_one_attempt() -> None:
    function, calls = failing([transient()])

    with pytest.raises(TransientCalendarError):
        RetryPolicy.no_retries().call(function, method="events.get", calendar_id="cal")

    assert calls == [1]


@pytest.mark.parametrize(
    "settings",
    [{"max_attempts": 0}, {"base_wait": -1.0}, {"max_wait": -1.0}, {"max_total": -1.0}],
)
def test_invalid_settings_are_rejected(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**settings)  # type: ignore[arg-type]


def test_each_retry_logs_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    function, _ = failing([transient(503), RateLimitedError("slow", status=403, reason="rateLimitExceeded")])

    with caplog.at_level(logging.WARNING, logger="connector.retries"):
        make_policy(clock).call(function, method="events.insert", calendar_id="team@example.com")

    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert "events.insert" in lines[0]
    assert "team@example.com" in lines[0]
    assert "503 backendError" in lines[0]
    assert "1.00 s" in lines[0]
    assert "attempt 2 of 5" in lines[0]
    assert "403 rateLimitExceeded" in lines[1]
    assert "2.00 s" in lines[1]
    assert all("\n" not in line for line in lines)


def test_policy_is_reusable_across_calls() -> None:
    clock = FakeClock()
    policy = make_policy(clock, max_total=5.0)
    first, _ = failing([transient(), transient()])
    second, second_calls = failing([transient(), transient()])

    policy.call(first, method="events.get", calendar_id="cal")
    policy.call(second, method="events.get", calendar_id="cal")

    # Each call has its own budget, measured from its own first attempt.
    assert len(second_calls) == 3
