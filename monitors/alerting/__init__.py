"""The alerting side: rules on z-scores, the per-request monitor that applies them, and where events and their
follow-ups go (Redis stream or memory, the durable spool, Alertmanager, the review queue, conversations)."""
