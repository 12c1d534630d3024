"""Server processes for the benchmarks: `proximity-sync serve` and the bare baseline, on loopback.

Each server runs in its own process with its own working folder, so no `.env` of the developer
is read, and stops when the bench leaves the `with` block.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.payloads import SECRET
from connector.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT = 60.0
SHUTDOWN_TIMEOUT = 20.0


@dataclass
class ServerProcess:
    """A running server: its process, base URL and log file."""

    name: str
    process: subprocess.Popen
    base_url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def memory_kib(self) -> tuple[int, int]:
        """Return the process's current and peak resident set size in KiB (VmRSS, VmHWM)."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0])
        return fields["VmRSS"], fields["VmHWM"]

    def cpu_seconds(self) -> float:
        """Return the user plus system CPU time the process has used so far."""
        parts = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(parts[11]) + int(parts[12])
        return ticks / os.sysconf("SC_CLK_TCK")


def query_database(workdir: Path, sql: str, parameters: tuple = ()) -> list[tuple]:
    """Run one query on the SQLite file of the `serve` process that ran in `workdir`."""
    connection = sqlite3.connect(workdir / "connector.db", timeout=30)
    try:
        return connection.execute(sql, parameters).fetchall()
    finally:
        connection.close()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def connector_environment(workdir: Path, overrides: dict[str, str]) -> dict[str, str]:
    """Return the environment of a `serve` process: the caller's, less every connector setting, plus ours."""
    setting_names = {name.upper() for name in Settings.model_fields}
    environment = {name: value for name, value in os.environ.items() if name.upper() not in setting_names}
    mappings = workdir / "mappings"
    mappings.mkdir(parents=True, exist_ok=True)
    environment.update({
        "PROXIMITY_WEBHOOK_SECRET": SECRET,
        "DATABASE_URL": f"sqlite:///{workdir / 'connector.db'}",
        "MAPPINGS_DIR": str(mappings),
        "PYTHONPATH": str(ROOT),
    })
    environment.update(overrides)
    return environment


@contextmanager
def serve_process(workdir: Path, settings: dict[str, str], *, worker: bool = True) -> Iterator[ServerProcess]:
    """Run `proximity-sync serve` with the bench secret, a SQLite file in `workdir` and `settings`.

    Without `worker`, it runs as `serve --no-worker`: the receiver alone.
    """
    port = free_port()
    script = Path(sys.executable).with_name("proximity-sync")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "connector.cli"]
    command += ["serve", "--host", LOOPBACK, "--port", str(port)]
    if not worker:
        command.append("--no-worker")
    with _running("serve", command, port, workdir, connector_environment(workdir, settings)) as server:
        yield server


@contextmanager
def bare_process(workdir: Path) -> Iterator[ServerProcess]:
    """Run the bare Starlette endpoint of `bench.bare_app`."""
    port = free_port()
    command = [sys.executable, "-m", "bench.bare_app", "--host", LOOPBACK, "--port", str(port)]
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    with _running("bare", command, port, workdir, environment) as server:
        yield server


@contextmanager
def _running(name: str, command: list[str], port: int, workdir: Path, environment: dict[str, str]) -> Iterator[ServerProcess]:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(command, cwd=workdir, env=environment, stdout=log_file, stderr=subprocess.STDOUT)
    server = ServerProcess(name, process, f"http://{LOOPBACK}:{port}", log_path)
    try:
        _wait_ready(server)
        yield server
    finally:
        _stop(server)


def _wait_ready(server: ServerProcess) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.name} exited with {server.process.returncode}; see {server.log_path}")
            try:
                if client.get(f"{server.base_url}/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    raise RuntimeError(f"{server.name} did not respond on /healthz within {STARTUP_TIMEOUT:.0f} s; see {server.log_path}")


def _stop(server: ServerProcess) -> None:
    if server.process.poll() is not None:
        return
    server.process.send_signal(signal.SIGINT)
    try:
        server.process.wait(SHUTDOWN_TIMEOUT)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
