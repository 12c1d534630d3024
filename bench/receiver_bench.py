"""Receiver throughput and acknowledgement latency: `serve` against the bare Starlette endpoint.

Each run starts both servers fresh, one after the other, and sends each the same kind of load:
signed deliveries of new bookings from a load generator in another process, over 32 keep-alive
connections. `serve` runs as deployed, with SQLite in WAL mode, `synchronous=FULL`, and its
worker writing to the Calendar emulator, so each 200 follows a durable commit.
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


@dataclass(frozen=True)
class ReceiverOptions:
    """How long and how often to load each server; `capacity` sizes the request files."""

    runs: int
    seconds: float
    capacity_per_second: int
    generator: str = "auto"


def run_receiver(workdir: Path, options: ReceiverOptions, emulator: RecordingEmulator) -> Section:
    """Measure both servers `options.runs` times and return the figures."""
    section = Section(
        "Receiver throughput and acknowledgement latency",
        f"{CONNECTIONS} connections, {options.seconds:g} s per server and run after a {WARMUP_SECONDS:g} s "
        f"warm-up, new-booking deliveries of about 2.2 kB with non-ASCII text, each with a unique "
        f"delivery id and body. The bare endpoint runs under the same `uvicorn.run` call as `serve`.",
    )
    measured_file = workdir / "receiver-requests.tsv"
    warmup_file = workdir / "receiver-warmup.tsv"
    count = int(options.seconds * options.capacity_per_second)
    write_request_file(measured_file, new_bookings("rcv", count, HOSTS))
    write_request_file(warmup_file, new_bookings("rcv-warm", int(WARMUP_SECONDS * options.capacity_per_second), HOSTS, first=count))

    for run in range(options.runs):
        with bare_process(workdir / f"bare-{run}") as bare:
            run_load(bare.base_url, warmup_file, connections=CONNECTIONS, duration=WARMUP_SECONDS, generator=options.generator)
            bare_result = run_load(bare.base_url, measured_file, connections=CONNECTIONS, duration=options.seconds, generator=options.generator)

        serve_dir = workdir / f"serve-{run}"
        shutil.rmtree(serve_dir, ignore_errors=True)
        emulator.emulator.latency = 0.02
        with serve_process(serve_dir, emulator.connector_settings()) as serve:
            run_load(serve.base_url, warmup_file, connections=CONNECTIONS, duration=WARMUP_SECONDS, generator=options.generator)
            serve_result = run_load(serve.base_url, measured_file, connections=CONNECTIONS, duration=options.seconds, generator=options.generator)
        stored = _stored_deliveries(serve_dir)

        _check(bare_result, "bare", count, check_restarts=False)
        _check(serve_result, "serve", count, check_restarts=True)
        acknowledged = serve_result.requests + int(WARMUP_SECONDS * options.capacity_per_second)
        if stored < serve_result.requests:
            raise RuntimeError(f"serve acknowledged {serve_result.requests} deliveries but stored only {stored}")

        _record(section, bare_result, serve_result)
        section.notes.append(
            f"Run {run + 1}: {serve_result.generator}, serve {serve_result.rate:,.0f}/s, bare {bare_result.rate:,.0f}/s; "
            f"{stored:,} deliveries stored for at most {acknowledged:,} sent."
        )
    return section


def _record(section: Section, bare: LoadResult, serve: LoadResult) -> None:
    section.figure("serve: requests/s", "req/s", decimals=0).add(serve.rate)
    section.figure("bare: requests/s", "req/s", decimals=0).add(bare.rate)
    section.figure(
        "serve / bare throughput", "%", target=">= 60 %", meets=lambda value: value >= 60.0,
    ).add(100 * serve.rate / bare.rate)
    section.figure("serve: p50 ack latency", "ms", decimals=2).add(serve.p50_ms)
    section.figure(
        "serve: p99 ack latency", "ms", decimals=2, target="<= 20 ms", meets=lambda value: value <= 20.0,
    ).add(serve.p99_ms)
    section.figure("bare: p50 latency", "ms", decimals=2).add(bare.p50_ms)
    section.figure("bare: p99 latency", "ms", decimals=2).add(bare.p99_ms)


def _check(result: LoadResult, name: str, capacity: int, *, check_restarts: bool) -> None:
    if result.errors:
        raise RuntimeError(f"{name}: {result.errors} requests failed or were answered with an error status")
    if check_restarts and result.file_restarts:
        raise RuntimeError(
            f"{name}: the load generator ran out of its {capacity:,} unique deliveries and sent some twice; "
            "raise the capacity"
        )


def _stored_deliveries(serve_dir: Path) -> int:
    return query_database(serve_dir, "SELECT count(*) FROM deliveries")[0][0]
