"""proximity-sync: mirror Proximity bookings into staff calendars."""

__version__ = "0.1.0"
