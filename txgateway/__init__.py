"""
txgateway: an API gateway for AI services, on Twisted.

Run it with C{twistd -n txgateway --config gateway.ini}; see README.rst.
"""

__version__ = "0.1.0"
