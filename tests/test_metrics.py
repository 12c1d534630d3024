"""`GET /metrics` after known sequences of deliveries, `/readyz` with a stalled worker, and several processes."""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

import connector.intake as intake_module
from connector.app import build_connector, build_web_app
from tests.support import SECRET, RunningConnector, booking, running_connector, signed_delivery
from tests.support import connector_settings as make_settings

JANE = "jane@example.com"

Samples = dict[tuple[str, frozenset], float]


def scrape(client: TestClient) -> Samples:
    """Fetch /metrics and return every sample by name and labels."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def google_settings_for(tmp_path, emulator, key, **overrides):
    return make_settings(
        tmp_path,
        calendar_backend="google",
        google_credentials_file=key,
        google_api_endpoint=emulator.api_endpoint,
        **overrides,
    )


@contextmanager
def connector_without_worker(settings) -> Iterator[TestClient]:
    """The receiver alone, as `serve --no-worker` runs it: deliveries stay pending."""
    connector = build_connector(settings, with_worker=False)
    with TestClient(build_web_app(connector)) as client:
        yield client


def signed_raw(body: bytes, delivery_id: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Webhook-Delivery": delivery_id,
        "X-Webhook-Signature": hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest(),
    }


def test_metrics_count_each_receive_outcome(tmp_path, emulator, service_account_key):
    settings = google_settings_for(tmp_path, emulator, service_account_key, webhook_max_body_bytes=4096)
    started = time.time()
    with running_connector(settings) as running:
        before = scrape(running.client)

        first = signed_delivery("booking.created", booking(id="bkg_m1"))
        running.send(first)
        running.deliver("booking.created", booking(id="bkg_m2"))
        running.send(first)
        running.deliver("booking.created", booking(id="bkg_m3"), secret="not-the-secret")
        running.client.post("/webhooks/proximity", content=b"{not json", headers=signed_raw(b"{not json", "dlv_bad_json"))
        running.deliver("booking.created", booking(id="bkg_m4", invitee={"notes": "x" * 5000}))
        running.deliver("booking.reminderSent", booking(id="bkg_m5"))
        running.wait_idle()
        after = scrape(running.client)

    received = "proximity_deliveries_received_total"
    assert delta(before, after, received, outcome="accepted") == 2
    assert delta(before, after, received, outcome="duplicate") == 1
    assert delta(before, after, received, outcome="bad_signature") == 1
    assert delta(before, after, received, outcome="malformed") == 1
    assert delta(before, after, received, outcome="too_large") == 1
    assert delta(before, after, received, outcome="ignored") == 1
    assert delta(before, after, "proximity_ack_latency_seconds_count") == 7
    assert delta(before, after, "proximity_ack_latency_seconds_sum") > 0
    assert delta(before, after, "proximity_deliveries_processed_total", result="applied") == 2
    assert delta(before, after, "proximity_calendar_calls_total", method="events.insert", status="200") == 2
    assert value(after, "proximity_last_calendar_write_timestamp_seconds") >= started
    assert 0 <= value(after, "proximity_seconds_since_last_calendar_write") <= time.time() - started
    assert value(after, "proximity_queue_depth") == 0
    assert value(after, "proximity_queue_oldest_pending_age_seconds") == 0
    assert value(after, "proximity_failed_deliveries") == 0


def test_metrics_count_calendar_failures(tmp_path, emulator, service_account_key):
    settings = google_settings_for(tmp_path, emulator, service_account_key, delivery_max_attempts=1)
    emulator.add_fault(method="POST", status=503, reason="backendError", times=1)
    with running_connector(settings) as running:
        before = scrape(running.client)
        running.deliver("booking.created", booking(id="bkg_retry"))
        running.wait_idle()
        emulator.auto_user_calendars = False
        running.deliver("booking.created", booking(id="bkg_nowhere", hostEmail="nobody@example.com"))
        running.wait_idle()
        after = scrape(running.client)

    calls = "proximity_calendar_calls_total"
    assert delta(before, after, calls, method="events.insert", status="503") == 1
    assert delta(before, after, calls, method="events.insert", status="200") == 1
    assert delta(before, after, calls, method="events.insert", status="404") == 1
    assert delta(before, after, "proximity_deliveries_processed_total", result="applied") == 1
    assert delta(before, after, "proximity_deliveries_processed_total", result="failed") == 1
    assert value(after, "proximity_failed_deliveries") == 1


def test_metrics_count_updates_and_deletes(google_connector: RunningConnector, emulator):
    before = scrape(google_connector.client)
    google_connector.deliver("booking.created", booking(id="bkg_life"), "2026-03-16T14:05:00Z")
    google_connector.wait_idle()
    google_connector.deliver("booking.rescheduled", booking(id="bkg_life", startTime="2026-03-17T14:00:00Z", endTime="2026-03-17T14:30:00Z"), "2026-03-16T14:06:00Z")
    google_connector.wait_idle()
    google_connector.deliver("booking.cancelled", booking(id="bkg_life", status="Cancelled"), "2026-03-16T14:07:00Z")
    google_connector.wait_idle()
    after = scrape(google_connector.client)

    calls = "proximity_calendar_calls_total"
    assert delta(before, after, calls, method="events.insert", status="200") == 1
    assert delta(before, after, calls, method="events.patch", status="200") == 1
    assert delta(before, after, calls, method="events.delete", status="204") == 1
    assert delta(before, after, "proximity_deliveries_processed_total", result="applied") == 3


def test_metrics_report_queue_depth_and_age(tmp_path):
    with connector_without_worker(make_settings(tmp_path)) as client:
        empty = scrape(client)
        for number in range(3):
            delivery = signed_delivery("booking.created", booking(id=f"bkg_q{number}"))
            assert client.post("/webhooks/proximity", content=delivery.body, headers=delivery.headers).status_code == 200
        waiting = scrape(client)

    assert value(empty, "proximity_queue_depth") == 0
    assert value(empty, "proximity_queue_oldest_pending_age_seconds") == 0
    assert value(waiting, "proximity_queue_depth") == 3
    assert value(waiting, "proximity_queue_oldest_pending_age_seconds") > 0


def test_readyz_reports_stalled_worker(tmp_path):
    with connector_without_worker(make_settings(tmp_path, ready_stall_seconds=0.2)) as client:
        idle = client.get("/readyz")
        delivery = signed_delivery("booking.created", booking())
        client.post("/webhooks/proximity", content=delivery.body, headers=delivery.headers)
        time.sleep(0.4)
        stalled = client.get("/readyz")

    assert idle.status_code == 200
    assert stalled.status_code == 503
    assert stalled.text.startswith("worker stalled: 1 deliveries have been due for more than 0 s")
    assert "no delivery has finished yet" in stalled.text


def test_readyz_stall_check_off(tmp_path):
    with connector_without_worker(make_settings(tmp_path, ready_stall_seconds=0)) as client:
        delivery = signed_delivery("booking.created", booking())
        client.post("/webhooks/proximity", content=delivery.body, headers=delivery.headers)
        time.sleep(0.3)
        response = client.get("/readyz")

    assert response.status_code == 200
    assert response.text == "ready"


def test_readyz_ready_while_worker_progresses(tmp_path, emulator, service_account_key):
    settings = google_settings_for(tmp_path, emulator, service_account_key, ready_stall_seconds=0.2)
    with running_connector(settings) as running:
        running.deliver("booking.created", booking())
        running.wait_idle()
        time.sleep(0.4)
        response = running.client.get("/readyz")

    assert response.status_code == 200


def test_health_reads_while_another_process_writes(tmp_path):
    database = tmp_path / "connector.db"
    settings = make_settings(tmp_path, database_url=f"sqlite:///{database}", ready_stall_seconds=60)
    with connector_without_worker(settings) as client:
        delivery = signed_delivery("booking.created", booking())
        assert client.post("/webhooks/proximity", content=delivery.body, headers=delivery.headers).status_code == 200

        # Another process's write transaction, such as an operator's sqlite3 shell, holds SQLite's write lock.
        other = sqlite3.connect(database, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            answers = _within(5.0, lambda: (client.get("/readyz"), scrape(client)))
        finally:
            other.execute("ROLLBACK")
            other.close()

    ready, samples = answers
    assert ready.status_code == 200
    assert ready.text == "ready"
    assert value(samples, "proximity_queue_depth") == 1


def test_webhook_answers_503_while_database_locked(tmp_path, monkeypatch):
    monkeypatch.setattr(intake_module, "ACK_TIMEOUT_SECONDS", 0.3)
    database = tmp_path / "connector.db"
    settings = make_settings(tmp_path, database_url=f"sqlite:///{database}")
    delivery = signed_delivery("booking.created", booking())
    with connector_without_worker(settings) as client:
        before = scrape(client)
        other = sqlite3.connect(database, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            locked = _within(5.0, lambda: client.post("/webhooks/proximity", content=delivery.body, headers=delivery.headers))
            not_ready = _within(5.0, lambda: client.get("/readyz"))
        finally:
            other.execute("ROLLBACK")
            other.close()
        retried = client.post("/webhooks/proximity", content=delivery.body, headers=delivery.headers)
        ready = client.get("/readyz")
        after = scrape(client)

    assert locked.status_code == 503
    assert locked.json() == {"error": "storage unavailable, retry later"}
    assert not_ready.status_code == 503
    assert not_ready.text.startswith("deliveries are not being stored: the receiver's database write has run for ")
    assert not_ready.text.endswith(" s, and each delivery gets a 503 response after 0.3 s")
    assert ready.status_code == 200
    assert retried.status_code == 200
    assert retried.json()["status"] == "duplicate"  # the first attempt was committed once the lock was gone
    assert delta(before, after, "proximity_deliveries_received_total", outcome="unavailable") == 1
    assert delta(before, after, "proximity_deliveries_received_total", outcome="duplicate") == 1
    assert value(after, "proximity_queue_depth") == 1


def _within(seconds: float, call):
    """Return what `call` returns, failing the test if it takes longer than `seconds`."""
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"no answer within {seconds} s"
    return outcome[0]


MULTIPROCESS_RECORD = """
import sys
from connector.metrics import DELIVERIES_RECEIVED, record_calendar_call
DELIVERIES_RECEIVED.labels("accepted").inc(int(sys.argv[1]))
record_calendar_call(sys.argv[2], 200)
"""

MULTIPROCESS_RENDER = """
import sys
from connector.metrics import render_metrics
from connector.storage import create_tables, make_engine
engine = make_engine(sys.argv[1])
create_tables(engine)
sys.stdout.write(render_metrics(engine)[0].decode())
"""


def test_metrics_sum_several_processes(tmp_path):
    folder = tmp_path / "metrics"
    folder.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(folder), "PATH": "/usr/bin:/bin"}

    def run(script: str, *args: str) -> str:
        finished = subprocess.run(
            [sys.executable, "-c", script, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert finished.returncode == 0, finished.stderr
        return finished.stdout

    run(MULTIPROCESS_RECORD, "3", "events.insert")
    run(MULTIPROCESS_RECORD, "2", "events.patch")
    exposition = run(MULTIPROCESS_RENDER, f"sqlite:///{tmp_path / 'metrics.db'}")

    samples: Samples = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    assert value(samples, "proximity_deliveries_received_total", outcome="accepted") == 5
    assert value(samples, "proximity_calendar_calls_total", method="events.insert", status="200") == 1
    assert value(samples, "proximity_calendar_calls_total", method="events.patch", status="200") == 1
    assert value(samples, "proximity_last_calendar_write_timestamp_seconds") > 0
    assert value(samples, "proximity_queue_depth") == 0
