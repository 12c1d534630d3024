"""The embedded `ics` calendar backend, used when no Google credentials are configured.

Events live in the app's database (`ics_store`) and each calendar is published as an
iCalendar feed at a secret URL (`ics_feed`). Import the public API from here.
"""

from connector.calendars.ics_feed import feed_routes, feed_url
from connector.calendars.ics_store import IcsCalendar, IcsEvent, IcsFeed

__all__ = ["IcsCalendar", "IcsEvent", "IcsFeed", "feed_routes", "feed_url"]
