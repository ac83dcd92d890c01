"""API keys, per-key limits and usage, fair queueing and idempotency: everything about who is asking."""
