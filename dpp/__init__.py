"""DPP (Decisionproof): pay-per-run API platform for AI agents.

`celery -A dpp` finds the Celery app in `dpp.celery`; the HTTP API is
`dpp.api:create_app()`; the admin CLI is `dpp.cli`.
"""
__version__ = "0.1.0"
