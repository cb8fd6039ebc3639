"""Anthropic's Messages API: what the gateway reads of it, and its translation to and from OpenAI's."""
