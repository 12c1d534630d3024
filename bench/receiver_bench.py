"""Receiver throughput and acknowledgement latency: `serve` against the bare Starlette endpoint.

Each run starts every server fresh, one after the other, and sends each the same load: signed
deliveries of new bookings from a load generator in another process, over 32 keep-alive
connections. The connector runs with SQLite in WAL mode at `synchronous=FULL`, so each 200
follows a durable commit. It runs twice: as `serve --no-worker`, the receiver alone, which the
targets apply to, and as plain `serve`, whose worker meanwhile writes the new bookings to the
Calendar emulator in the same process.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from bench.calendar import RecordingEmulator
from bench.load import LoadResult, run_load
from bench.payloads import new_bookings, write_request_file
from bench.results import Section
from bench.servers import bare_process, query_database, serve_process

CONNECTIONS = 32
HOSTS = 50
WARMUP_SECONDS = 1.0
RECEIVER = "serve --no-worker"
WITH_WORKER = "serve with its worker"


@dataclass(frozen=True)
class ReceiverOptions:
    """How long and how often to load each server; `capacity_per_second` sizes the request files."""

    runs: int
    seconds: float
    capacity_per_second: int
    generator: str = "auto"


def run_receiver(workdir: Path, options: ReceiverOptions, emulator: RecordingEmulator) -> Section:
    """Measure the three servers `options.runs` times and return the figures."""
    section = Section(
        "Receiver throughput and acknowledgement latency",
        f"{CONNECTIONS} connections, {options.seconds:g} s per server and run after a {WARMUP_SECONDS:g} s "
        "warm-up, new-booking deliveries of about 2.2 kB with non-ASCII text, each with a unique delivery id "
        "and body. The bare endpoint is served by the same uvicorn calls as `serve`. The targets apply to "
        f"`{RECEIVER}`; `{WITH_WORKER}` also syncs the new bookings to the emulator (20 ms latency) meanwhile.",
    )
    measured_file = workdir / "receiver-requests.tsv"
    warmup_file = workdir / "receiver-warmup.tsv"
    count = int(options.seconds * options.capacity_per_second)
    warmup_count = int(WARMUP_SECONDS * options.capacity_per_second)
    write_request_file(measured_file, new_bookings("rcv", count, HOSTS))
    write_request_file(warmup_file, new_bookings("rcv-warm", warmup_count, HOSTS, first=count))

    for run in range(options.runs):
        with bare_process(workdir / f"bare-{run}") as bare:
            bare_result = _load(bare.base_url, warmup_file, measured_file, options)
        _check(bare_result, "bare", count, check_restarts=False)

        results = {}
        for name, worker in ((RECEIVER, False), (WITH_WORKER, True)):
            serve_dir = workdir / f"serve-{run}-{'worker' if worker else 'receiver'}"
            shutil.rmtree(serve_dir, ignore_errors=True)
            emulator.emulator.latency = 0.02
            with serve_process(serve_dir, emulator.connector_settings(), worker=worker) as serve:
                result = _load(serve.base_url, warmup_file, measured_file, options)
            _check(result, name, count, check_restarts=True)
            stored = query_database(serve_dir, "SELECT count(*) FROM deliveries")[0][0]
            if stored < result.requests:
                raise RuntimeError(f"{name} acknowledged {result.requests} deliveries but stored only {stored}")
            results[name] = result

        _record(section, bare_result, results)
        section.notes.append(
            f"Run {run + 1} ({bare_result.generator}): bare {bare_result.rate:,.0f}/s, "
            + ", ".join(f"{name} {result.rate:,.0f}/s" for name, result in results.items())
            + "; every acknowledged delivery was found stored."
        )
    return section


def _load(base_url: str, warmup_file: Path, measured_file: Path, options: ReceiverOptions) -> LoadResult:
    run_load(base_url, warmup_file, connections=CONNECTIONS, duration=WARMUP_SECONDS, generator=options.generator)
    return run_load(base_url, measured_file, connections=CONNECTIONS, duration=options.seconds, generator=options.generator)


def _record(section: Section, bare: LoadResult, results: dict[str, LoadResult]) -> None:
    receiver = results[RECEIVER]
    section.figure(f"{RECEIVER}: requests/s", "req/s", decimals=0).add(receiver.rate)
    section.figure("bare: requests/s", "req/s", decimals=0).add(bare.rate)
    section.figure(
        f"{RECEIVER} / bare throughput", "%", target=">= 60 %", meets=lambda value: value >= 60.0,
    ).add(100 * receiver.rate / bare.rate)
    section.figure(f"{RECEIVER}: p50 ack latency", "ms", decimals=2).add(receiver.p50_ms)
    section.figure(
        f"{RECEIVER}: p99 ack latency", "ms", decimals=2, target="<= 20 ms", meets=lambda value: value <= 20.0,
    ).add(receiver.p99_ms)
    section.figure("bare: p50 latency", "ms", decimals=2).add(bare.p50_ms)
    section.figure("bare: p99 latency", "ms", decimals=2).add(bare.p99_ms)

    loaded = results[WITH_WORKER]
    section.figure(f"{WITH_WORKER}: requests/s", "req/s", decimals=0).add(loaded.rate)
    section.figure(f"{WITH_WORKER} / bare throughput", "%").add(100 * loaded.rate / bare.rate)
    section.figure(f"{WITH_WORKER}: p99 ack latency", "ms", decimals=2).add(loaded.p99_ms)


def _check(result: LoadResult, name: str, capacity: int, *, check_restarts: bool) -> None:
    if result.errors:
        raise RuntimeError(f"{name}: {result.errors} requests failed or got an error status")
    if check_restarts and result.file_restarts:
        raise RuntimeError(
            f"{name}: the load generator ran out of its {capacity:,} unique deliveries and sent some twice; "
            "raise the capacity"
        )
