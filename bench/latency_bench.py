"""Delivery to first calendar request: from the 200 to the emulator receiving that booking's first call.

Probe deliveries are new bookings of their own hosts. The bench sends one, notes when the 200
arrives, and waits for the emulator to record the first Calendar API request for that booking.
Both times come from `time.monotonic()` in the bench process. The idle figure sends probes one
at a time with pauses between them. The loaded figure sends the same probes while a second
process sends other hosts' new bookings at a steady rate that the worker keeps up with.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.calendar import Arrival, RecordingEmulator
from bench.payloads import WEBHOOK_PATH, booking_id, booking_payload, change_time, new_bookings, sign_delivery, write_request_file
from bench.results import Section, percentile
from bench.servers import ROOT, serve_process

PROBE_HOSTS = (100, 101, 102, 103)
PROBE_FIRST_BOOKING = 900_000
BACKGROUND_HOSTS = 50
BACKGROUND_CONNECTIONS = 4
PROBE_PAUSE_SECONDS = 0.2
ARRIVAL_TIMEOUT = 30.0


@dataclass(frozen=True)
class LatencyOptions:
    """Probes per condition and run, and the background delivery rate of the loaded condition."""

    runs: int
    probes: int
    background_rate: float
    warmup_bookings: int = 40
    background_lead_seconds: float = 2.0


class FirstArrivals:
    """Waits for the first Calendar API request of each expected booking."""

    def __init__(self, emulator: RecordingEmulator) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, threading.Event] = {}
        self._first: dict[str, Arrival] = {}
        emulator.recorder.listener = self._on_arrival

    def expect(self, booking_id: str) -> None:
        with self._lock:
            self._waiting[booking_id] = threading.Event()

    def wait(self, booking_id: str, timeout: float = ARRIVAL_TIMEOUT) -> Arrival:
        """Return the booking's first arrival; raise TimeoutError when none came in time."""
        if not self._waiting[booking_id].wait(timeout):
            raise TimeoutError(f"no calendar request for booking {booking_id} within {timeout:.0f} s")
        return self._first[booking_id]

    def _on_arrival(self, arrival: Arrival) -> None:
        if arrival.booking_id is None:
            return
        with self._lock:
            event = self._waiting.get(arrival.booking_id)
            if event is not None and arrival.booking_id not in self._first:
                self._first[arrival.booking_id] = arrival
                event.set()


def run_latency(workdir: Path, options: LatencyOptions, emulator: RecordingEmulator) -> Section:
    """Measure the idle and loaded delivery-to-calendar latency `options.runs` times."""
    section = Section(
        "Delivery to first calendar request",
        f"{options.probes} probe deliveries per condition and run, {PROBE_PAUSE_SECONDS:g} s apart; under load, "
        f"a second process sends {options.background_rate:g} new bookings/s of {BACKGROUND_HOSTS} other hosts. "
        "Emulator latency 20 ms; tokens and worker threads warmed up first.",
    )
    probe_numbers = iter(range(PROBE_FIRST_BOOKING, PROBE_FIRST_BOOKING + 1_000_000))
    background_file = workdir / "latency-background.tsv"
    background_seconds = options.probes * (PROBE_PAUSE_SECONDS + 0.05) + options.background_lead_seconds + 3.0
    write_request_file(background_file, new_bookings("lat-bg", int(options.background_rate * background_seconds) + 100, BACKGROUND_HOSTS))

    for run in range(options.runs):
        serve_dir = workdir / f"latency-{run}"
        shutil.rmtree(serve_dir, ignore_errors=True)
        emulator.emulator.latency = 0.02
        arrivals = FirstArrivals(emulator)
        with serve_process(serve_dir, emulator.connector_settings()) as serve, httpx.Client(
            base_url=serve.base_url, trust_env=False, timeout=10.0
        ) as client:
            _warm_up(client, arrivals, probe_numbers, options.warmup_bookings)

            idle = _probe_series(client, arrivals, probe_numbers, options.probes)
            loaded = _probe_under_load(serve.base_url, client, arrivals, probe_numbers, options, background_file, background_seconds)

        section.figure("idle: p50", "ms", decimals=1, target="<= 50 ms", meets=lambda value: value <= 50.0).add(percentile(idle, 50))
        section.figure("idle: p99", "ms", decimals=1).add(percentile(idle, 99))
        section.figure("under load: p50", "ms", decimals=1).add(percentile(loaded, 50))
        section.figure("under load: p99", "ms", decimals=1).add(percentile(loaded, 99))
        late = sum(math.isinf(value) for value in idle + loaded)
        if late:
            section.notes.append(f"Run {run + 1}: {late} probes saw no calendar request within {ARRIVAL_TIMEOUT:.0f} s.")
    emulator.recorder.listener = None
    return section


def _warm_up(client: httpx.Client, arrivals: FirstArrivals, numbers, count: int) -> None:
    """Send a burst of new bookings, so every worker thread has built its client and every host has a token."""
    booking_numbers = []
    for index in range(max(count, len(PROBE_HOSTS))):
        number = next(numbers)
        host = PROBE_HOSTS[index % len(PROBE_HOSTS)] if index < len(PROBE_HOSTS) else 200 + index
        _send(client, arrivals, number, host)
        booking_numbers.append(number)
    for number in booking_numbers:
        arrivals.wait(booking_id(number))


def _probe_series(client: httpx.Client, arrivals: FirstArrivals, numbers, count: int) -> list[float]:
    """Send `count` probes one after another; after one times out, count the rest as timed out too."""
    latencies: list[float] = []
    for index in range(count):
        latency = _probe(client, arrivals, next(numbers), index)
        latencies.append(latency)
        if math.isinf(latency):
            latencies += [math.inf] * (count - index - 1)
            break
    return latencies


def _probe(client: httpx.Client, arrivals: FirstArrivals, number: int, index: int) -> float:
    """Send one new booking of a probe host, and return milliseconds from its 200 to its first calendar request.

    A probe whose request does not arrive within ARRIVAL_TIMEOUT counts as infinitely late.
    """
    time.sleep(PROBE_PAUSE_SECONDS)
    acknowledged = _send(client, arrivals, number, PROBE_HOSTS[index % len(PROBE_HOSTS)])
    try:
        arrival = arrivals.wait(booking_id(number))
    except TimeoutError:
        return math.inf
    return (arrival.at - acknowledged) * 1000


def _send(client: httpx.Client, arrivals: FirstArrivals, number: int, host: int) -> float:
    payload = booking_payload(number, host)
    delivery = sign_delivery("booking.created", payload, change_time(0), f"lat-{number}")
    arrivals.expect(payload["id"])
    response = client.post(WEBHOOK_PATH, content=delivery.body, headers=delivery.headers())
    acknowledged = time.monotonic()
    if response.status_code != 200:
        raise RuntimeError(f"probe delivery {delivery.delivery_id} failed with HTTP {response.status_code}: {response.text}")
    return acknowledged


def _probe_under_load(
    base_url: str,
    client: httpx.Client,
    arrivals: FirstArrivals,
    numbers,
    options: LatencyOptions,
    background_file: Path,
    background_seconds: float,
) -> list[float]:
    command = [
        sys.executable, "-m", "bench.pyload", "--url", base_url, "--file", str(background_file),
        "--connections", str(BACKGROUND_CONNECTIONS), "--duration", str(background_seconds),
        "--rate", str(options.background_rate),
    ]
    background = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(options.background_lead_seconds)
        return _probe_series(client, arrivals, numbers, options.probes)
    finally:
        background.wait(timeout=background_seconds + 60)
