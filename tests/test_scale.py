"""Several receiver and worker processes on one PostgreSQL database, against the Calendar emulator.

Each test starts `proximity-sync serve --no-worker` receivers and `proximity-sync worker` processes
as a user would and sends signed deliveries over HTTP. It then checks the calendar and the
deliveries table. The concurrency test also checks an audit of every lease change and every
finished delivery, which triggers installed by the test write.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, text

from connector.decisions import event_id_for
from connector.storage import Delivery, make_engine
from tests.support import SECRET, PostgresSchemas, SignedDelivery, booking, signed_delivery

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

EXECUTABLE = str(Path(sys.executable).with_name("proximity-sync"))
HOSTS = [f"host{number}@example.com" for number in range(4)]
FINAL_STATES = {"applied", "stale"}

# Test-only audit: one row per change of a lease and per delivery that reaches a final state.
AUDIT_DDL = [
    """CREATE TABLE lease_audit (
        seq bigserial PRIMARY KEY,
        booking_id text NOT NULL,
        operation text NOT NULL,
        old_owner text,
        new_owner text,
        old_expires_at timestamptz,
        recorded_at timestamptz NOT NULL DEFAULT clock_timestamp())""",
    """CREATE FUNCTION audit_lease() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO lease_audit (booking_id, operation, new_owner) VALUES (NEW.booking_id, 'insert', NEW.owner);
        ELSIF TG_OP = 'UPDATE' THEN
            INSERT INTO lease_audit (booking_id, operation, old_owner, new_owner, old_expires_at)
            VALUES (NEW.booking_id, 'update', OLD.owner, NEW.owner, OLD.expires_at);
        ELSE
            INSERT INTO lease_audit (booking_id, operation, old_owner) VALUES (OLD.booking_id, 'delete', OLD.owner);
        END IF;
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER lease_audit AFTER INSERT OR UPDATE OR DELETE ON booking_leases
        FOR EACH ROW EXECUTE FUNCTION audit_lease()""",
    "CREATE TABLE finish_audit (delivery_id text NOT NULL, state text NOT NULL)",
    """CREATE FUNCTION audit_finish() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO finish_audit (delivery_id, state) VALUES (NEW.delivery_id, NEW.state);
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER finish_audit AFTER UPDATE ON deliveries FOR EACH ROW
        WHEN (NEW.finished_at IS NOT NULL AND NEW.finished_at IS DISTINCT FROM OLD.finished_at)
        EXECUTE FUNCTION audit_finish()""",
]


def free_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


@dataclass(frozen=True)
class PlannedBooking:
    """A booking's deliveries, oldest snapshot first, and what its calendar event must end up as."""

    booking_id: str
    host: str
    deliveries: list[SignedDelivery]
    cancelled: bool
    summary: str
    start: str


def plan_bookings(count: int, *, cancel_every: int | None, prefix: str) -> list[PlannedBooking]:
    """Build five deliveries per booking: a create and four reschedules, the last one a cancellation
    for every `cancel_every`-th booking."""
    planned = []
    for number in range(count):
        booking_id = f"bkg_{prefix}_{number:03d}"
        host = HOSTS[number % len(HOSTS)]
        first_start = datetime(2026, 5, 4, 8, tzinfo=UTC) + timedelta(hours=number)
        first_version = datetime(2026, 3, 20, 10, tzinfo=UTC) + timedelta(seconds=number)
        cancelled = cancel_every is not None and number % cancel_every == 0
        deliveries = []
        for step in range(5):
            start = first_start + timedelta(minutes=30 * step)
            payload = booking(
                id=booking_id,
                hostEmail=host,
                hostUserId=f"usr_{host.split('@')[0]}",
                startTime=_iso(start),
                endTime=_iso(start + timedelta(minutes=30)),
                invitee={"name": f"Guest {number} v{step}", "email": "guest@example.com", "timezone": "UTC"},
            )
            event = "booking.created" if step == 0 else "booking.rescheduled"
            if step == 4 and cancelled:
                event = "booking.cancelled"
                payload["status"] = "Cancelled"
            version = _iso(first_version + timedelta(minutes=step))
            deliveries.append(signed_delivery(event, payload, version, delivery_id=f"dlv_{prefix}_{number:03d}_{step}"))
        planned.append(PlannedBooking(
            booking_id=booking_id,
            host=host,
            deliveries=deliveries,
            cancelled=cancelled,
            summary=f"30 Minute Call with Guest {number} v4",
            start=_iso(first_start + timedelta(minutes=120)),
        ))
    return planned


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class Deployment:
    """Receiver and worker processes sharing one database, with their output in log files."""

    def __init__(self, tmp_path: Path, database_url: str, emulator, key: Path, **settings: str) -> None:
        self.tmp_path = tmp_path
        (tmp_path / "mappings").mkdir(exist_ok=True)
        self.env = {key: value for key, value in os.environ.items() if not key.startswith(("PROXIMITY_", "GOOGLE_"))}
        self.env.update({
            "DATABASE_URL": database_url,
            "PROXIMITY_WEBHOOK_SECRET": SECRET,
            "CALENDAR_BACKEND": "google",
            "GOOGLE_CREDENTIALS_FILE": str(key),
            "GOOGLE_API_ENDPOINT": emulator.api_endpoint,
            "MAPPINGS_DIR": str(tmp_path / "mappings"),
            "WORKER_THREADS": "4",
            "WORKER_POLL_SECONDS": "1",
            "LEASE_SECONDS": "60",
            "DELIVERY_RETRY_BASE_SECONDS": "0.05",
            "DELIVERY_RETRY_MAX_SECONDS": "0.3",
            "CALL_MAX_ATTEMPTS": "2",
            "CALL_TIMEOUT_SECONDS": "5",
            "GOOGLE_USER_REQUESTS_PER_MINUTE": "600000",
            "GOOGLE_PROJECT_REQUESTS_PER_MINUTE": "6000000",
            "LOG_LEVEL": "INFO",
        })
        self.env.update(settings)
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.receivers: list[tuple[str, subprocess.Popen]] = []

    def start_receiver(self) -> str:
        """Start a receiver and return its base URL; `wait_ready` waits until it responds."""
        port = free_port()
        process = self._start(f"receiver-{port}", "serve", "--no-worker", "--port", str(port))
        url = f"http://127.0.0.1:{port}"
        self.receivers.append((url, process))
        return url

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until every receiver responds to `/readyz` with 200."""
        deadline = time.monotonic() + timeout
        for url, process in self.receivers:
            self._wait_ready(url, process, deadline)

    def start_worker(self) -> None:
        self._start(f"worker-{len(self.processes)}", "worker")

    def stop(self) -> dict[str, int | None]:
        """Stop every process with SIGTERM and return their exit codes by name."""
        for _, process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = {}
        for name, process in self.processes:
            try:
                codes[name] = process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = None
        return codes

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")

    def _start(self, name: str, *arguments: str) -> subprocess.Popen:
        output = open(self.tmp_path / f"{name}.log", "w")
        process = subprocess.Popen(
            [EXECUTABLE, *arguments], cwd=self.tmp_path, env=self.env, stdout=output, stderr=subprocess.STDOUT
        )
        output.close()
        self.processes.append((name, process))
        return process

    def _wait_ready(self, url: str, process: subprocess.Popen, deadline: float) -> None:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"a receiver exited early with {process.returncode}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the receiver at {url} did not become ready")


def send_all(receiver_urls: list[str], sends: list[SignedDelivery], deadline_seconds: float = 120) -> list[tuple[str, str]]:
    """Send each delivery to the receivers in turn, retrying 503s and broken connections as
    Proximity does; return each delivery's id and the JSON status of its final response."""
    deadline = time.monotonic() + deadline_seconds

    def send(numbered: tuple[int, SignedDelivery]) -> tuple[str, str]:
        number, delivery = numbered
        attempt = 0
        while time.monotonic() < deadline:
            url = receiver_urls[(number + attempt) % len(receiver_urls)]
            attempt += 1
            try:
                response = client.post(f"{url}/webhooks/proximity", content=delivery.body, headers=delivery.headers)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            if response.status_code == 503:
                time.sleep(0.05)
                continue
            return delivery.delivery_id, response.json().get("status", str(response.status_code))
        return delivery.delivery_id, "timed out"

    with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=32)) as client:
        with ThreadPoolExecutor(max_workers=24) as pool:
            return list(pool.map(send, enumerate(sends)))


def wait_until_finished(engine, expected: int, timeout: float) -> dict[str, str]:
    """Wait until `expected` deliveries are stored and none is pending; return their states by id."""
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            states = dict(connection.execute(select(Delivery.delivery_id, Delivery.state)).all())
        if len(states) == expected and set(states.values()) <= FINAL_STATES | {"failed", "ignored"}:
            return states
        time.sleep(0.2)
    return states


def live_events_by_booking(emulator) -> dict[str, list[dict]]:
    events = defaultdict(list)
    for host in HOSTS:
        for event in emulator.events(host):
            booking_id = event.get("extendedProperties", {}).get("private", {}).get("proximityBookingId")
            events[booking_id].append(event)
    return events


def install_audit(database_url: str):
    engine = make_engine(database_url, pool_size=1)
    with engine.begin() as connection:
        for statement in AUDIT_DDL:
            connection.exec_driver_sql(statement)
    return engine


@pytest.fixture
def database_url(postgres: PostgresSchemas, tmp_path: Path) -> str:
    return postgres.migrated_url(tmp_path)


def test_three_workers_two_receivers(database_url, tmp_path, emulator, service_account_key):
    planned = plan_bookings(200, cancel_every=4, prefix="scale")
    unique = [delivery for item in planned for delivery in item.deliveries]
    shuffler = random.Random(20260320)
    duplicates = shuffler.sample(unique, 200)
    sends = unique + duplicates
    shuffler.shuffle(sends)

    emulator.add_fault(status=None, delay=0.2, times=30)
    emulator.add_fault(method="POST", status=503, times=20)
    emulator.add_fault(method="POST", status=503, after_commit=True, times=10)
    emulator.add_fault(method="PATCH", status=500, times=20)
    emulator.add_fault(method="PATCH", status=503, after_commit=True, times=10)
    emulator.add_fault(method="PATCH", status=403, reason="rateLimitExceeded", retry_after=1, times=5)
    emulator.add_fault(method="DELETE", status=503, times=10)

    audit = install_audit(database_url)
    deployment = Deployment(tmp_path, database_url, emulator, service_account_key)
    try:
        for _ in range(3):
            deployment.start_worker()
        receivers = [deployment.start_receiver(), deployment.start_receiver()]
        deployment.wait_ready()
        results = send_all(receivers, sends)
        states = wait_until_finished(audit, expected=len(unique), timeout=120)
    finally:
        exit_codes = deployment.stop()

    with audit.connect() as connection:
        newest_states = dict(connection.execute(
            select(Delivery.delivery_id, Delivery.state).where(Delivery.delivery_id.like("dlv_scale_%_4"))
        ).all())
        finished = Counter(connection.execute(text("SELECT delivery_id FROM finish_audit")).scalars())
        lease_changes = connection.execute(text(
            "SELECT operation, old_owner, new_owner, old_expires_at, recorded_at FROM lease_audit"
        )).all()
    audit.dispose()
    events = live_events_by_booking(emulator)
    requests = emulator.requests

    # Every delivery was accepted by exactly one receiver; every resend was a duplicate.
    statuses = Counter(status for _, status in results)
    assert statuses == {"accepted": len(unique), "duplicate": len(duplicates)}

    # Every delivery reached a final state, and did so exactly once.
    assert len(states) == len(unique)
    assert set(states.values()) <= FINAL_STATES, Counter(states.values())
    assert set(newest_states.values()) == {"applied"}
    assert len(newest_states) == len(planned)
    assert set(finished) == set(states)
    assert set(finished.values()) == {1}, [delivery for delivery, times in finished.items() if times > 1]

    # Three workers took leases, and none ever took a lease another worker still held.
    owners = {change.new_owner for change in lease_changes if change.operation == "insert"}
    assert len(owners) == 3
    live_takeovers = [
        change for change in lease_changes
        if change.operation == "update" and change.old_owner != change.new_owner
        and change.old_expires_at > change.recorded_at
    ]
    assert live_takeovers == []

    # Exactly one correct event per active booking, none for the cancelled ones.
    for item in planned:
        booking_events = events.get(item.booking_id, [])
        if item.cancelled:
            assert booking_events == [], item.booking_id
            continue
        assert len(booking_events) == 1, item.booking_id
        assert booking_events[0]["summary"] == item.summary
        assert booking_events[0]["start"]["dateTime"] == item.start
    assert sum(len(found) for found in events.values()) == sum(not item.cancelled for item in planned)

    # No event id was inserted twice, which two workers on one booking would do. An insert is
    # answered 409 only when it repeats one whose response the emulator dropped after storing it.
    inserts = [request for request in requests if request.method == "POST"]
    stored = Counter(request.body["id"] for request in inserts if request.status == 200)
    lost_responses = [request.body["id"] for request in inserts if request.fault is not None and request.fault.after_commit]
    conflicts = {request.body["id"] for request in inserts if request.status == 409}
    assert set(stored.values()) == {1}
    assert set(stored) <= {event_id_for(item.booking_id, 0) for item in planned}
    assert len(lost_responses) == 10
    assert conflicts <= set(lost_responses)

    assert set(exit_codes.values()) == {0}, exit_codes


def test_killed_connections_lose_nothing(postgres, database_url, tmp_path, emulator, service_account_key):
    planned = plan_bookings(60, cancel_every=None, prefix="kill")
    sends = [delivery for item in planned for delivery in item.deliveries]
    random.Random(7).shuffle(sends)
    emulator.add_fault(status=None, delay=0.05, times=None)

    deployment = Deployment(tmp_path, database_url, emulator, service_account_key, LEASE_SECONDS="6")
    engine = make_engine(database_url, pool_size=1)
    terminated: list[int] = []
    stop_killing = threading.Event()

    def kill_connections() -> None:
        # Terminates every connection of the test's processes: receiver, workers and listeners.
        while not stop_killing.wait(0.5):
            terminated.append(postgres.terminate_connections(database_url))

    try:
        deployment.start_worker()
        deployment.start_worker()
        receiver = deployment.start_receiver()
        deployment.wait_ready()
        killer = threading.Thread(target=kill_connections, daemon=True)
        killer.start()
        results = send_all([receiver], sends)
        time.sleep(1.5)
        stop_killing.set()
        killer.join(10)
        states = wait_until_finished(engine, expected=len(sends), timeout=120)
    finally:
        stop_killing.set()
        exit_codes = deployment.stop()
        engine.dispose()
    events = live_events_by_booking(emulator)

    assert len(terminated) >= 3
    assert sum(terminated) >= 3
    # A commit whose result was lost with its connection gets 503, and its resend is a duplicate.
    assert {status for _, status in results} <= {"accepted", "duplicate"}
    assert len(results) == len(sends)
    assert len(states) == len(sends)
    assert set(states.values()) <= FINAL_STATES, Counter(states.values())
    for item in planned:
        booking_events = events.get(item.booking_id, [])
        assert len(booking_events) == 1, item.booking_id
        assert booking_events[0]["summary"] == item.summary
        assert booking_events[0]["start"]["dateTime"] == item.start
    assert set(exit_codes.values()) == {0}, {name: deployment.log(name)[-2000:] for name in exit_codes}
