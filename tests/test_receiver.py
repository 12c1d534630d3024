"""The receiver's check of createdAt against this server's clock."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select
from starlette.testclient import TestClient

from connector.app import build_connector, build_web_app
from connector.envelope import normalize_timestamp
from connector.receiver import MAX_CREATED_AHEAD_SECONDS, latest_accepted_version
from connector.storage import Delivery, utcnow
from tests.support import booking, connector_settings, signed_delivery


def post_created_at(tmp_path, created_at: str) -> tuple[int, dict, int]:
    """Post one delivery created at `created_at`; return the status, the JSON body and the stored count."""
    connector = build_connector(connector_settings(tmp_path), with_worker=False)
    delivery = signed_delivery("booking.created", booking(), created_at)
    with TestClient(build_web_app(connector)) as client:
        response = client.post("/webhooks/proximity", content=delivery.body, headers=delivery.headers)
    with connector.engine.connect() as connection:
        stored = connection.execute(select(func.count()).select_from(Delivery)).scalar_one()
    return response.status_code, response.json(), stored


def test_created_at_far_ahead_rejected(tmp_path):
    status, body, stored = post_created_at(tmp_path, "2099-01-01T00:00:00Z")

    assert status == 400
    assert body["error"].startswith(
        f"envelope createdAt 2099-01-01T00:00:00.000000Z is more than {MAX_CREATED_AHEAD_SECONDS} s ahead of this server's clock"
    )
    assert body["error"].endswith("check the clocks of the sender and the receiver")
    assert stored == 0


def test_created_at_slightly_ahead_accepted(tmp_path):
    half_hour_ahead = (utcnow() + timedelta(minutes=30)).isoformat()

    status, body, stored = post_created_at(tmp_path, half_hour_ahead)

    assert status == 200
    assert body["status"] == "accepted"
    assert stored == 1


def test_latest_accepted_version_is_version_text():
    assert MAX_CREATED_AHEAD_SECONDS == 3600
    assert latest_accepted_version(0) == "1970-01-01T01:00:00.000000Z"
    assert latest_accepted_version(0.9) == latest_accepted_version(0)
    assert latest_accepted_version(0) == normalize_timestamp("1970-01-01T02:00:00+01:00")
    assert normalize_timestamp("1970-01-01T01:00:00.000001Z") > latest_accepted_version(0)
