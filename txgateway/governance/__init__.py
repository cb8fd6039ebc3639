"""
Governance of tokens and money per caller: keys and teams with token and
request limits, dollar budgets and model lists, reserved before a call and
settled after it, in this process (SQLite for what survives a restart) or
in Redis (shared by every gateway).
"""
