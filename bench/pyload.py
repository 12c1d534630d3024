"""A small HTTP/1.1 load generator for machines without wrk, and for paced background load.

It sends the lines of a request file (see `bench.payloads.write_request_file`) over keep-alive
connections and prints one `BENCH-JSON {...}` line with the same fields as bench/deliveries.lua.
Without `--rate` every connection sends its next request as soon as the response to the
previous one arrives, as wrk does. With `--rate`, requests start on a fixed schedule of that many per
second, and the latency is counted from the scheduled start.

    python -m bench.pyload --url http://127.0.0.1:8000 --file requests.tsv --connections 32 --duration 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench.payloads import WEBHOOK_PATH, read_request_file


class RequestSource:
    """Hands out the file's requests in order and counts restarts from the first line."""

    def __init__(self, requests: list[bytes]) -> None:
        self.requests = requests
        self.position = 0
        self.restarts = 0
        self.handed_out = 0

    def next(self) -> bytes:
        if self.position == len(self.requests):
            self.position = 0
            self.restarts += 1
        request = self.requests[self.position]
        self.position += 1
        self.handed_out += 1
        return request


def format_requests(path: Path, host: str) -> list[bytes]:
    """Render each delivery of the file as raw HTTP/1.1 request bytes."""
    rendered = []
    for delivery in read_request_file(path):
        head = [f"POST {WEBHOOK_PATH} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(delivery.body)}"]
        head += [f"{name}: {value}" for name, value in delivery.headers().items()]
        rendered.append(("\r\n".join(head) + "\r\n\r\n").encode("utf-8") + delivery.body)
    return rendered


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one response with a Content-Length body and return its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def run_connection(
    host: str,
    port: int,
    source: RequestSource,
    deadline: float,
    latencies: list[float],
    errors: dict[str, int],
    schedule: _Schedule | None,
    limit: int | None,
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.monotonic() < deadline and (limit is None or source.handed_out < limit):
            started = await schedule.wait() if schedule else time.monotonic()
            if started >= deadline:
                break
            writer.write(source.next())
            try:
                status = await read_response(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                errors["socket"] += 1
                return
            latencies.append(time.monotonic() - started)
            if status >= 400:
                errors["status"] += 1
    finally:
        writer.close()


class _Schedule:
    """Start times `interval` apart, shared by all connections of a paced run."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next_start = time.monotonic()

    async def wait(self) -> float:
        start = self.next_start
        self.next_start += self.interval
        delay = start - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        return start


async def run(url: str, path: Path, connections: int, duration: float, rate: float | None, limit: int | None) -> dict:
    """Run the load and return the summary that `main` prints."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    source = RequestSource(format_requests(path, f"{host}:{port}"))
    latencies: list[float] = []
    errors = {"status": 0, "socket": 0}
    schedule = _Schedule(rate) if rate else None

    started = time.monotonic()
    deadline = started + duration
    await asyncio.gather(*(
        run_connection(host, port, source, deadline, latencies, errors, schedule, limit) for _ in range(connections)
    ))
    elapsed = time.monotonic() - started

    latencies.sort()
    return {
        "requests": len(latencies),
        "duration_us": int(elapsed * 1e6),
        "p50_us": int(_percentile(latencies, 50) * 1e6),
        "p99_us": int(_percentile(latencies, 99) * 1e6),
        "max_us": int((latencies[-1] if latencies else 0.0) * 1e6),
        "errors_status": errors["status"],
        "errors_socket": errors["socket"],
        "file_restarts": source.restarts,
    }


def _percentile(sorted_values: list[float], percent: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, int(round(percent / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="Server base URL on loopback, such as http://127.0.0.1:8000.")
    parser.add_argument("--file", type=Path, required=True, help="Request file written by bench.payloads.")
    parser.add_argument("--connections", type=int, default=32, help="Keep-alive connections.")
    parser.add_argument("--duration", type=float, required=True, help="Seconds to send for.")
    parser.add_argument("--rate", type=float, help="Requests per second over all connections; default: each connection sends on every response.")
    parser.add_argument("--limit", type=int, help="Stop after this many requests.")
    arguments = parser.parse_args()

    try:
        import uvloop
    except ImportError:
        summary = asyncio.run(run(arguments.url, arguments.file, arguments.connections, arguments.duration, arguments.rate, arguments.limit))
    else:
        summary = uvloop.run(run(arguments.url, arguments.file, arguments.connections, arguments.duration, arguments.rate, arguments.limit))
    print("BENCH-JSON " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
