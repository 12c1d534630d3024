"""Helpers for the operator command tests: the CLI with a given environment, and `serve` as a process."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result

from connector.cli import main
from connector.logs import NOISY_LOGGERS
from connector.settings import Settings

EXECUTABLE = str(Path(sys.executable).with_name("proximity-sync"))

# Settings a developer may have exported; the CLI under test must not see them.
SETTING_NAMES = [name.upper() for name in Settings.model_fields]


def settings_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """Return the environment variables that configure a CLI process like `settings`."""
    env = {
        "PROXIMITY_WEBHOOK_SECRET": settings.proximity_webhook_secret,
        "DATABASE_URL": settings.database_url,
        "MAPPINGS_DIR": str(settings.mappings_dir),
        "CALENDAR_BACKEND": settings.backend_name,
        "GOOGLE_API_ENDPOINT": settings.google_api_endpoint,
        "CALL_TIMEOUT_SECONDS": str(settings.call_timeout_seconds),
        "CALL_MAX_ATTEMPTS": str(settings.call_max_attempts),
        "WORKER_POLL_SECONDS": str(settings.worker_poll_seconds),
        "DELIVERY_RETRY_BASE_SECONDS": str(settings.delivery_retry_base_seconds),
        "DELIVERY_RETRY_MAX_SECONDS": str(settings.delivery_retry_max_seconds),
    }
    if settings.google_credentials_file:
        env["GOOGLE_CREDENTIALS_FILE"] = str(settings.google_credentials_file)
    env.update(overrides)
    return env


def invoke(args: list[str], env: dict[str, str]) -> Result:
    """Run `proximity-sync ARGS` in-process with exactly the settings in `env`."""
    full_env: dict[str, str | None] = {name: None for name in SETTING_NAMES}
    full_env["PROMETHEUS_MULTIPROC_DIR"] = None
    full_env.update(env)
    return CliRunner().invoke(main, args, env=full_env, catch_exceptions=False)


@pytest.fixture
def keep_logging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run the test in `tmp_path` (no stray .env file) and undo the CLI's logging set-up afterwards."""
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, saved in levels.items():
            logging.getLogger(name).setLevel(saved)


def free_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


@dataclass
class ServedConnector:
    """A `proximity-sync serve` process on loopback; `output` contains its stderr once stopped."""

    base_url: str
    process: subprocess.Popen
    output: str = ""
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def webhook_url(self) -> str:
        return f"{self.base_url}/webhooks/proximity"


@contextmanager
def served_connector(tmp_path: Path, env: dict[str, str]) -> Iterator[ServedConnector]:
    """Run `proximity-sync serve` with exactly the settings in `env`, from `tmp_path`, until the block ends."""
    port = free_port()
    process_env = {key: value for key, value in os.environ.items() if key.upper() not in SETTING_NAMES}
    process_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    process_env.update(env)
    log_file = (tmp_path / f"serve-{port}.log").open("w+")
    process = subprocess.Popen(
        [EXECUTABLE, "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=process_env, stdout=subprocess.DEVNULL, stderr=log_file, text=True,
    )
    served = ServedConnector(f"http://127.0.0.1:{port}", process)
    try:
        _wait_until_ready(served, log_file)
        yield served
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log_file.seek(0)
        served.output = log_file.read()
        served.stderr_lines = served.output.splitlines()
        log_file.close()


def _wait_until_ready(served: ServedConnector, log_file, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            log_file.seek(0)
            raise AssertionError(f"serve exited early: {log_file.read()}")
        try:
            if httpx.get(f"{served.base_url}/healthz", timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("serve did not answer /healthz in time")
