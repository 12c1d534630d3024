"""Running a load generator in its own process: wrk with bench/deliveries.lua, or bench.pyload."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LUA_SCRIPT = Path(__file__).with_name("deliveries.lua")

# wrk's own default. With one thread, wrk limited the bare endpoint on a 2-core VM to 14,700–18,200
# req/s, where two threads reached 21,900–24,000, and `serve --no-worker` to 8,500–8,900 against
# 9,700–10,000. One thread raised the connector's share of bare from about 44 to 49–59 %, because
# it held back the faster server more. Three and four threads gave the same share as two.
WRK_THREADS = 2


@dataclass(frozen=True)
class LoadResult:
    """The summary of one load run, with latencies in milliseconds."""

    generator: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    file_restarts: int

    @property
    def rate(self) -> float:
        """Completed requests per second."""
        return self.requests / self.seconds if self.seconds else 0.0


def wrk_available() -> bool:
    """Tell whether wrk is on PATH."""
    return shutil.which("wrk") is not None


def wrk_version() -> str | None:
    """Return wrk's version line, or None without wrk."""
    if not wrk_available():
        return None
    completed = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    first_line = (completed.stdout or completed.stderr).splitlines()[0]
    return first_line.split(" [")[0]


def run_load(
    base_url: str,
    request_file: Path,
    *,
    connections: int,
    duration: float,
    generator: str = "auto",
    rate: float | None = None,
    limit: int | None = None,
) -> LoadResult:
    """Send the request file to `base_url` and return the summary.

    `generator` is "wrk", "python" or "auto" (wrk when installed). A paced run (`rate`) or a
    bounded one (`limit`) always uses the Python generator, because wrk has neither option.
    """
    if generator == "auto":
        generator = "wrk" if wrk_available() and rate is None and limit is None else "python"

    if generator == "wrk":
        command = [
            "wrk", f"-t{WRK_THREADS}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "10s",
            "-s", str(LUA_SCRIPT), base_url, "--", str(request_file), str(WRK_THREADS),
        ]
        timeout = duration + 60
    else:
        command = [
            sys.executable, "-m", "bench.pyload", "--url", base_url, "--file", str(request_file),
            "--connections", str(connections), "--duration", str(duration),
        ]
        if rate is not None:
            command += ["--rate", str(rate)]
        if limit is not None:
            command += ["--limit", str(limit)]
        timeout = duration + 120

    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment, check=False)
    summary = _parse_summary(completed.stdout)
    if completed.returncode != 0 or summary is None:
        raise RuntimeError(
            f"{generator} failed with exit code {completed.returncode}: {completed.stderr.strip()[-2000:]}"
        )

    return LoadResult(
        generator=generator,
        requests=summary["requests"],
        seconds=summary["duration_us"] / 1e6,
        p50_ms=summary["p50_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        max_ms=summary["max_us"] / 1000,
        errors=summary["errors_status"] + summary["errors_socket"],
        file_restarts=summary["file_restarts"],
    )


def _parse_summary(output: str) -> dict | None:
    for line in output.splitlines():
        if line.startswith("BENCH-JSON "):
            return json.loads(line.removeprefix("BENCH-JSON "))
    return None
