"""The connector on PostgreSQL: leases under contention, receivers sharing one database,
LISTEN/NOTIFY wake-ups, and the receiver while the database is unreachable.

Every test here needs the PostgreSQL server on 127.0.0.1:5432 (see `tests.support`); the lease
tests run on SQLite too.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from connector.app import Connector, build_connector, build_web_app
from connector.queue import acquire_lease, release_lease
from connector.schema import upgrade_schema
from connector.storage import BookingLease, Delivery, make_engine, utcnow
from tests import support
from tests.support import PostgresSchemas, booking, signed_delivery

pytestmark = pytest.mark.postgres

POSTGRES_PORT = 5432


@pytest.fixture
def postgres_url(postgres: PostgresSchemas, tmp_path: Path) -> str:
    """A migrated PostgreSQL schema for this test."""
    return postgres.migrated_url(tmp_path)


@pytest.fixture(params=["sqlite", "postgresql"])
def lease_engine(request, tmp_path: Path) -> Iterator[Engine]:
    """A migrated database on SQLite or PostgreSQL, with a pool large enough for the contention tests."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'leases.db'}"
    else:
        url = request.getfixturevalue("postgres").create()
    engine = make_engine(url, pool_size=16)
    upgrade_schema(engine)
    yield engine
    engine.dispose()


def settings_for(url: str, tmp_path: Path, **overrides):
    return support.connector_settings(tmp_path, database_url=url, **overrides)


class ReceiverClient:
    """An in-process connector app driven over HTTP by Starlette's test client."""

    def __init__(self, connector: Connector) -> None:
        self.connector = connector
        self.client = TestClient(build_web_app(connector))

    def __enter__(self) -> ReceiverClient:
        self.client.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.client.__exit__(*exc_info)

    def send(self, delivery):
        return self.client.post("/webhooks/proximity", content=delivery.body, headers=delivery.headers)


def delivery_states(engine: Engine) -> dict[str, str]:
    with engine.connect() as connection:
        return dict(connection.execute(select(Delivery.delivery_id, Delivery.state)).all())


def wait_for(condition, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


# ----- leases -----


def test_lease_held_by_one_thread_at_a_time(lease_engine):
    holders: Counter[str] = Counter()
    max_holders: Counter[str] = Counter()
    acquisitions: Counter[str] = Counter()
    lock = threading.Lock()
    booking_ids = ["bkg_a", "bkg_b", "bkg_c"]

    def contend(owner: str) -> None:
        for round_number in range(25):
            booking_id = booking_ids[round_number % len(booking_ids)]
            if not acquire_lease(lease_engine, booking_id, owner, 30):
                continue
            with lock:
                holders[booking_id] += 1
                max_holders[booking_id] = max(max_holders[booking_id], holders[booking_id])
                acquisitions[booking_id] += 1
            time.sleep(0.002)
            with lock:
                holders[booking_id] -= 1
            release_lease(lease_engine, booking_id, owner)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(contend, [f"worker-{number}" for number in range(8)]))

    for booking_id in booking_ids:
        assert acquisitions[booking_id] >= 3, f"{booking_id} was never contended"
        assert max_holders[booking_id] == 1, f"{booking_id} had {max_holders[booking_id]} holders at once"


def test_expired_lease_taken_over_by_one(lease_engine):
    for round_number in range(10):
        with lease_engine.begin() as connection:
            connection.execute(BookingLease.__table__.delete())
            connection.execute(
                BookingLease.__table__.insert().values(booking_id="bkg_a", owner="worker-dead", expires_at=utcnow())
            )
        start = threading.Barrier(8)

        def take_over(owner: str) -> bool:
            start.wait()
            return acquire_lease(lease_engine, "bkg_a", owner, 30)

        with ThreadPoolExecutor(max_workers=8) as pool:
            owners = [f"worker-{round_number}-{number}" for number in range(8)]
            results = dict(zip(owners, pool.map(take_over, owners)))
        winners = [owner for owner, won in results.items() if won]
        with lease_engine.connect() as connection:
            holder = connection.execute(select(BookingLease.owner)).scalar_one()
        assert winners == [holder], f"round {round_number}"


def test_live_lease_not_reentrant(lease_engine):
    first = acquire_lease(lease_engine, "bkg_a", "worker-1", 30)
    again_same_owner = acquire_lease(lease_engine, "bkg_a", "worker-1", 30)
    other_owner = acquire_lease(lease_engine, "bkg_a", "worker-2", 30)
    release_lease(lease_engine, "bkg_a", "worker-1")
    after_release = acquire_lease(lease_engine, "bkg_a", "worker-2", 30)

    assert first is True
    assert again_same_owner is False
    assert other_owner is False
    assert after_release is True


# ----- receivers -----


def test_receivers_accept_each_delivery_once(postgres_url, tmp_path):
    settings = settings_for(postgres_url, tmp_path)
    deliveries = [
        signed_delivery("booking.created", booking(id=f"bkg_{number:03d}"), delivery_id=f"dlv_shared_{number:03d}")
        for number in range(40)
    ]

    with ReceiverClient(build_connector(settings, with_worker=False)) as first, \
            ReceiverClient(build_connector(settings, with_worker=False)) as second:
        with ThreadPoolExecutor(max_workers=16) as pool:
            sends = [(receiver, delivery) for delivery in deliveries for receiver in (first, second)]
            responses = list(pool.map(lambda pair: pair[0].send(pair[1]), sends))
        engine = first.connector.engine
        states = delivery_states(engine)

    assert [response.status_code for response in responses] == [200] * len(sends)
    statuses = Counter()
    for (_, delivery), response in zip(sends, responses):
        statuses[delivery.delivery_id, response.json()["status"]] += 1
    for delivery in deliveries:
        assert statuses[delivery.delivery_id, "accepted"] == 1
        assert statuses[delivery.delivery_id, "duplicate"] == 1
    assert sorted(states) == sorted(delivery.delivery_id for delivery in deliveries)


def test_receiver_pool_smaller_than_worker_pool(postgres_url, tmp_path):
    settings = settings_for(postgres_url, tmp_path, worker_threads=6)

    receiver = build_connector(settings, with_worker=False)
    worker = build_connector(settings, with_worker=True)
    try:
        receiver_pool = receiver.engine.pool.size()
        worker_pool = worker.engine.pool.size()
    finally:
        receiver.close()
        worker.close()

    assert receiver_pool == 5
    assert worker_pool == 6 + 5


# ----- LISTEN/NOTIFY -----


def test_notify_wakes_idle_worker(postgres_url, tmp_path):
    # The worker polls only every 60 s, so a delivery applied within seconds was announced.
    settings = settings_for(postgres_url, tmp_path, worker_poll_seconds=60)
    worker = build_connector(settings, with_worker=True)
    worker.worker.start()
    try:
        assert worker.listener.wait_listening(10)
        time.sleep(0.3)  # let the worker finish the dispatch pass it runs at start
        with ReceiverClient(build_connector(settings, with_worker=False)) as receiver:
            response = receiver.send(signed_delivery("booking.created", booking(id="bkg_notify"), delivery_id="dlv_notify"))
        applied = wait_for(lambda: delivery_states(worker.engine).get("dlv_notify") == "applied", timeout=15)
    finally:
        worker.close()

    assert response.status_code == 200
    assert applied, delivery_states(worker.engine)


def test_listener_reconnects_after_connection_killed(postgres, postgres_url, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="connector.notify")
    settings = settings_for(postgres_url, tmp_path, worker_poll_seconds=60)
    worker = build_connector(settings, with_worker=True)
    worker.worker.start()
    try:
        assert worker.listener.wait_listening(10)
        terminated = postgres.terminate_connections(postgres_url)
        reconnected = wait_for(
            lambda: "listening for new deliveries failed" in caplog.text and worker.listener.wait_listening(0),
            timeout=15,
        )
        time.sleep(0.3)
        with ReceiverClient(build_connector(settings, with_worker=False)) as receiver:
            receiver.send(signed_delivery("booking.created", booking(id="bkg_again"), delivery_id="dlv_again"))
        applied = wait_for(lambda: delivery_states(worker.engine).get("dlv_again") == "applied", timeout=15)
    finally:
        worker.close()

    assert terminated >= 1
    assert reconnected
    assert applied, delivery_states(worker.engine)


# ----- an unreachable database -----


class TcpProxy:
    """A loopback TCP proxy to the PostgreSQL server that can cut every connection, as an outage would."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._refusing = False
        self._closed = False
        threading.Thread(target=self._accept_forever, name="proxy-accept", daemon=True).start()

    def cut(self) -> None:
        """Close every proxied connection and refuse new ones."""
        with self._lock:
            self._refusing = True
            sockets, self._sockets = self._sockets, set()
        for connection in sockets:
            _close(connection)

    def restore(self) -> None:
        """Accept and forward connections again."""
        with self._lock:
            self._refusing = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        _close(self._listener)

    def _accept_forever(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refusing = self._refusing
            if refusing:
                _close(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", POSTGRES_PORT))
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._sockets |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ, upstream)
        selector.register(upstream, selectors.EVENT_READ, client)
        try:
            while True:
                for key, _ in selector.select(timeout=1):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except (OSError, ValueError):
            return
        finally:
            selector.close()
            _close(client)
            _close(upstream)


def _close(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    connection.close()


def test_receiver_503_while_database_unreachable(postgres_url, tmp_path):
    proxy = TcpProxy()
    proxied_url = postgres_url.replace(f"127.0.0.1:{POSTGRES_PORT}", f"127.0.0.1:{proxy.port}")
    settings = settings_for(proxied_url, tmp_path)
    try:
        with ReceiverClient(build_connector(settings, with_worker=True)) as receiver:
            before = receiver.send(signed_delivery("booking.created", booking(id="bkg_before"), delivery_id="dlv_before"))
            proxy.cut()
            during = receiver.send(signed_delivery("booking.created", booking(id="bkg_during"), delivery_id="dlv_during"))
            ready_during = receiver.client.get("/readyz")
            proxy.restore()
            retried = receiver.send(signed_delivery("booking.created", booking(id="bkg_during"), delivery_id="dlv_during"))
            ready_after = receiver.client.get("/readyz")
            applied = wait_for(
                lambda: set(delivery_states(receiver.connector.engine).values()) == {"applied"}, timeout=15
            )
            states = delivery_states(receiver.connector.engine)
    finally:
        proxy.close()

    assert before.status_code == 200
    assert during.status_code == 503
    assert ready_during.status_code == 503
    assert retried.status_code == 200
    assert retried.json()["status"] == "accepted"
    assert ready_after.status_code == 200
    assert applied, states
    assert states == {"dlv_before": "applied", "dlv_during": "applied"}


def test_terminated_connections_reconnect(postgres, postgres_url, tmp_path):
    settings = settings_for(postgres_url, tmp_path)
    with ReceiverClient(build_connector(settings, with_worker=True)) as receiver:
        first = receiver.send(signed_delivery("booking.created", booking(id="bkg_one"), delivery_id="dlv_one"))
        assert wait_for(lambda: delivery_states(receiver.connector.engine).get("dlv_one") == "applied", timeout=15)

        terminated = postgres.terminate_connections(postgres_url)
        second = receiver.send(signed_delivery("booking.created", booking(id="bkg_two"), delivery_id="dlv_two"))
        applied = wait_for(lambda: delivery_states(receiver.connector.engine).get("dlv_two") == "applied", timeout=15)
        with receiver.connector.engine.connect() as connection:
            server_alive = connection.execute(text("SELECT 1")).scalar_one()

    assert first.status_code == 200
    assert terminated >= 1
    assert second.status_code == 200
    assert second.json()["status"] == "accepted"
    assert applied
    assert server_alive == 1


@pytest.mark.parametrize(
    ("event", "delivery_id", "booking_id"),
    [
        ("booking.created", "d" * 201, "bkg_long_delivery_id"),
        ("booking." + "x" * 100, "dlv_long_event", "bkg_long_event"),
        ("booking.created", "dlv_nul_booking_id", "bkg_\u0000nul"),
    ],
    ids=["delivery-id-over-200", "event-over-100", "nul-in-booking-id"],
)
def test_unstorable_delivery_rejected_with_400(postgres_url, tmp_path, event, delivery_id, booking_id):
    # SQLite stores such values as they are; PostgreSQL enforces VARCHAR lengths and rejects NUL
    # characters, and a delivery that can never be stored must not get 503 forever.
    settings = settings_for(postgres_url, tmp_path)
    with ReceiverClient(build_connector(settings, with_worker=False)) as receiver:
        response = receiver.send(signed_delivery(event, booking(id=booking_id), delivery_id=delivery_id))

    assert response.status_code == 400
