"""Worker throughput: booking changes applied per second against the emulator with 20 ms latency.

Each booking goes through five changes (created, rescheduled three times, cancelled), each of
which costs one Calendar API request. The bench keeps at most one change per booking waiting.
It sends a booking's next change when the emulator receives the request of the previous one,
so the worker never merges two changes of one booking into one request, and every change is
applied on its own. The first changes of all bookings are sent at the start, in shuffled order.
The run ends when no delivery is pending.

The per-user and per-project rates are counted from the arrival times of all requests, in
every 60-second window, and the emulator's responses are checked for rate-limit errors.
"""

from __future__ import annotations

import queue
import random
import shutil
import threading
import time
from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.calendar import Arrival, RecordingEmulator
from bench.payloads import WEBHOOK_PATH, Delivery, booking_id, booking_payload, change_time, sign_delivery
from bench.results import Section
from bench.servers import query_database, serve_process
from connector.decisions import event_id_for

CHANGES = (
    ("booking.created", 0, "Confirmed"),
    ("booking.rescheduled", 1, "Confirmed"),
    ("booking.rescheduled", 2, "Confirmed"),
    ("booking.rescheduled", 3, "Confirmed"),
    ("booking.cancelled", 3, "Cancelled"),
)
FIRST_BOOKING = 100_000
SENDER_THREADS = 4
USER_QUOTA_PER_MINUTE = 600
PROJECT_QUOTA_PER_MINUTE = 10_000


@dataclass(frozen=True)
class WorkerOptions:
    """The size of one run and the worker settings it runs with."""

    runs: int
    bookings: int
    hosts: int
    worker_threads: int | None = None
    timeout_seconds: float = 600.0


class ChangeFeeder:
    """Sends each booking's next change once the previous change's request reaches the emulator."""

    def __init__(self, base_url: str, bookings: list[int], hosts: int) -> None:
        self._base_url = base_url
        self._hosts = hosts
        self._queue: queue.Queue[Delivery | None] = queue.Queue()
        self._owners: dict[str, int] = {}
        self._progress: dict[int, int] = {}
        self._lock = threading.Lock()
        self.failures: list[str] = []
        for number in bookings:
            self._owners[booking_id(number)] = number
            self._owners[event_id_for(booking_id(number), 0)] = number
            self._progress[number] = 0
        self._threads = [threading.Thread(target=self._send_forever, daemon=True) for _ in range(SENDER_THREADS)]

    def start(self, order: list[int]) -> None:
        for thread in self._threads:
            thread.start()
        for number in order:
            self._queue.put(self._delivery(number, 0))

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=30)

    def on_arrival(self, arrival: Arrival) -> None:
        """Queue the booking's next change; runs in the emulator's event loop, so it only queues."""
        number = self._owners.get(arrival.booking_id or "") or self._owners.get(arrival.event_id or "")
        if number is None:
            return
        with self._lock:
            step = self._progress[number] + 1
            self._progress[number] = step
        if step < len(CHANGES):
            self._queue.put(self._delivery(number, step))

    def _delivery(self, number: int, step: int) -> Delivery:
        event, change, status = CHANGES[step]
        payload = booking_payload(number, number % self._hosts, change=change, status=status)
        return sign_delivery(event, payload, change_time(step), f"wrk-{number}-{step}")

    def _send_forever(self) -> None:
        with httpx.Client(base_url=self._base_url, trust_env=False, timeout=30.0) as client:
            while (delivery := self._queue.get()) is not None:
                try:
                    response = client.post(WEBHOOK_PATH, content=delivery.body, headers=delivery.headers())
                except httpx.HTTPError as error:
                    self.failures.append(f"{delivery.delivery_id}: {error}")
                    continue
                if response.status_code != 200:
                    self.failures.append(f"{delivery.delivery_id}: {response.status_code}")


def run_worker(workdir: Path, options: WorkerOptions, emulator: RecordingEmulator) -> Section:
    """Apply `options.bookings` x 5 changes `options.runs` times and return the figures."""
    changes = options.bookings * len(CHANGES)
    quota_rate = min(PROJECT_QUOTA_PER_MINUTE, options.hosts * USER_QUOTA_PER_MINUTE) / 60
    threads = f"WORKER_THREADS={options.worker_threads}" if options.worker_threads else "WORKER_THREADS at its default"
    section = Section(
        "Worker throughput",
        f"{changes:,} changes over {options.bookings:,} bookings of {options.hosts} hosts, emulator latency 20 ms, "
        f"quotas at their defaults ({USER_QUOTA_PER_MINUTE}/min per user, {PROJECT_QUOTA_PER_MINUTE:,}/min per "
        f"project, so at most {quota_rate:.1f} requests/s for {options.hosts} hosts), {threads}.",
    )
    settings = {}
    if options.worker_threads:
        settings["WORKER_THREADS"] = str(options.worker_threads)

    for run in range(options.runs):
        serve_dir = workdir / f"worker-{run}"
        shutil.rmtree(serve_dir, ignore_errors=True)
        emulator.emulator.reset()
        emulator.emulator.latency = 0.02
        emulator.recorder.clear()

        numbers = list(range(FIRST_BOOKING, FIRST_BOOKING + options.bookings))
        order = numbers[:]
        random.Random(run).shuffle(order)
        with serve_process(serve_dir, {**emulator.connector_settings(), **settings}) as serve:
            _warm_tokens(serve.base_url, serve_dir, options.hosts)
            emulator.recorder.clear()
            feeder = ChangeFeeder(serve.base_url, numbers, options.hosts)
            emulator.recorder.listener = feeder.on_arrival
            started = time.monotonic()
            try:
                feeder.start(order)
                finished = _wait_applied(serve_dir, changes, started + options.timeout_seconds)
            finally:
                emulator.recorder.listener = None
                feeder.stop()

        if feeder.failures:
            raise RuntimeError(f"{len(feeder.failures)} deliveries failed, first: {feeder.failures[0]}")
        arrivals = emulator.recorder.arrivals()
        statuses = [request.status for request in emulator.emulator.requests]
        elapsed = finished - started
        _record(section, changes, elapsed, arrivals, statuses)
    return section


def _warm_tokens(base_url: str, serve_dir: Path, hosts: int) -> None:
    """Create one booking per host and wait for them, so every host has a cached token before timing starts."""
    with httpx.Client(base_url=base_url, trust_env=False, timeout=30.0) as client:
        for host in range(hosts):
            payload = booking_payload(host, host)
            delivery = sign_delivery("booking.created", payload, change_time(0), f"warm-{host}")
            client.post(WEBHOOK_PATH, content=delivery.body, headers=delivery.headers()).raise_for_status()

    deadline = time.monotonic() + 120
    while _pending(serve_dir):
        if time.monotonic() > deadline:
            raise TimeoutError("the warm-up bookings were still pending after 120 s")
        time.sleep(0.1)


def _pending(serve_dir: Path) -> int:
    return query_database(serve_dir, "SELECT count(*) FROM deliveries WHERE state = 'pending'")[0][0]


def _wait_applied(serve_dir: Path, changes: int, deadline: float) -> float:
    """Wait until `changes` bench deliveries are finished, and return the time that was first seen."""
    while time.monotonic() < deadline:
        finished = query_database(
            serve_dir, "SELECT count(*) FROM deliveries WHERE delivery_id LIKE 'wrk-%' AND state != 'pending'"
        )[0][0]
        if finished >= changes:
            return time.monotonic()
        time.sleep(0.05)
    raise TimeoutError(f"the worker had not applied {changes} changes by the deadline")


def _record(section: Section, changes: int, elapsed: float, arrivals: list[Arrival], statuses: list[int]) -> None:
    rate = changes / elapsed
    section.figure(
        "changes applied per second", "changes/s", target=">= 160", meets=lambda value: value >= 160.0,
    ).add(rate)
    section.figure("requests per change", "requests", decimals=2).add(len(arrivals) / changes)

    user_peak = max((_max_in_window([arrival.at for arrival in group]) for group in _by_calendar(arrivals).values()), default=0)
    section.figure(
        "busiest host: requests in any 60 s", "requests", decimals=0,
        target=f"<= {USER_QUOTA_PER_MINUTE}", meets=lambda value: value <= USER_QUOTA_PER_MINUTE,
    ).add(user_peak)
    section.figure(
        "project: requests in any 60 s", "requests", decimals=0,
        target=f"<= {PROJECT_QUOTA_PER_MINUTE:,}", meets=lambda value: value <= PROJECT_QUOTA_PER_MINUTE,
    ).add(_max_in_window([arrival.at for arrival in arrivals]))
    limited = sum(status in (403, 429) for status in statuses)
    section.figure("rate-limit errors (403/429)", "responses", decimals=0, target="0", meets=lambda value: value == 0).add(limited)


def _by_calendar(arrivals: list[Arrival]) -> dict[str, list[Arrival]]:
    groups: dict[str, list[Arrival]] = defaultdict(list)
    for arrival in arrivals:
        groups[arrival.calendar_id].append(arrival)
    return groups


def _max_in_window(times: list[float], window: float = 60.0) -> int:
    """Return the largest number of `times` inside any half-open window of `window` seconds."""
    ordered = sorted(times)
    best = 0
    for index, start in enumerate(ordered):
        best = max(best, bisect_left(ordered, start + window, lo=index) - index)
    return best
