"""Shared test fixtures."""

import pytest
import structlog


@pytest.fixture(autouse=True)
def structlog_defaults():
    """A test that builds a real GatewayService configures structlog globally: undo it."""
    yield
    structlog.reset_defaults()
