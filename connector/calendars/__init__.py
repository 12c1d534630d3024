"""Calendar backends: Google Calendar and the embedded iCalendar feed."""
