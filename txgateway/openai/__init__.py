"""
OpenAI's wire: the values read from requests and answers, the stream relays and resume.
"""
