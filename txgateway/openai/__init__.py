"""
OpenAI's wire: the values read from requests and answers, and the relays
that follow its streams (resuming a broken stream is routing's).
"""
