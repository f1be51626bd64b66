"""Celery entrypoints: thin wrappers over `dpp.services`."""
