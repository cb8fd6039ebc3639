"""
The front door: every complete request gets its context here and goes to the broker or the admin routes.
"""
