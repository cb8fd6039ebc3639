"""
The twistd dropin for C{twistd txgateway}.  It imports nothing of txgateway
until the plugin is used, so C{twistd --help} stays fast.
"""

from twisted.application.service import ServiceMaker

txgateway = ServiceMaker(
    "txgateway",
    "txgateway.daemon.tap",
    "API gateway for AI services: routing, streaming, circuit breakers, "
    "retries, rate limits.",
    "txgateway",
)
