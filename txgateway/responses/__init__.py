"""OpenAI's Responses API: its wire (pure) and its speakers."""
