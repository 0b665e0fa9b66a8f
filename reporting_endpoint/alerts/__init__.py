"""Alerts: rules over issues and volumes, an outbox written with the facts, and its senders."""
