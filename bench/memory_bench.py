"""Peak resident memory of `serve` after a given number of deliveries.

`serve` runs as deployed, with its worker writing to the emulator, and receives new-booking
deliveries over 32 connections from bench.pyload, which stops after the given count. The
figure is the kernel's high-water mark of the process's resident set (VmHWM in
/proc/PID/status), read once every delivery has its response, in MB of 10^6 bytes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bench.calendar import RecordingEmulator
from bench.load import run_load
from bench.payloads import new_bookings, write_request_file
from bench.results import Section
from bench.servers import query_database, serve_process

CONNECTIONS = 32
HOSTS = 50


def run_memory(workdir: Path, deliveries: int, runs: int, emulator: RecordingEmulator) -> Section:
    """Send `deliveries` deliveries to a fresh `serve` `runs` times and return its peak RSS."""
    section = Section(
        "Memory",
        f"{deliveries:,} new-booking deliveries over {CONNECTIONS} connections to a fresh `serve` "
        "(SQLite, worker writing to the emulator with 20 ms latency); peak RSS is VmHWM of the process.",
    )
    request_file = workdir / "memory-requests.tsv"
    write_request_file(request_file, new_bookings("mem", deliveries, HOSTS))

    for run in range(runs):
        serve_dir = workdir / f"memory-{run}"
        shutil.rmtree(serve_dir, ignore_errors=True)
        emulator.emulator.reset()
        emulator.emulator.latency = 0.02
        with serve_process(serve_dir, emulator.connector_settings()) as serve:
            started_kib, _ = serve.memory_kib()
            result = run_load(
                serve.base_url, request_file, connections=CONNECTIONS, duration=3600,
                generator="python", limit=deliveries,
            )
            _, peak_kib = serve.memory_kib()
        stored = query_database(serve_dir, "SELECT count(*) FROM deliveries")[0][0]
        if result.errors or stored < deliveries:
            raise RuntimeError(f"memory run: {result.errors} failed requests, {stored} of {deliveries} stored")

        section.figure("RSS after start-up", "MB").add(started_kib * 1024 / 1e6)
        section.figure(
            f"peak RSS after {deliveries:,} deliveries", "MB", target="<= 150 MB", meets=lambda value: value <= 150.0,
        ).add(peak_kib * 1024 / 1e6)
        section.notes.append(f"Run {run + 1}: {result.requests:,} deliveries in {result.seconds:.1f} s.")
    return section
