"""
The response cache: what may be kept, the stores, and serving through them.
"""
