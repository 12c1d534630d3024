"""Retention: old payloads are cleared and old delivery records deleted, and nothing still needed is."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from connector import cli
from connector.retention import RetentionPolicy, prune
from connector.storage import Delivery, utcnow
from tests.calendar_state import wait_settled, wait_until
from tests.support import booking, running_connector, signed_delivery
from tests.support import connector_settings as connector_settings

POLICY = RetentionPolicy(payload_days=7, delivery_days=30)
FUTURE = {"startTime": "2036-03-16T14:00:00Z", "endTime": "2036-03-16T14:30:00Z"}


def stored(running) -> dict[str, Delivery]:
    with running.connector.engine.connect() as connection:
        return {row.delivery_id: row for row in connection.execute(select(Delivery)).all()}


def send(running, event: str, payload: dict, created_at: str, delivery_id: str) -> None:
    assert running.send(signed_delivery(event, payload, created_at, delivery_id=delivery_id)).status_code == 200


def days_later(days: float):
    return utcnow() + timedelta(days=days)


def test_recent_deliveries_are_kept(ics_connector):
    send(ics_connector, "booking.created", booking(**FUTURE), "2026-03-16T14:05:00Z", "dlv_create")
    wait_settled(ics_connector)

    report = prune(ics_connector.connector.engine, POLICY)

    assert (report.payloads_cleared, report.deliveries_deleted) == (0, 0)
    assert stored(ics_connector)["dlv_create"].body is not None


def test_superseded_payload_cleared_then_record_deleted(ics_connector):
    send(ics_connector, "booking.created", booking(**FUTURE), "2026-03-16T14:05:00Z", "dlv_create")
    wait_settled(ics_connector)
    send(ics_connector, "booking.rescheduled", booking(**FUTURE, eventTypeName="Long call"), "2026-03-16T15:00:00Z",
         "dlv_reschedule")
    wait_settled(ics_connector)
    engine = ics_connector.connector.engine

    after_a_week = prune(engine, POLICY, now=days_later(8))
    rows = stored(ics_connector)
    after_a_month = prune(engine, POLICY, now=days_later(31))

    assert after_a_week.payloads_cleared == 1
    assert after_a_week.deliveries_deleted == 0
    assert after_a_week.snapshots_kept == 1
    assert rows["dlv_create"].body is None
    assert rows["dlv_create"].body_digest
    assert rows["dlv_reschedule"].body is not None
    assert after_a_month.deliveries_deleted == 1
    assert set(stored(ics_connector)) == {"dlv_reschedule"}
    assert stored(ics_connector)["dlv_reschedule"].body is not None


@pytest.mark.parametrize(
    ("event", "payload"),
    [
        ("booking.completed", booking(**FUTURE)),
        ("booking.noShow", booking(**FUTURE)),
        ("booking.cancelled", booking(**FUTURE, status="Cancelled")),
        ("booking.rescheduled", booking(startTime="2020-03-16T14:00:00Z", endTime="2020-03-16T14:30:00Z")),
    ],
    ids=["completed", "no-show", "cancelled", "ended-long-ago"],
)
def test_newest_snapshot_pruned_once_booking_is_over(ics_connector, event, payload):
    send(ics_connector, "booking.created", booking(**FUTURE), "2026-03-16T14:05:00Z", "dlv_create")
    wait_settled(ics_connector)
    send(ics_connector, event, payload, "2026-03-16T15:00:00Z", "dlv_last")
    wait_settled(ics_connector)

    report = prune(ics_connector.connector.engine, POLICY, now=days_later(31))

    assert report.payloads_cleared == 2
    assert report.deliveries_deleted == 2
    assert report.snapshots_kept == 0
    assert stored(ics_connector) == {}


def test_pending_and_failed_deliveries_never_pruned(ics_connector):
    send(ics_connector, "booking.created", booking(id="bkg_no_route", hostEmail=None), "2026-03-16T14:05:00Z",
         "dlv_failed")
    wait_settled(ics_connector)
    with ics_connector.connector.engine.begin() as connection:
        connection.execute(Delivery.__table__.insert().values(
            delivery_id="dlv_pending", body_digest="0" * 64, event="booking.created", version="2026-03-16T14:05:00Z",
            booking_id="bkg_later", body=b"{}", state="pending", next_attempt_at=days_later(400),
            received_at=utcnow() - timedelta(days=400),
        ))

    report = prune(ics_connector.connector.engine, POLICY, now=days_later(365))

    rows = stored(ics_connector)
    assert (report.payloads_cleared, report.deliveries_deleted) == (0, 0)
    assert rows["dlv_failed"].state == "failed"
    assert rows["dlv_failed"].body is not None
    assert rows["dlv_pending"].body == b"{}"


def test_ignored_delivery_pruned(ics_connector):
    send(ics_connector, "booking.paymentReceived", booking(), "2026-03-16T14:05:00Z", "dlv_unknown")

    report = prune(ics_connector.connector.engine, POLICY, now=days_later(31))

    assert report.payloads_cleared == 1
    assert report.deliveries_deleted == 1
    assert stored(ics_connector) == {}


def test_pruned_payload_still_recognised_as_retry(ics_connector):
    delivery = signed_delivery("booking.created", booking(**FUTURE), "2026-03-16T14:05:00Z", delivery_id="dlv_a")
    ics_connector.send(delivery)
    wait_settled(ics_connector)
    send(ics_connector, "booking.rescheduled", booking(**FUTURE, eventTypeName="Long call"), "2026-03-16T15:00:00Z",
         "dlv_b")
    wait_settled(ics_connector)
    prune(ics_connector.connector.engine, POLICY, now=days_later(8))

    same_id = ics_connector.send(delivery)
    new_id = ics_connector.send(type(delivery)(delivery.body, {**delivery.headers, "X-Webhook-Delivery": "dlv_c"}))

    assert same_id.json()["status"] == "duplicate"
    assert new_id.json()["status"] == "duplicate"


def test_replay_after_record_deleted_changes_nothing(ics_connector):
    delivery = signed_delivery("booking.created", booking(**FUTURE), "2026-03-16T14:05:00Z", delivery_id="dlv_a")
    ics_connector.send(delivery)
    wait_settled(ics_connector)
    send(ics_connector, "booking.cancelled", booking(**FUTURE, status="Cancelled"), "2026-03-16T15:00:00Z", "dlv_b")
    wait_settled(ics_connector)
    prune(ics_connector.connector.engine, POLICY, now=days_later(31))

    response = ics_connector.send(delivery)
    wait_settled(ics_connector)

    assert response.json()["status"] == "accepted"
    assert stored(ics_connector)["dlv_a"].state == "stale"
    assert ics_connector.mapping("bkg_xyz789")["state"] == "deleted"


def test_prune_works_in_batches(ics_connector):
    for number in range(5):
        send(ics_connector, "booking.paymentReceived", booking(id=f"bkg_{number}"), "2026-03-16T14:05:00Z",
             f"dlv_{number}")

    report = prune(ics_connector.connector.engine, POLICY, now=days_later(31), batch_size=2)

    assert report.payloads_cleared == 5
    assert report.deliveries_deleted == 5
    assert stored(ics_connector) == {}


def test_prune_command_reports_what_it_pruned(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "configure_logging", lambda *_args, **_kwargs: None)
    monkeypatch.chdir(tmp_path)
    settings = connector_settings(tmp_path, payload_retention_days=0, delivery_retention_days=30)
    with running_connector(settings) as running:
        send(running, "booking.created", booking(**FUTURE), "2026-03-16T14:05:00Z", "dlv_create")
        wait_settled(running)
        send(running, "booking.rescheduled", booking(**FUTURE, eventTypeName="Long call"), "2026-03-16T15:00:00Z",
             "dlv_reschedule")
        wait_settled(running)
    env = {"DATABASE_URL": settings.database_url, "PAYLOAD_RETENTION_DAYS": "0", "DELIVERY_RETENTION_DAYS": "30"}

    text = CliRunner().invoke(cli.main, ["prune"], env=env)
    again = CliRunner().invoke(cli.main, ["prune", "--json"], env=env)

    assert text.exit_code == 0
    assert text.output.startswith("Pruned: cleared the payloads of 1 deliveries finished before ")
    assert "deleted 0 delivery records finished before" in text.output
    assert "kept 1 old payloads that are the newest snapshot of a booking still live" in text.output
    report = json.loads(again.output)
    assert report["payloads_cleared"] == 0
    assert report["deliveries_deleted"] == 0
    assert report["snapshots_kept"] == 1
    assert set(report) == {"payloads_cleared", "deliveries_deleted", "snapshots_kept", "payload_cutoff",
                           "delivery_cutoff"}


def test_worker_prunes_periodically(tmp_path):
    settings = connector_settings(tmp_path, payload_retention_days=0, prune_interval_seconds=0.1)
    with running_connector(settings) as running:
        send(running, "booking.created", booking(**FUTURE), "2026-03-16T14:05:00Z", "dlv_create")
        wait_settled(running)
        send(running, "booking.rescheduled", booking(**FUTURE, eventTypeName="Long call"), "2026-03-16T15:00:00Z",
             "dlv_reschedule")
        wait_settled(running)

        wait_until(lambda: stored(running)["dlv_create"].body is None, 5, "the worker cleared the old payload")
        newest = stored(running)["dlv_reschedule"]

    assert newest.body is not None



def test_prune_reports_each_batch(ics_connector):
    for number in range(5):
        send(ics_connector, "booking.paymentReceived", booking(id=f"bkg_{number}"), "2026-03-16T14:05:00Z",
             f"dlv_{number}")
    batches: list[int] = []

    prune(ics_connector.connector.engine, POLICY, now=days_later(31), batch_size=2, on_batch=batches.append)

    assert batches == [2, 2, 1, 2, 2, 1]
