"""Crash safety and graceful stops of the real process: `kill -9` and SIGTERM at chosen points.

Each test runs `proximity-sync serve` (or `worker`) as a subprocess on a SQLite file, configured by
environment variables and writing to the emulator, then kills or stops it and starts it again on
the same database. The emulator keeps a call open (a delayed fault) so that the kill lands at a
known point: before the worker picked a delivery up, during a calendar call, or after the calendar
stored a change whose response never reached the connector.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from starlette.testclient import TestClient

from connector.app import build_connector, build_web_app
from connector.decisions import event_id_for
from connector.storage import BookingLease, BookingMapping, Delivery, DeliveryState, make_engine, utcnow
from tests.calendar_state import assert_mirrored, wait_until
from tests.support import SECRET, booking, signed_delivery
from tests.support import connector_settings as connector_settings

pytestmark = pytest.mark.slow

EXECUTABLE = str(Path(sys.executable).with_name("proximity-sync"))
JANE = "jane@example.com"
OMAR = "omar@example.com"

# Long enough that the connector is always killed while the emulator still keeps the call open.
HELD_CALL_SECONDS = 30


def free_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


class ConnectorProcess:
    """`proximity-sync serve` or `worker` running as a subprocess, with its output kept in a file."""

    def __init__(self, command: str, env: dict[str, str], workdir: Path, log_name: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        arguments = [EXECUTABLE, command] + (["--port", str(self.port)] if command == "serve" else [])
        self.log_path = workdir / log_name
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(arguments, cwd=workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until `serve` returns 200 for /readyz."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the connector exited early:\n{self.output()}"
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the connector did not become ready:\n{self.output()}")

    def deliver(self, event: str, payload: dict, created_at: str = "2026-03-16T14:05:00Z", **kwargs) -> httpx.Response:
        delivery = signed_delivery(event, payload, created_at, **kwargs)
        response = httpx.post(f"{self.base_url}/webhooks/proximity", content=delivery.body, headers=delivery.headers)
        assert response.status_code == 200, response.text
        return response

    def kill(self) -> None:
        """Send SIGKILL, as `kill -9` does, and reap the process."""
        self.process.kill()
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 15.0) -> tuple[int, float]:
        """Send SIGTERM; return the exit code and the seconds the process took to exit."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        return code, time.monotonic() - started

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()


class Deployment:
    """One database and configuration, on which connector processes are started one after another."""

    def __init__(self, workdir: Path, emulator, service_account_key: Path, stack: ExitStack) -> None:
        self.workdir = workdir
        self.database_url = f"sqlite:///{workdir / 'crash.db'}"
        self.engine = make_engine(self.database_url, pool_size=1)
        stack.callback(self.engine.dispose)
        self._stack = stack
        self._starts = 0
        (workdir / "mappings").mkdir(exist_ok=True)
        self.env = {key: value for key, value in os.environ.items() if not key.startswith(("PROXIMITY_", "GOOGLE_"))}
        self.env.update({
            "PROXIMITY_WEBHOOK_SECRET": SECRET,
            "DATABASE_URL": self.database_url,
            "CALENDAR_BACKEND": "google",
            "GOOGLE_CREDENTIALS_FILE": str(service_account_key),
            "GOOGLE_API_ENDPOINT": emulator.api_endpoint,
            "MAPPINGS_DIR": str(workdir / "mappings"),
            "LEASE_SECONDS": "2",
            "WORKER_POLL_SECONDS": "0.1",
            "DELIVERY_RETRY_BASE_SECONDS": "0.2",
            "DELIVERY_RETRY_MAX_SECONDS": "1",
            "CALL_MAX_ATTEMPTS": "2",
            "PRUNE_INTERVAL_SECONDS": "0",
        })

    def start(self, command: str = "serve", **settings: str) -> ConnectorProcess:
        self._starts += 1
        env = {**self.env, **settings}
        process = ConnectorProcess(command, env, self.workdir, f"{command}-{self._starts}.log")
        self._stack.callback(process.close)
        if command == "serve":
            process.wait_ready()
        return process

    def deliveries(self) -> dict[str, Delivery]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(Delivery)).all()
        return {row.delivery_id: row for row in rows}

    def states(self) -> dict[str, str]:
        return {delivery_id: row.state for delivery_id, row in self.deliveries().items()}

    def mapping(self, booking_id: str) -> tuple[str, str | None] | None:
        """Return the state and event id that the mapping table records for a booking."""
        with self.engine.connect() as connection:
            row = connection.execute(
                select(BookingMapping.state, BookingMapping.event_id).where(BookingMapping.booking_id == booking_id)
            ).first()
        return tuple(row) if row else None

    def leases(self) -> dict[str, BookingLease]:
        with self.engine.connect() as connection:
            return {row.booking_id: row for row in connection.execute(select(BookingLease)).all()}

    def wait_finished(self, timeout: float = 30.0) -> None:
        """Wait until no delivery is pending."""
        wait_until(lambda: DeliveryState.PENDING not in self.states().values(), timeout,
                   f"every delivery was finished: {self.states()}")


@pytest.fixture
def deployment(tmp_path, emulator, service_account_key) -> Iterator[Deployment]:
    with ExitStack() as stack:
        yield Deployment(tmp_path, emulator, service_account_key, stack)


def test_kill_before_pickup_and_mid_call(deployment, emulator):
    # One worker thread, held by the first booking's insert: the second booking is accepted but
    # not picked up when the process dies.
    connector = deployment.start(WORKER_THREADS="1")
    held = emulator.add_fault("POST", status=503, delay=HELD_CALL_SECONDS, times=1)
    connector.deliver("booking.created", booking(id="bkg_in_call"), delivery_id="dlv_in_call")
    wait_until(lambda: held.hits == 1, 20, "the first insert reached the calendar")
    connector.deliver("booking.created", booking(id="bkg_waiting"), delivery_id="dlv_waiting")
    lease = deployment.leases()["bkg_in_call"]

    connector.kill()
    assert emulator.events(JANE) == []
    assert deployment.states() == {"dlv_in_call": "pending", "dlv_waiting": "pending"}
    assert "bkg_waiting" not in deployment.leases()

    deployment.start(WORKER_THREADS="1")
    deployment.wait_finished()

    assert deployment.states() == {"dlv_in_call": "applied", "dlv_waiting": "applied"}
    # The dead worker's booking was taken over only once its lease had expired.
    assert utcnow() >= lease.expires_at
    assert_mirrored(emulator, [JANE], active=["bkg_in_call", "bkg_waiting"])


def test_kill_after_calendar_committed_insert(deployment, emulator):
    connector = deployment.start()
    emulator.add_fault("POST", status=503, after_commit=True, delay=HELD_CALL_SECONDS, times=1)
    connector.deliver("booking.created", booking(), delivery_id="dlv_create")
    wait_until(lambda: emulator.events(JANE), 20, "the calendar stored the event")

    connector.kill()
    assert deployment.states() == {"dlv_create": "pending"}

    deployment.start()
    deployment.wait_finished()

    assert deployment.states() == {"dlv_create": "applied"}
    assert [event["id"] for event in emulator.events(JANE)] == [event_id_for("bkg_xyz789", 0)]
    assert deployment.mapping("bkg_xyz789") == ("live", event_id_for("bkg_xyz789", 0))
    assert_mirrored(emulator, [JANE], active=["bkg_xyz789"])


def test_kill_after_calendar_committed_delete(deployment, emulator):
    connector = deployment.start()
    connector.deliver("booking.created", booking(), "2026-03-16T14:05:00Z", delivery_id="dlv_create")
    deployment.wait_finished()
    emulator.add_fault("DELETE", status=503, after_commit=True, delay=HELD_CALL_SECONDS, times=1)
    connector.deliver("booking.cancelled", booking(status="Cancelled"), "2026-03-16T14:10:00Z", delivery_id="dlv_cancel")
    wait_until(lambda: not emulator.events(JANE), 20, "the calendar deleted the event")

    connector.kill()
    assert deployment.states()["dlv_cancel"] == "pending"

    deployment.start()
    deployment.wait_finished()

    assert deployment.states() == {"dlv_create": "applied", "dlv_cancel": "applied"}
    assert_mirrored(emulator, [JANE], active=[], removed=["bkg_xyz789"])


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_at_random_moment_of_a_burst(deployment, emulator, seed):
    chance = random.Random(seed)
    emulator.latency = 0.02
    connector = deployment.start(WORKER_THREADS="4")
    active, cancelled = [], []
    for number in range(16):
        booking_id = f"bkg_burst_{number}"
        host = {"hostEmail": OMAR} if chance.random() < 0.5 else {}
        connector.deliver("booking.created", booking(id=booking_id, **host), "2026-03-16T14:05:00Z")
        if chance.random() < 0.4:
            connector.deliver("booking.cancelled", booking(id=booking_id, status="Cancelled", **host),
                              "2026-03-16T14:10:00Z")
            cancelled.append(booking_id)
        else:
            active.append(booking_id)

    time.sleep(chance.uniform(0.05, 0.6))
    connector.kill()
    deployment.start(WORKER_THREADS="4")
    deployment.wait_finished()

    assert set(deployment.states().values()) <= {"applied", "stale"}
    assert_mirrored(emulator, [JANE, OMAR], active=active, removed=cancelled)


def start_with_delivery(deployment: Deployment, tmp_path: Path, command: str, **settings: str) -> ConnectorProcess:
    """Start `serve` and send it a booking, or store the booking with a receiver here and start `worker`."""
    if command == "serve":
        connector = deployment.start("serve", **settings)
        connector.deliver("booking.created", booking(), delivery_id="dlv_create")
        return connector

    receiver_dir = tmp_path / "receiver"
    receiver_dir.mkdir()
    receiver_settings = connector_settings(receiver_dir, database_url=deployment.database_url, prune_interval_seconds=0)
    delivery = signed_delivery("booking.created", booking(), delivery_id="dlv_create")
    with TestClient(build_web_app(build_connector(receiver_settings, with_worker=False))) as receiver:
        response = receiver.post("/webhooks/proximity", content=delivery.body, headers=delivery.headers)
    assert response.status_code == 200
    return deployment.start("worker", **settings)


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_sigterm_finishes_call_in_flight(deployment, emulator, tmp_path, command):
    held = emulator.add_fault("POST", status=None, delay=1.5, times=1)
    connector = start_with_delivery(deployment, tmp_path, command)
    wait_until(lambda: held.hits == 1, 20, "the insert reached the calendar")

    code, seconds = connector.terminate()

    assert code == 0, connector.output()
    assert seconds < 20
    assert deployment.states() == {"dlv_create": "applied"}
    assert deployment.leases() == {}
    assert_mirrored(emulator, [JANE], active=["bkg_xyz789"])


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_sigterm_cuts_retry_wait_and_releases_lease(deployment, emulator, tmp_path, command):
    # The calendar requests 30 s before a retry, and leases last a minute. A restart applies the
    # delivery at once only if the stopped process released its lease.
    failing = emulator.add_fault("POST", status=503, retry_after=30, times=None)
    connector = start_with_delivery(deployment, tmp_path, command, LEASE_SECONDS="60")
    wait_until(lambda: failing.hits == 1, 20, "the first insert failed")
    time.sleep(0.3)

    code, seconds = connector.terminate()

    stopped = deployment.deliveries()["dlv_create"]
    assert code == 0, connector.output()
    # Without the cut, the process would sit out the calendar's 30 s Retry-After first.
    assert seconds < 15
    assert stopped.state == "pending"
    assert stopped.attempts == 0
    assert deployment.leases() == {}

    emulator.clear_faults()
    restarted = time.monotonic()
    deployment.start("serve", LEASE_SECONDS="60")
    deployment.wait_finished(timeout=20)

    assert time.monotonic() - restarted < 30
    assert deployment.states() == {"dlv_create": "applied"}
    assert_mirrored(emulator, [JANE], active=["bkg_xyz789"])
