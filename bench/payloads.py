"""Realistic signed deliveries: booking snapshots of a few kB with non-ASCII text, and request files.

Every delivery gets a unique delivery id and a unique body, because the connector keeps one row
per delivery id and per body digest, so a repeated body would be reported as a duplicate without
an insert.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

SECRET = "whsec_bench_5f0c1d2e3a4b"
WEBHOOK_PATH = "/webhooks/proximity"

# Names and notes in several scripts, so bodies carry multi-byte UTF-8 as real bookings do.
INVITEES = (
    ("Zoë Faßbender", "zoe.fassbender@example.de", "Europe/Berlin", "de"),
    ("Łukasz Żółkiewski", "lukasz@example.pl", "Europe/Warsaw", "pl"),
    ("山田 花子", "hanako.yamada@example.jp", "Asia/Tokyo", "ja"),
    ("François Lefèvre", "francois@example.fr", "Europe/Paris", "fr"),
    ("Αλέξανδρος Παπαδόπουλος", "alexandros@example.gr", "Europe/Athens", "el"),
    ("Nguyễn Thị Minh Khai", "minhkhai@example.vn", "Asia/Ho_Chi_Minh", "vi"),
)
NOTES = (
    "Merci pour le créneau ! J'aimerais parler de la migration, des délais et du budget prévu. "
    "Bitte schicken Sie vorab die Präsentation – Grüße aus Köln. "
    "来週のミーティングでは、見積もりと契約条件について確認したいです。よろしくお願いします。 "
    "Θα ήθελα να συζητήσουμε τις λεπτομέρειες της υλοποίησης. "
)
REQUIREMENTS = (
    "Wir benötigen eine Übersicht der Schnittstellen, Datenschutz-Folgenabschätzung und Zeitplan. "
    "Nous voudrions aussi comprendre l'hébergement, la réversibilité et les coûts annexes. "
    "導入スケジュール、サポート体制、セキュリティ監査の結果を共有してください。 "
    "Prosimy o szczegóły dotyczące wdrożenia, szkoleń i gwarantowanego czasu reakcji. "
)
EVENT_TYPES = (
    ("evt_intro30", "30 Minute Intro ☕", "intro-30"),
    ("evt_demo45", "Product Demo — 45 min", "product-demo"),
    ("evt_review60", "Quarterly Review / Überprüfung", "quarterly-review"),
)
BASE_START = datetime(2027, 3, 1, 8, 0, tzinfo=UTC)
BASE_CREATED = datetime(2026, 2, 1, 9, 0, tzinfo=UTC)  # in the past: the receiver rejects a createdAt over an hour ahead


@dataclass(frozen=True)
class Delivery:
    """One signed webhook delivery: the raw body and the headers Proximity sends with it."""

    delivery_id: str
    event: str
    body: bytes
    signature: str

    def headers(self) -> dict[str, str]:
        """Return the HTTP headers of the delivery."""
        return {
            "Content-Type": "application/json",
            "X-Webhook-Event": self.event,
            "X-Webhook-Signature": self.signature,
            "X-Webhook-Delivery": self.delivery_id,
        }


def host_email(host: int) -> str:
    """Return the email, and so the calendar id, of host number `host`."""
    return f"host{host:03d}@bench.example.com"


def booking_id(number: int) -> str:
    """Return the booking id of booking number `number`."""
    return f"bkg_bench_{number:07d}"


def booking_payload(number: int, host: int, *, change: int = 0, status: str = "Confirmed") -> dict[str, Any]:
    """Return a booking snapshot of about 2 kB; `change` moves the booking by 30 minutes per step."""
    invitee_name, invitee_email, timezone, locale = INVITEES[number % len(INVITEES)]
    type_id, type_name, type_slug = EVENT_TYPES[number % len(EVENT_TYPES)]
    start = BASE_START + timedelta(hours=number % 2000, minutes=30 * change)
    return {
        "id": booking_id(number),
        "eventTypeId": type_id,
        "eventTypeName": type_name,
        "eventTypeSlug": type_slug,
        "status": status,
        "startTime": _rfc3339(start),
        "endTime": _rfc3339(start + timedelta(minutes=45)),
        "hostUserId": f"usr_host{host:03d}",
        "hostName": f"Gastgeberin Nr. {host} – Ørsted",
        "hostEmail": host_email(host),
        "invitee": {
            "name": invitee_name,
            "email": invitee_email,
            "phone": f"+49 30 {number % 10_000_000:07d}",
            "timezone": timezone,
            "locale": locale,
            "notes": f"{NOTES}{NOTES}(Buchung {number}, Änderung {change})",
        },
        "location": {"type": "GoogleMeet", "value": f"https://meet.google.com/bch-{number % 10000:04d}-xyz"},
        "customFields": {
            "company": "Müller & Søn GmbH",
            "role": "Leiterin Einkauf / 調達責任者",
            "agenda": "Preise, Lieferzeiten, Verträge — ausführlich besprechen",
            "budget": "≈ 25 000 €",
            "requirements": REQUIREMENTS,
        },
        "source": "BookingPage",
        "createdAt": _rfc3339(BASE_CREATED),
        "cancelledAt": None,
        "cancellationReason": None,
        "rescheduledFrom": None,
    }


def sign_delivery(event: str, payload: dict[str, Any], created_at: datetime, delivery_id: str) -> Delivery:
    """Wrap a payload in the Proximity envelope and sign it with the bench secret."""
    envelope = {"event": event, "createdAt": _rfc3339(created_at, millis=True), "payload": payload}
    body = json.dumps(envelope, ensure_ascii=False).encode("utf-8")
    signature = hmac.new(SECRET.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return Delivery(delivery_id, event, body, signature)


def change_time(step: int) -> datetime:
    """Return the envelope createdAt of a booking's `step`-th change, one second apart."""
    return BASE_CREATED + timedelta(seconds=step)


def new_bookings(prefix: str, count: int, hosts: int, first: int = 0) -> Iterator[Delivery]:
    """Yield `booking.created` deliveries of `count` distinct bookings spread over `hosts` hosts."""
    for number in range(first, first + count):
        payload = booking_payload(number, number % hosts)
        yield sign_delivery("booking.created", payload, change_time(0), f"{prefix}-{number:08d}")


def write_request_file(path: Path, deliveries: Iterator[Delivery]) -> int:
    """Write one delivery a line as `id<TAB>signature<TAB>event<TAB>body`, for the load generators.

    JSON text never contains a raw tab or newline, so the body needs no escaping. Returns the
    number of lines written.
    """
    count = 0
    with path.open("wb") as file:
        for delivery in deliveries:
            file.write(b"\t".join((
                delivery.delivery_id.encode(), delivery.signature.encode(), delivery.event.encode(), delivery.body,
            )))
            file.write(b"\n")
            count += 1
    return count


def read_request_file(path: Path) -> list[Delivery]:
    """Read a file written by `write_request_file`."""
    deliveries = []
    with path.open("rb") as file:
        for line in file:
            delivery_id, signature, event, body = line.rstrip(b"\n").split(b"\t", 3)
            deliveries.append(Delivery(delivery_id.decode(), event.decode(), body, signature.decode()))
    return deliveries


def _rfc3339(moment: datetime, millis: bool = False) -> str:
    if millis:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
