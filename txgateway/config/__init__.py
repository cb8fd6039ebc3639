"""
The configuration: gateway.ini's sections as frozen values, and how a file becomes one.
"""
