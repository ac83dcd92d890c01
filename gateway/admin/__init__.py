"""The admin API for API keys (``/admin/keys...``), registered only with an admin credential set."""
