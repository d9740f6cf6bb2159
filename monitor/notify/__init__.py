"""Alerts out: the alert sink, the SQLite store and outbox, delivery to webhooks and Alertmanager, silences."""
