"""
What the gateway says about itself: the request context, logs, metrics, trace context, the recent window.
"""
