"""The benchmark harness in smoke mode: every benchmark runs briefly and writes its section.

This checks that the harness works, not the figures: a smoke run is far too short to measure.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = (
    "Receiver throughput and acknowledgement latency",
    "Delivery to first calendar request",
    "Calendar calls per booking change",
    "Worker throughput",
    "Memory",
)


@pytest.mark.slow
def test_bench_smoke_writes_every_section(tmp_path: Path):
    output = tmp_path / "benchmarks.md"

    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )

    assert completed.returncode == 0, completed.stderr[-4000:]
    page = output.read_text(encoding="utf-8")
    for title in SECTIONS:
        assert f"## {title}" in page
    assert "## Machine" in page
    assert "synchronous=FULL" in page
