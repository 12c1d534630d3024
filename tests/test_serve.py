"""`proximity-sync serve` as a user runs it: a real process, configured by environment variables."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import SECRET, booking, signed_delivery

pytestmark = pytest.mark.slow

EXECUTABLE = str(Path(sys.executable).with_name("proximity-sync"))


def free_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


def connector_env(tmp_path: Path, **values: str) -> dict[str, str]:
    """Return an environment with only the settings given, run from an empty folder."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PROXIMITY_", "GOOGLE_"))}
    env.update({"PROXIMITY_WEBHOOK_SECRET": SECRET, "DATABASE_URL": f"sqlite:///{tmp_path / 'serve.db'}"})
    env.update(values)
    return env


def wait_until_healthy(base_url: str, process: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited early: {process.stdout.read()}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("serve did not become ready")


def test_serve_google_turns_sample_into_event(tmp_path, emulator, service_account_key):
    port = free_port()
    env = connector_env(
        tmp_path,
        CALENDAR_BACKEND="google",
        GOOGLE_CREDENTIALS_FILE=str(service_account_key),
        GOOGLE_API_ENDPOINT=emulator.api_endpoint,
    )
    process = subprocess.Popen(
        [EXECUTABLE, "serve", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_until_healthy(base_url, process)
        delivery = signed_delivery("booking.created", booking())
        response = httpx.post(f"{base_url}/webhooks/proximity", content=delivery.body, headers=delivery.headers)

        deadline = time.monotonic() + 10
        while not emulator.events("jane@example.com") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)

    assert response.status_code == 200
    events = emulator.events("jane@example.com")
    assert len(events) == 1
    assert events[0]["summary"] == "30 Minute Call with Alex Johnson"
    assert process.returncode == 0
    assert "Calendar backend: google" in output
    assert "alex@example.com" not in output
    assert SECRET not in output


def test_serve_ics_prints_feed_url(tmp_path):
    port = free_port()
    env = connector_env(tmp_path)
    process = subprocess.Popen(
        [EXECUTABLE, "serve", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_until_healthy(base_url, process)
        delivery = signed_delivery("booking.created", booking())
        httpx.post(f"{base_url}/webhooks/proximity", content=delivery.body, headers=delivery.headers)
        time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGTERM)
        first_output, _ = process.communicate(timeout=30)

    restarted = subprocess.Popen(
        [EXECUTABLE, "serve", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_until_healthy(base_url, restarted)
        feed_line = ""
        deadline = time.monotonic() + 5
        while "Feed for" not in feed_line and time.monotonic() < deadline:
            feed_line = restarted.stdout.readline()
        feed_url = feed_line.split(": ", 1)[1].strip()
        feed = httpx.get(feed_url)
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.communicate(timeout=30)

    assert "Calendar backend: ics" in first_output
    assert feed_line.startswith("Feed for jane@example.com: ")
    assert feed.status_code == 200
    assert "SUMMARY:30 Minute Call with Alex Johnson" in feed.text


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("WEBHOOK_MAX_BODY_BYTES", "lots", "WEBHOOK_MAX_BODY_BYTES"),
        ("CALENDAR_BACKEND", "outlook", "CALENDAR_BACKEND"),
        ("GOOGLE_API_ENDPOINT", "ftp://example", "GOOGLE_API_ENDPOINT"),
    ],
)
def test_invalid_setting_stops_startup(tmp_path, setting, value, expected):
    result = subprocess.run(
        [EXECUTABLE, "serve", "--port", str(free_port())],
        cwd=tmp_path, env=connector_env(tmp_path, **{setting: value}), capture_output=True, text=True, timeout=30,
    )

    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_google_backend_without_credentials_stops_startup(tmp_path):
    result = subprocess.run(
        [EXECUTABLE, "serve"],
        cwd=tmp_path, env=connector_env(tmp_path, CALENDAR_BACKEND="google"), capture_output=True, text=True, timeout=30,
    )

    assert result.returncode != 0
    assert "GOOGLE_CREDENTIALS_FILE" in result.stderr
    assert "Traceback" not in result.stderr


def test_malformed_mappings_stop_startup(tmp_path):
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    (mappings / "routing.toml").write_text('[[route]]\nhost_email = "jane@example.com"\ncalendar_id = \n')

    result = subprocess.run(
        [EXECUTABLE, "serve"],
        cwd=tmp_path, env=connector_env(tmp_path), capture_output=True, text=True, timeout=30,
    )

    assert result.returncode != 0
    assert "routing.toml" in result.stderr
    assert "line 3" in result.stderr
    assert "Traceback" not in result.stderr


def run_until_sigint(tmp_path: Path, **values: str) -> tuple[subprocess.CompletedProcess, int]:
    """Start `serve` on a free loopback port, stop it with one SIGINT once ready, and return its output."""
    port = free_port()
    process = subprocess.Popen(
        [EXECUTABLE, "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=connector_env(tmp_path, **values), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", process)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), port


def test_serve_json_logs_every_line(tmp_path):
    result, port = run_until_sigint(tmp_path, LOG_FORMAT="json")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines() + result.stderr.splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}")
    messages = [record["message"] for record in records]
    uvicorn_messages = [record["message"] for record in records if record["logger"].startswith("uvicorn")]
    assert messages.count(f"Listening on http://127.0.0.1:{port} (press Ctrl+C to stop)") == 1
    assert len([message for message in messages if message.startswith("Started server process")]) == 1
    assert messages.count("Application startup complete.") == 1
    assert messages.count("Shutting down") == 1
    assert len([message for message in messages if message.startswith("Finished server process")]) == 1
    assert len(uvicorn_messages) == len(set(uvicorn_messages))
    assert messages.count(f"Webhook URL: http://127.0.0.1:{port}/webhooks/proximity") == 1
    assert all("color_message" not in record for record in records)


def test_serve_text_logs_uvicorn_lines(tmp_path):
    result, port = run_until_sigint(tmp_path)

    assert result.returncode == 0, result.stderr
    started = [line for line in result.stderr.splitlines() if "Started server process" in line]
    assert len(started) == 1
    assert " INFO uvicorn.error: Started server process [" in started[0]
    listening = [line for line in result.stderr.splitlines() if "Listening on" in line]
    assert len(listening) == 1
    assert listening[0].endswith(f" INFO connector.cli: Listening on http://127.0.0.1:{port} (press Ctrl+C to stop)")
    finished = [line for line in result.stderr.splitlines() if "Finished server process" in line]
    assert len(finished) == 1
    assert " INFO uvicorn.error: Finished server process [" in finished[0]
    assert f"Webhook URL: http://127.0.0.1:{port}/webhooks/proximity" in result.stdout.splitlines()


def test_serve_port_in_use_stops_at_once(tmp_path):
    with socket.socket() as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        port = occupant.getsockname()[1]
        began = time.monotonic()
        result = subprocess.run(
            [EXECUTABLE, "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path, env=connector_env(tmp_path), capture_output=True, text=True, timeout=30,
        )
        elapsed = time.monotonic() - began

    assert result.returncode == 1
    assert elapsed < 15
    assert result.stderr.splitlines()[-1] == (
        f"Error: cannot listen on 127.0.0.1:{port} because another process already uses that address; "
        "stop that process, or choose another port with --port"
    )
    assert "Traceback" not in result.stderr
    assert "Errno" not in result.stderr
    assert "sync worker" not in result.stderr
    assert "Webhook URL" not in result.stdout
