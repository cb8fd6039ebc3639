"""
Every core of a host: a supervisor process that starts the workers, holds
the state they must share exactly (the memory rate limiter, the local
ledger, circuit verdicts) and answers for them as one daemon.
"""
