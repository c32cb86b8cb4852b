"""Worker processes: take completion jobs off the queue and run them on a backend."""
