"""
Pure cores that keep a failing backend from taking the gateway down: breaker, retry policy and budget.
"""
