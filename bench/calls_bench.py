"""Calendar API requests per booking change, by event type, in steady state.

Bookings go through their lifecycles one step at a time. The bench sends one step's delivery for
every booking and waits until the worker has finished them all. It then counts the Calendar API
requests that reached the emulator for each booking during that step. Tokens are cached by
then, and token requests are not Calendar API requests, so they are not counted.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.calendar import RecordingEmulator
from bench.payloads import WEBHOOK_PATH, Delivery, booking_id, booking_payload, change_time, sign_delivery
from bench.results import Section
from bench.servers import query_database, serve_process
from connector.decisions import event_id_for

HOSTS = 5
FIRST_BOOKING = 500_000
SETTLE_SECONDS = 0.3
DRAIN_TIMEOUT = 60.0


@dataclass(frozen=True)
class Step:
    """One change sent to every booking of a lifecycle, and the requests it should cost."""

    label: str
    event: str
    expected: int
    change: int = 0
    status: str = "Confirmed"
    version: int = 0
    resend: str | None = None
    successor: bool = False


LIFECYCLES: dict[str, list[Step]] = {
    "confirmed": [
        Step("booking.created", "booking.created", 1, version=1),
        Step("duplicate delivery (same delivery id)", "booking.created", 0, version=1, resend="same-id"),
        Step("redelivery (new delivery id, same body)", "booking.created", 0, version=1, resend="same-body"),
        Step("booking.rescheduled (same booking id)", "booking.rescheduled", 1, change=1, version=3),
        Step("stale snapshot (older createdAt)", "booking.rescheduled", 0, change=2, version=2),
        Step("booking.noShow", "booking.noShow", 1, change=1, version=4),
        Step("booking.completed", "booking.completed", 1, change=1, version=5),
        Step("booking.cancelled", "booking.cancelled", 1, change=1, status="Cancelled", version=6),
    ],
    "pending": [
        Step("booking.created (pending approval)", "booking.created", 1, status="PendingApproval", version=1),
        Step("booking.approved", "booking.approved", 1, version=2),
    ],
    "declined": [
        Step("booking.created (pending approval)", "booking.created", 1, status="PendingApproval", version=1),
        Step("booking.declined", "booking.declined", 1, status="Declined", version=2),
    ],
    "moved": [
        Step("booking.created", "booking.created", 1, version=1),
        Step("booking.rescheduled into a new booking id", "booking.rescheduled", 1, change=1, version=2, successor=True),
    ],
}


def run_calls(workdir: Path, bookings_per_lifecycle: int, emulator: RecordingEmulator, settle_seconds: float = SETTLE_SECONDS) -> Section:
    """Run every lifecycle over `bookings_per_lifecycle` bookings and return requests per change."""
    section = Section(
        "Calendar calls per booking change",
        f"{bookings_per_lifecycle} bookings per lifecycle over {HOSTS} hosts; requests counted per booking and step "
        "at the emulator (insert, patch, delete, get, list, move).",
    )
    serve_dir = workdir / "calls"
    shutil.rmtree(serve_dir, ignore_errors=True)
    emulator.emulator.latency = 0.0

    with serve_process(serve_dir, emulator.connector_settings()) as _serve, httpx.Client(
        base_url=_serve.base_url, trust_env=False, timeout=10.0
    ) as client:
        first = FIRST_BOOKING
        for lifecycle, steps in LIFECYCLES.items():
            numbers = list(range(first, first + bookings_per_lifecycle))
            first += 2 * bookings_per_lifecycle
            sent: dict[int, Delivery] = {}
            for step in steps:
                counts, methods = _run_step(client, emulator, serve_dir, step, numbers, sent, bookings_per_lifecycle, settle_seconds)
                _record(section, lifecycle, step, counts, methods)
    return section


def _run_step(
    client: httpx.Client,
    emulator: RecordingEmulator,
    serve_dir: Path,
    step: Step,
    numbers: list[int],
    sent: dict[int, Delivery],
    offset: int,
    settle_seconds: float,
) -> tuple[list[int], Counter]:
    """Send the step to every booking and return the request count per booking and the methods used."""
    owners = _event_owners(numbers, offset)
    before = len(emulator.recorder.arrivals())

    for number in numbers:
        delivery = _delivery(step, number, sent.get(number), offset)
        sent[number] = delivery
        response = client.post(WEBHOOK_PATH, content=delivery.body, headers=delivery.headers())
        if response.status_code != 200:
            raise RuntimeError(f"{step.label}: delivery failed with HTTP {response.status_code}: {response.text}")

    _wait_drained(serve_dir)
    time.sleep(settle_seconds)

    per_booking: Counter = Counter()
    methods: Counter = Counter()
    for arrival in emulator.recorder.arrivals()[before:]:
        owner = owners.get(arrival.booking_id or "") or owners.get(arrival.event_id or "")
        if owner is not None:
            per_booking[owner] += 1
            methods[arrival.method] += 1
    return [per_booking[number] for number in numbers], methods


def _delivery(step: Step, number: int, previous: Delivery | None, offset: int) -> Delivery:
    if step.resend == "same-id" and previous is not None:
        return previous
    suffix = f"{step.event}-{step.version}-{step.change}"
    if step.resend == "same-body" and previous is not None:
        return Delivery(f"{previous.delivery_id}-again", previous.event, previous.body, previous.signature)

    host = number % HOSTS
    if step.successor:
        payload = booking_payload(number + offset, host, change=step.change, status=step.status)
        payload["rescheduledFrom"] = booking_id(number)
    else:
        payload = booking_payload(number, host, change=step.change, status=step.status)
    return sign_delivery(step.event, payload, change_time(step.version), f"calls-{number}-{suffix}")


def _event_owners(numbers: list[int], offset: int) -> dict[str, int]:
    """Map booking ids and event ids (generations 0 to 2), of bookings and successors, to the booking number."""
    owners = {}
    for number in numbers:
        for owned in (booking_id(number), booking_id(number + offset)):
            owners[owned] = number
            for generation in range(3):
                owners[event_id_for(owned, generation)] = number
    return owners


def _wait_drained(serve_dir: Path) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while time.monotonic() < deadline:
        pending = query_database(serve_dir, "SELECT count(*) FROM deliveries WHERE state = 'pending'")[0][0]
        if pending == 0:
            return
        time.sleep(0.05)
    raise TimeoutError(f"deliveries were still pending after {DRAIN_TIMEOUT:.0f} s")


def _record(section: Section, lifecycle: str, step: Step, counts: list[int], methods: Counter) -> None:
    exact = all(count == step.expected for count in counts)
    mean = sum(counts) / len(counts)
    figure = section.figure(
        f"{step.label} [{lifecycle}]",
        "requests/change",
        decimals=2,
        target=f"{step.expected}",
        meets=lambda _median, exact=exact: exact,
    )
    figure.add(mean)
    used = ", ".join(f"{method} {count}" for method, count in sorted(methods.items())) or "none"
    section.notes.append(
        f"{step.label} [{lifecycle}]: {min(counts)} to {max(counts)} requests per booking; methods: {used}."
    )
