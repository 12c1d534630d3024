"""Run every benchmark and write docs/benchmarks.md.

    .venv/bin/python -m bench                 all benchmarks, about 9 minutes on 2 cores
    .venv/bin/python -m bench --only worker   one benchmark (receiver, latency, calls, worker, memory)
    .venv/bin/python -m bench --smoke         a few seconds of each, to check the harness works

Every server and emulator is started by the bench on 127.0.0.1 and stopped by it, every load
is bounded in requests and time, and the temporary folder is removed at the end. The smoke
mode and `--only` print their page instead of writing docs/benchmarks.md, unless `--output`
names a file, so a partial run never replaces the full record.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.calendar import RecordingEmulator
from bench.calls_bench import run_calls
from bench.latency_bench import LatencyOptions, run_latency
from bench.memory_bench import run_memory
from bench.receiver_bench import ReceiverOptions, run_receiver
from bench.report import write_report
from bench.results import Section
from bench.worker_bench import WorkerOptions, run_worker

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("receiver", "latency", "calls", "worker", "memory")


@dataclass(frozen=True)
class Plan:
    """The size of every benchmark for one invocation."""

    receiver: ReceiverOptions
    latency: LatencyOptions
    calls_bookings: int
    calls_settle_seconds: float
    worker: WorkerOptions
    memory_deliveries: int
    memory_runs: int


def full_plan(runs: int | None, generator: str) -> Plan:
    return Plan(
        receiver=ReceiverOptions(runs=runs or 5, seconds=8.0, capacity_per_second=20_000, generator=generator),
        # Well under the rate the worker sustains in the worker benchmark (about 160 changes/s), so it keeps up.
        latency=LatencyOptions(runs=runs or 3, probes=40, background_rate=25.0),
        calls_bookings=20,
        calls_settle_seconds=0.3,
        worker=WorkerOptions(runs=runs or 3, bookings=2_000, hosts=50),
        memory_deliveries=100_000,
        memory_runs=runs or 1,
    )


def smoke_plan(generator: str) -> Plan:
    return Plan(
        receiver=ReceiverOptions(runs=1, seconds=1.0, capacity_per_second=20_000, generator=generator),
        latency=LatencyOptions(runs=1, probes=3, background_rate=20.0, warmup_bookings=4, background_lead_seconds=0.5),
        calls_bookings=1,
        calls_settle_seconds=0.05,
        worker=WorkerOptions(runs=1, bookings=20, hosts=5),
        memory_deliveries=300,
        memory_runs=1,
    )


def run(plan: Plan, only: set[str], workdir: Path) -> list[Section]:
    """Run the chosen benchmarks against one emulator and return their sections."""
    steps: dict[str, Callable[[RecordingEmulator], Section]] = {
        "receiver": lambda emulator: run_receiver(workdir, plan.receiver, emulator),
        "latency": lambda emulator: run_latency(workdir, plan.latency, emulator),
        "calls": lambda emulator: run_calls(workdir, plan.calls_bookings, emulator, plan.calls_settle_seconds),
        "worker": lambda emulator: run_worker(workdir, plan.worker, emulator),
        "memory": lambda emulator: run_memory(workdir, plan.memory_deliveries, plan.memory_runs, emulator),
    }
    sections = []
    with RecordingEmulator(workdir / "emulator") as emulator:
        for name in BENCHMARKS:
            if name not in only:
                continue
            print(f"bench: running {name}", file=sys.stderr, flush=True)
            started = time.monotonic()
            try:
                sections.append(steps[name](emulator))
            except Exception as error:  # one broken benchmark must not lose the others' figures
                traceback.print_exc()
                sections.append(Section(name, f"The {name} benchmark failed: {type(error).__name__}: {error}", failed=True))
            print(f"bench: {name} took {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    return sections


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Run the benchmarks and write docs/benchmarks.md.")
    parser.add_argument("--smoke", action="store_true", help="Run a few seconds of each benchmark to check the harness.")
    parser.add_argument("--only", help=f"Comma-separated benchmarks to run, of: {', '.join(BENCHMARKS)}.")
    parser.add_argument("--runs", type=int, help="Runs per benchmark (default 5 for the receiver, 3 for latency and worker, 1 for memory).")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto",
                        help="Receiver load generator: wrk with bench/deliveries.lua, bench.pyload, or wrk when installed.")
    parser.add_argument("--output", type=Path, help="Page to write (default docs/benchmarks.md; with --smoke or --only, printed instead).")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary folder with the server logs and databases.")
    arguments = parser.parse_args(argv)

    only = set(arguments.only.split(",")) if arguments.only else set(BENCHMARKS)
    unknown = only - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}")

    plan = smoke_plan(arguments.generator) if arguments.smoke else full_plan(arguments.runs, arguments.generator)
    workdir = Path(tempfile.mkdtemp(prefix="proximity-bench-"))
    partial = arguments.smoke or arguments.only is not None
    output = arguments.output or (workdir / "benchmarks.md" if partial else ROOT / "docs" / "benchmarks.md")
    command = "python -m bench" + (" --smoke" if arguments.smoke else "") + (f" --only {arguments.only}" if arguments.only else "")

    started = datetime.now(UTC)
    load_at_start = os.getloadavg()[0]
    try:
        sections = run(plan, only, workdir)
        write_report(output, sections, command, started, load_at_start)
        print(output.read_text(encoding="utf-8") if partial and not arguments.output else f"bench: wrote {output}")
    finally:
        if arguments.keep:
            print(f"bench: kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    failed = [section.title for section in sections if section.failed]
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
