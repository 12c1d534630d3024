"""Operator commands: `check` the setup, `send-test` a delivery, `reconcile` the calendars."""
