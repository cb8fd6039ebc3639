"""
The operator's routes, served by Klein: probes, metrics, health and the status page.
"""
