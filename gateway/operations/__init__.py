"""Conduit's own routes for operators: ``/health``, ``/ready``, ``/metrics`` and ``/openapi.json``."""
