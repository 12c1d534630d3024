"""The retry policy for calendar calls: exponential backoff with full jitter, on tenacity.

Only TransientCalendarError (and its subclass RateLimitedError) is retried. Permanent
errors, EventAlreadyExistsError and EventGoneError go straight to the caller, because
repeating the same call cannot change their outcome.

A retry happens only if its wait ends inside the policy's time budget. When the server's
`retry_after` is longer than what is left, the policy gives up at once and raises the
transient error, so the worker can put the delivery back in its queue instead of holding
a thread.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity

from connector.calendars.base import TransientCalendarError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """The number of attempts and the waits between them for calendar calls that fail transiently.

    The wait before retry n (n = 1, 2, ...) is drawn uniformly from
    [0, min(max_wait, base_wait * 2 ** (n - 1))] seconds ("full jitter"). A `retry_after`
    on the error replaces that wait when it is longer. `max_total` bounds the seconds from
    the first attempt to the end of the last wait. `sleep`, `clock` and `random_fraction`
    (which returns a float in [0, 1)) are hooks for tests.
    """

    max_attempts: int = 5
    base_wait: float = 0.5
    max_wait: float = 30.0
    max_total: float = 60.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    random_fraction: Callable[[], float] = random.random

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.base_wait < 0 or self.max_wait < 0 or self.max_total < 0:
            raise ValueError("base_wait, max_wait and max_total must not be negative")

    @classmethod
    def no_retries(cls) -> RetryPolicy:
        """Return a policy that makes exactly one attempt."""
        return cls(max_attempts=1)

    def backoff(self, retry_number: int) -> float:
        """Return a jittered backoff in seconds for retry `retry_number`, counted from 1."""
        ceiling = min(self.max_wait, self.base_wait * 2 ** (retry_number - 1))
        return self.random_fraction() * ceiling

    def call(self, function: Callable[[], T], *, method: str, calendar_id: str | None) -> T:
        """Call `function` and retry it on transient errors. `method` and `calendar_id` appear in the log."""
        schedule = _Schedule(self, self.clock())
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransientCalendarError),
            wait=schedule.wait,
            stop=schedule.stop,
            sleep=self.sleep,
            before_sleep=lambda state: _log_retry(state, self, method, calendar_id),
            reraise=True,
        )
        return retrying(function)


class _Schedule:
    """The waits and the stop decision of one retried call.

    tenacity requests the wait and the stop decision separately, in an order that differs
    between its versions, so both read one wait planned per attempt.
    """

    def __init__(self, policy: RetryPolicy, started: float) -> None:
        self._policy = policy
        self._started = started
        self._planned: dict[int, float] = {}

    def wait(self, state: tenacity.RetryCallState) -> float:
        """Return the planned wait after the attempt that just failed."""
        return self._plan(state)

    def stop(self, state: tenacity.RetryCallState) -> bool:
        """Return True when attempts are used up or the next wait would end past the budget."""
        if state.attempt_number >= self._policy.max_attempts:
            return True

        elapsed = self._policy.clock() - self._started
        return elapsed + self._plan(state) > self._policy.max_total

    def _plan(self, state: tenacity.RetryCallState) -> float:
        attempt = state.attempt_number
        if attempt not in self._planned:
            wait = self._policy.backoff(attempt)
            retry_after = _retry_after(state)
            if retry_after is not None and retry_after > wait:
                wait = retry_after
            self._planned[attempt] = wait
        return self._planned[attempt]


def _retry_after(state: tenacity.RetryCallState) -> float | None:
    """Return the server's requested wait from the failed attempt, if it sent one."""
    if state.outcome is None or not state.outcome.failed:
        return None

    error = state.outcome.exception()
    if isinstance(error, TransientCalendarError):
        return error.retry_after
    return None


def _log_retry(
    state: tenacity.RetryCallState, policy: RetryPolicy, method: str, calendar_id: str | None
) -> None:
    """Log one WARNING line for a retry: the call, the failure and the wait."""
    error = state.outcome.exception() if state.outcome is not None else None
    status = getattr(error, "status", None)
    reason = getattr(error, "reason", None) or type(error).__name__
    wait = state.next_action.sleep if state.next_action is not None else state.upcoming_sleep

    logger.warning(
        "%s on calendar %s failed with %s %s, retrying in %.2f s (attempt %d of %d)",
        method,
        calendar_id or "-",
        status if status is not None else "no status",
        reason,
        wait,
        state.attempt_number + 1,
        policy.max_attempts,
    )
