"""The Anthropic Messages API wire format, translated to and from chat completion jobs."""
