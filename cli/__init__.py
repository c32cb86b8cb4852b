"""The `claude-gateway` command: `up` (everything on one machine), `api`, `worker`."""
