"""Twisted services: one tunnel instance with its restart loop."""
