"""Injected failures for Calendar API calls: error statuses, lost responses, delays and dropped connections."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from tests.emulator.errors import ApiError

# A fault with this status closes the connection instead of sending a response.
DROP_CONNECTION = 0


@dataclass
class Fault:
    """A rule that makes the next `times` matching calls fail or slow down.

    `status` None only delays the call. `times` None matches forever. `hits` counts the calls it changed.
    """

    method: str | None = None
    path_contains: str | None = None
    status: int | None = 503
    reason: str = "backendError"
    message: str | None = None
    times: int | None = 1
    after_commit: bool = False
    delay: float = 0.0
    retry_after: int | float | str | None = None
    calendar_id: str | None = None
    hits: int = 0

    def matches(self, method: str, path: str, calendar_id: str | None) -> bool:
        """Check the call against the method, path substring and calendar filters."""
        if self.method is not None and self.method.upper() != method:
            return False
        if self.path_contains is not None and self.path_contains not in path:
            return False
        return self.calendar_id is None or self.calendar_id == calendar_id

    @property
    def exhausted(self) -> bool:
        """Whether the fault has changed `times` calls already."""
        return self.times is not None and self.hits >= self.times

    @property
    def drops_connection(self) -> bool:
        """Whether the fault closes the connection instead of sending an error."""
        return self.status == DROP_CONNECTION

    def error(self) -> ApiError:
        """Build the Google-shaped error response of this fault."""
        headers = {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}
        return ApiError(self.status or 500, self.reason, self.message, headers=headers)


class FaultList:
    """The active faults, consumed in the order they were added."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> Fault:
        """Activate a fault."""
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        """Remove every fault."""
        with self._lock:
            self._faults.clear()

    def take(self, method: str, path: str, calendar_id: str | None) -> Fault | None:
        """Return the first live fault that matches the call and count the call against it."""
        with self._lock:
            for fault in self._faults:
                if not fault.exhausted and fault.matches(method, path, calendar_id):
                    fault.hits += 1
                    return fault
        return None
