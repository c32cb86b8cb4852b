"""Thin route modules: parse, hand off, respond."""
