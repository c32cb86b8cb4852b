"""The OpenAI Responses API wire format, translated to and from chat completion jobs."""
