"""Shared test fixtures: none are needed (structlog is configured only by the twistd entry point)."""
