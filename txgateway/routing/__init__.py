"""
Where a request goes: the routing model, the broker and its attempts, balancing, paths.
"""
