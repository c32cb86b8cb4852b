"""Code both processes import: settings, the job contract, the Redis key schema, event streams."""
