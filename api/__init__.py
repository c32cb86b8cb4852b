"""The HTTP side: OpenAI wire format in, jobs onto the queue, job events back out as JSON or SSE."""
