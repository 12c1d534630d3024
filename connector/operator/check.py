"""`proximity-sync check`: prove that the setup works before Proximity sends anything.

Each item prints one line with ✓, ✗ or - (not checked), and each ✗ is followed by what to do,
in the terms of the Google Workspace and Proximity admin consoles. The exit status is 1 when
any item failed.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click
from sqlalchemy import func, inspect, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from connector.calendars.base import CalendarError, CalendarNotFoundError, Target, TransientCalendarError
from connector.mappings import Mappings, MappingsError, load_mappings
from connector.metrics import MULTIPROCESS_DIR_VARIABLE
from connector.schema import SchemaError, schema_status
from connector.settings import Settings, SettingsError, load_settings
from connector.storage import BookingMapping, Delivery, DeliveryState, explain_database_error, make_engine, read_only

if TYPE_CHECKING:
    from connector.calendars.google import GoogleCalendar
    from connector.calendars.google_transport import AuthRequest

MARKS = {"ok": "✓", "failed": "✗", "warning": "!", "skipped": "-"}

# A booking id no event carries: listing its events is one cheap events.list call that only
# succeeds when the acting user can read the calendar.
PROBE_BOOKING_ID = "proximity-sync-check"

# OAuth error codes of a token request that Workspace refuses because domain-wide delegation is
# not granted for the client ID and scope.
DELEGATION_ERRORS = frozenset({"unauthorized_client", "access_denied", "invalid_scope"})

ADMIN_CONSOLE_DELEGATION = "Google Workspace Admin console (Security > API controls > Domain-wide delegation)"


@dataclass
class CheckResult:
    """One checked item: its status (ok, failed, warning or skipped), what was found, and what to do."""

    status: str
    item: str
    detail: str
    fix: str | None = None


@dataclass
class CheckReport:
    """The results of a `check` run, in the order they were checked."""

    results: list[CheckResult] = field(default_factory=list)

    def ok(self, item: str, detail: str) -> None:
        self.results.append(CheckResult("ok", item, detail))

    def failed(self, item: str, detail: str, fix: str | None) -> None:
        self.results.append(CheckResult("failed", item, detail, fix))

    def warned(self, item: str, detail: str, fix: str | None) -> None:
        self.results.append(CheckResult("warning", item, detail, fix))

    def skipped(self, item: str, detail: str) -> None:
        self.results.append(CheckResult("skipped", item, detail))

    @property
    def failures(self) -> int:
        return sum(result.status == "failed" for result in self.results)

    @property
    def warnings(self) -> int:
        return sum(result.status == "warning" for result in self.results)


@click.command("check")
@click.option("--host", "hosts", multiple=True, metavar="EMAIL", help="Also check this host's calendar; repeat for several hosts.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of lines.")
def check(hosts: tuple[str, ...], as_json: bool) -> None:
    """Check the settings, mappings, database and calendar access, and print how to fix each problem."""
    for host in hosts:
        if "@" not in host:
            raise click.BadParameter(f"{host!r} is not an email address", param_hint="--host")

    report = run_checks([host.strip().lower() for host in hosts])

    if as_json:
        click.echo(json.dumps([asdict(result) for result in report.results], indent=2, ensure_ascii=False))
    else:
        for result in report.results:
            click.echo(f"{MARKS[result.status]} {result.item}: {result.detail}")
            if result.fix:
                click.echo(f"    fix: {result.fix}")
        click.echo(_summary(report))
    if report.failures:
        sys.exit(1)


def _summary(report: CheckReport) -> str:
    checked = sum(result.status != "skipped" for result in report.results)
    warnings = ""
    if report.warnings:
        warnings = f", with {report.warnings} warning{'s' if report.warnings > 1 else ''}"
    if report.failures:
        return f"{report.failures} of {checked} checks failed{warnings}."
    return f"All {checked} checks passed{warnings}."


def run_checks(hosts: list[str]) -> CheckReport:
    """Check every item and return the results; nothing in the calendars or the database changes."""
    report = CheckReport()

    try:
        settings = load_settings(log_env_file_problems=False)  # the report lists them below
    except SettingsError as error:
        report.failed("settings", str(error), "correct the setting named above, in the environment or in .env")
        return report
    report.ok("settings", f"valid; calendar backend {settings.backend_name}")
    for problem in settings.env_file_problems:
        report.warned(f"env file {problem.path}", problem.problem, problem.fix)

    _check_secret(report, settings)
    mappings = _check_mappings(report, settings)
    engine = _check_database(report, settings)
    _check_metrics_folder(report)

    try:
        if settings.backend_name != "google":
            report.skipped("Google Calendar", "not checked, because the calendar backend is ics: events are served as iCalendar feeds")
            return report

        mapped = _read_mapped_targets(report, engine) if engine is not None else []
        _check_google(report, settings, mappings, hosts, mapped)
    finally:
        if engine is not None:
            engine.dispose()
    return report


def _check_secret(report: CheckReport, settings: Settings) -> None:
    count = len(settings.webhook_secrets)
    if count == 0:
        report.failed(
            "PROXIMITY_WEBHOOK_SECRET",
            "is empty, so every delivery is rejected with 401",
            "copy the webhook secret from the Proximity dashboard (Settings > Webhooks) into PROXIMITY_WEBHOOK_SECRET",
        )
    else:
        report.ok("PROXIMITY_WEBHOOK_SECRET", f"set ({count} secret{'s' if count > 1 else ''})")


def _check_mappings(report: CheckReport, settings: Settings) -> Mappings | None:
    item = f"mappings folder {settings.mappings_dir}"
    try:
        mappings = load_mappings(settings.mappings_dir)
    except MappingsError as error:
        report.failed(item, str(error), _mappings_fix(error))
        return None

    if not settings.mappings_dir.exists():
        report.ok(item, "does not exist, so the default routing and templates apply")
        return mappings

    rules = len(mappings.router.rules)
    report.ok(item, f"valid; {rules} routing rule{'' if rules == 1 else 's'}")
    return mappings


def _mappings_fix(error: MappingsError) -> str:
    """Return the advice for a mappings error, which points at a line only when the error names one."""
    if error.line is not None:
        return "correct the file at the line named; mappings/README.md describes every key"
    return (
        f"correct, rename or remove {error.path} as the problem says; mappings/README.md describes "
        "the files the folder may contain and their keys"
    )


def _check_database(report: CheckReport, settings: Settings) -> Engine | None:
    """Check that the database is reachable and its schema usable; return an engine if it is reachable."""
    try:
        url = make_url(settings.database_url)
    except ArgumentError:
        report.failed("database", "DATABASE_URL is not a database URL", "set it like sqlite:///proximity-sync.db or postgresql+psycopg://user@host/db")
        return None
    item = f"database {url.render_as_string(hide_password=True)}"

    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        path = Path(url.database)
        if not path.exists():
            if os.access(path.parent.resolve(), os.W_OK):
                report.ok(item, "the file does not exist yet; the connector creates it when it starts")
            else:
                report.failed(item, f"the folder {path.parent.resolve()} does not exist or is not writable", "create the folder, or change DATABASE_URL")
            return None

    try:
        engine = make_engine(settings.database_url, pool_size=1)
        status = schema_status(engine)
    except SchemaError as error:
        report.failed(item, str(error), "check DATABASE_URL, and that the database server runs and accepts this user")
        return None
    except DBAPIError as error:
        report.failed(item, *explain_database_error(settings.database_url, error))
        return None
    except Exception as error:
        report.failed(item, f"cannot be opened: {type(error).__name__}: {error}", "check DATABASE_URL")
        return None

    if not status.is_current and engine.dialect.name != "sqlite":
        report.failed(item, f"schema is at revision {status.current or 'none'}, this version needs {status.head}", "run `proximity-sync db upgrade`")
        return engine
    if not status.is_current:
        report.ok(item, "reachable; the connector upgrades its schema when it starts")
        return engine

    pending, failed = _count_deliveries(engine)
    report.ok(item, f"reachable; {pending} deliveries pending, {failed} failed")
    return engine


def _count_deliveries(engine: Engine) -> tuple[int, int]:
    query = (
        select(Delivery.state, func.count())
        .where(Delivery.state.in_((DeliveryState.PENDING, DeliveryState.FAILED)))
        .group_by(Delivery.state)
    )
    with read_only(engine).connect() as connection:
        counts = dict(connection.execute(query).all())
    return counts.get(DeliveryState.PENDING, 0), counts.get(DeliveryState.FAILED, 0)


def _check_metrics_folder(report: CheckReport) -> None:
    folder = os.environ.get(MULTIPROCESS_DIR_VARIABLE)
    if not folder:
        return

    item = MULTIPROCESS_DIR_VARIABLE
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        report.failed(item, f"{folder} is not a writable folder, so GET /metrics fails", "create the folder, writable by the user that runs the connector")
    else:
        report.ok(item, f"{folder} is a writable folder; metrics of every process are summed")


def _read_mapped_targets(report: CheckReport, engine: Engine) -> list[Target]:
    try:
        return _mapped_targets(engine)
    except SQLAlchemyError as error:
        report.skipped("hosts in the mapping table", f"not read: {error}")
        return []


def _mapped_targets(engine: Engine) -> list[Target]:
    """Return every calendar and acting user the mapping table has written to."""
    if not inspect(engine).has_table(BookingMapping.__tablename__):
        return []
    query = (
        select(BookingMapping.calendar_id, BookingMapping.acting_user)
        .where(BookingMapping.calendar_id.is_not(None))
        .distinct()
    )
    with read_only(engine).connect() as connection:
        rows = connection.execute(query).all()
    rows = sorted(rows, key=lambda row: (row[0], row[1] or ""))
    return [Target(calendar_id, acting_user) for calendar_id, acting_user in rows]


def _check_google(
    report: CheckReport,
    settings: Settings,
    mappings: Mappings | None,
    hosts: list[str],
    mapped: list[Target],
) -> None:
    from connector.calendars.google import GoogleCalendar
    from connector.calendars.google_auth import CredentialsFileError
    from connector.retries import RetryPolicy

    path = settings.google_credentials_file
    item = f"credentials file {path}"
    try:
        backend = GoogleCalendar(
            path,
            settings.google_api_endpoint,
            timeout=settings.call_timeout_seconds,
            retry_policy=RetryPolicy(max_attempts=2, max_total=settings.call_timeout_seconds),
        )
    except CredentialsFileError as error:
        report.failed(
            item,
            error.problem,
            "point GOOGLE_CREDENTIALS_FILE at the JSON key downloaded from the Google Cloud console "
            "(IAM & Admin > Service accounts > Keys), readable by the user that runs the connector",
        )
        return

    with backend:
        credentials = backend.credentials
        if credentials.is_service_account:
            report.ok(item, f"service account {credentials.principal}, client ID {credentials.client_id}")
        else:
            report.ok(item, f"authorized user {credentials.principal}")

        targets, notes = calendar_targets(mappings, hosts, mapped)
        for note in notes:
            report.skipped(*note)
        GoogleAccessCheck(report, settings, backend).run(targets)


def calendar_targets(
    mappings: Mappings | None, hosts: list[str], mapped: list[Target]
) -> tuple[dict[Target, list[str]], list[tuple[str, str]]]:
    """Collect the calendars the routing can name, each with where it came from.

    Returns the targets with their origins, and a (item, reason) note for each rule that could
    not be checked because its acting user is each booking's host.
    """
    targets: dict[Target, list[str]] = {}
    notes: list[tuple[str, str]] = []

    def add(target: Target, origin: str) -> None:
        targets.setdefault(target, []).append(origin)

    rules = mappings.router.rules if mappings is not None else ()
    for number, rule in enumerate(rules, start=1):
        origin = f"routing rule {number}"
        user = rule.acting_user or rule.host_email
        if user:
            add(Target(rule.calendar_id, user.lower()), origin)
        elif hosts:
            for host in hosts:
                add(Target(rule.calendar_id, host), f"{origin} as {host}")
        else:
            notes.append((
                f"calendar {rule.calendar_id} ({origin})",
                "not checked, because each booking's host writes it: run check --host EMAIL to check a host",
            ))

    for host in hosts:
        # With invalid mappings the host is still checked, as the default routing would send it.
        target = mappings.router.route({"hostEmail": host}) if mappings is not None else Target(host, host)
        add(target, f"--host {host}")

    for target in mapped:
        add(target, "mapping table")
    return targets, notes


class GoogleAccessCheck:
    """Gets a token for each acting user, then reads each calendar once as its acting user."""

    def __init__(self, report: CheckReport, settings: Settings, backend: GoogleCalendar) -> None:
        self.report = report
        self.settings = settings
        self.backend = backend
        self.credentials = backend.credentials

    def run(self, targets: dict[Target, list[str]]) -> None:
        from connector.calendars.google_transport import AuthRequest, make_client

        users = self._acting_users(targets)
        if not targets:
            self.report.skipped(
                "calendars",
                "none to check: no routing rule names one and the mapping table is empty; run check --host EMAIL",
            )

        timeout = self.settings.call_timeout_seconds
        with make_client(timeout, max_connections=2) as client:
            request = AuthRequest(client, timeout)
            rejected_users = {user for user in users if not self._token(user, request)}
            for target, origins in targets.items():
                self._read_calendar(target, origins, rejected_users)

    def _acting_users(self, targets: Iterable[Target]) -> list[str | None]:
        """Return the users whose tokens the calls need: the delegated hosts, or the account itself."""
        if not self.credentials.is_service_account:
            return [None]
        users = list(dict.fromkeys(self._user_of(target) for target in targets))
        return users or [None]

    def _user_of(self, target: Target) -> str | None:
        return target.acting_user if self.credentials.is_service_account else None

    def _identity(self, user: str | None) -> str:
        if user is None:
            return self.credentials.principal
        return f"{user} (delegated by {self.credentials.principal})"

    def _token(self, user: str | None, request: AuthRequest) -> bool:
        """Request an access token for `user` and report it; return whether one was issued."""
        item = f"access token for {self._identity(user)}"
        try:
            self.credentials.authorizer(user, request).authorize("GET", self.settings.google_api_endpoint, {})
        except CalendarError as error:
            detail, fix = self._token_problem(error, user)
            self.report.failed(item, detail, fix)
            return False

        self.report.ok(item, "issued")
        return True

    def _token_problem(self, error: CalendarError, user: str | None) -> tuple[str, str]:
        credentials = self.credentials
        code = error.reason

        if credentials.is_service_account and user is not None and code in DELEGATION_ERRORS:
            from connector.calendars.google_auth import SCOPE

            return (
                f"Google rejected the token request ({code}): domain-wide delegation is missing",
                f"in the {ADMIN_CONSOLE_DELEGATION}, add client ID {credentials.client_id} "
                f"with the OAuth scope {SCOPE}",
            )
        if isinstance(error, TransientCalendarError):
            return (
                error.message,
                f"check that this machine reaches the token endpoint {credentials.token_uri}, then run check again",
            )
        if code == "invalid_grant" and credentials.is_service_account:
            return (
                f"Google rejected the token request ({code})",
                f"check that {user or credentials.principal} is an active user of the Workspace domain, "
                f"that the key in {credentials.path} is not deleted or disabled, and that this machine's clock is correct",
            )
        if code == "invalid_grant":
            return (
                f"Google rejected the token request ({code}): the refresh token is expired or revoked",
                f"run the OAuth consent again and replace {credentials.path}",
            )
        return error.message, f"check the credentials file {credentials.path}"

    def _read_calendar(self, target: Target, origins: list[str], rejected_users: set[str | None]) -> None:
        user = self._user_of(target)
        reader = user or self.credentials.principal
        item = f"calendar {target.calendar_id} ({', '.join(origins)})"

        if user in rejected_users:
            self.report.failed(item, f"not read, because {reader} has no access token", "solve the access token problem above first")
            return

        try:
            self.backend.list_booking_events(target, booking_id=PROBE_BOOKING_ID)
        except CalendarNotFoundError:
            self.report.failed(item, f"not found, or not shared with {reader}", self._sharing_fix(target, user))
            return
        except CalendarError as error:
            self.report.failed(item, error.describe(), self._sharing_fix(target, user))
            return

        # NOTE: a read proves read access only; `send-test --wait` proves that events can be written.
        self.report.ok(item, f"readable as {reader}")

    def _sharing_fix(self, target: Target, user: str | None) -> str:
        principal = self.credentials.principal
        if user is None:
            return (
                f'check the calendar id; if it is right, share the calendar with {principal} '
                f'("Make changes to events")'
            )
        return (
            f'check the calendar id; if it is right, share the calendar with {user} ("Make changes to events"), '
            f"because service account {principal} writes it as {user}"
        )
