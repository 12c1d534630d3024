"""Writing docs/benchmarks.md: machine, versions, and each figure's median, spread and target.

Everything above the marker line is generated and replaced on every full run. Everything below
it is kept as it is, so the hand-written record of what each optimisation bought survives.
"""

from __future__ import annotations

import os
import platform
import sqlite3
import tempfile
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from bench.load import WRK_THREADS, wrk_version
from bench.results import Section

MARKER = "<!-- Generated above this line by `python -m bench`; kept below it. -->"
PACKAGES = (
    "uvicorn", "uvloop", "httptools", "starlette", "SQLAlchemy", "sqlmodel", "httpx",
    "google-api-python-client", "google-auth", "prometheus_client",
)


def machine_lines() -> list[str]:
    """Describe the CPU, memory, kernel and disk the figures were measured on."""
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores visible to the process",
        f"- Memory: {memory_kib / 1024 / 1024:.1f} GiB",
        f"- Kernel: {platform.system()} {platform.release()}",
        f"- Temporary files, SQLite databases included, under {tempfile.gettempdir()}",
    ]


def version_lines() -> list[str]:
    """Describe the Python, library, SQLite and load generator versions in use."""
    versions = []
    for package in PACKAGES:
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    return [
        f"- Python {platform.python_version()} ({platform.python_implementation()})",
        f"- {', '.join(versions)}",
        f"- SQLite {sqlite3.sqlite_version}, {sqlite_durability()}",
        f"- Load generator: {_generator()} (each receiver run names the one it used)",
    ]


def _generator() -> str:
    version = wrk_version()
    return f"{version} with {WRK_THREADS} threads" if version else "wrk not installed, so bench.pyload"


def sqlite_durability() -> str:
    """Return the journal mode and synchronous levels that the connector sets, read back from SQLite."""
    from sqlalchemy import text

    from connector.intake import SqliteInserter
    from connector.storage import create_tables, make_engine

    names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
    with tempfile.TemporaryDirectory() as folder:
        engine = make_engine(f"sqlite:///{folder}/probe.db", pool_size=1)
        create_tables(engine)
        with engine.connect() as connection:
            journal = connection.execute(text("PRAGMA journal_mode")).scalar()
            level = connection.execute(text("PRAGMA synchronous")).scalar()
        inserter = SqliteInserter(engine)
        intake_level = inserter.pragma("synchronous")
        inserter.close()
        engine.dispose()
    return (
        f"journal_mode={journal}, synchronous={names.get(intake_level, intake_level)} for the receiver's inserts "
        f"and synchronous={names.get(level, level)} for the worker's writes"
    )


def render(sections: list[Section], command: str, started: datetime, finished: datetime, load_at_start: float) -> str:
    """Return the generated part of the page."""
    lines = [
        "# Benchmarks",
        "",
        f"Measured by `{command}` (the `bench` package) from {started:%Y-%m-%d %H:%M} to {finished:%H:%M} UTC. "
        "Each figure is the median of the runs, with the lowest and highest run as its spread. "
        "Absolute figures hold for this machine only; ratios and counts carry over.",
        "",
        "## Machine",
        "",
        *machine_lines(),
        f"- Load average over 1 minute: {load_at_start:.2f} when the run started, {os.getloadavg()[0]:.2f} when it "
        "ended (other jobs on the machine show up here and make the figures vary)",
        "",
        "## Versions",
        "",
        *version_lines(),
        "",
        "## Summary",
        "",
        "| Benchmark | Figure | Median | Spread | Runs | Target | Met |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for section in sections:
        for figure in section.figures:
            if figure.target:
                lines.append(_row(section.title, figure))
    for section in sections:
        lines += ["", f"## {section.title}", "", section.method, "", "| Figure | Median | Spread | Runs | Target | Met |", "|---|---:|---:|---:|---|---|"]
        lines += [_row(None, figure) for figure in section.figures]
        if section.notes:
            lines.append("")
            lines += [f"- {note}" for note in section.notes]
    return "\n".join(lines) + "\n"


def _row(section_title: str | None, figure) -> str:
    cells = [f"{figure.name}"]
    if section_title is not None:
        cells.insert(0, section_title)
    cells += [
        f"{figure.format(figure.median)} {figure.unit}",
        figure.spread(),
        str(len(figure.values)),
        figure.target,
        figure.verdict(),
    ]
    return "| " + " | ".join(cells) + " |"


def write_report(path: Path, sections: list[Section], command: str, started: datetime, load_at_start: float) -> None:
    """Write the generated part to `path` and keep what follows the marker in the existing file."""
    kept = "\n## What each optimisation bought\n\nNot recorded yet.\n"
    if path.exists():
        existing = path.read_text(encoding="utf-8")
        if MARKER in existing:
            kept = existing.split(MARKER, 1)[1]
    generated = render(sections, command, started, datetime.now(UTC), load_at_start)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(generated + "\n" + MARKER + kept, encoding="utf-8")
