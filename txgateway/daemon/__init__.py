"""
The daemon's assembly: the twistd entry point and the service that builds and reloads the gateway.
"""
