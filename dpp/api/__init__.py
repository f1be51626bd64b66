"""Flask application factory (gunicorn: `"dpp.api:create_app()"`)."""
from __future__ import annotations

from flask import Flask
from flask_cors import CORS
from flask_smorest import Api

from dpp import __version__, telemetry
from dpp.api import account, context, errors, health, packs, runs
from dpp.api.body import StrictJSONProvider, StrictRequest
from dpp.api.openapi import document_errors
from dpp.bootstrap import deps
from dpp.config import get_settings
from dpp.logs import configure_logging


def create_app(overrides: dict | None = None) -> Flask:
    settings = get_settings()
    settings.check_production()
    configure_logging(settings)
    app = Flask(__name__)
    app.json = StrictJSONProvider(app)  # NaN, Infinity and deep nesting: 400 at the parse
    app.request_class = StrictRequest   # ... saying why
    app.config.update(
        API_TITLE="Decisionproof API",
        API_VERSION=__version__,
        OPENAPI_VERSION="3.1.0",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/docs",
        OPENAPI_SWAGGER_UI_URL="https://cdn.jsdelivr.net/npm/swagger-ui-dist/",
        MAX_CONTENT_LENGTH=256 * 1024,
        JSON_SORT_KEYS=False,
    )
    app.config.update(overrides or {})
    telemetry.setup_tracing("dpp-api")
    telemetry.instrument_flask(app)  # before our hooks: its span is current in them
    telemetry.instrument_celery()    # the enqueue carries `traceparent` to the worker
    api = Api(app)
    api.register_blueprint(runs.blp)
    api.register_blueprint(account.blp)
    api.register_blueprint(packs.blp)
    # problem+json errors, auth and headers in /openapi.json; pack_type's values
    document_errors(api, deps().packs.types())
    app.register_blueprint(health.blp)
    app.before_request(context.begin_request)
    app.after_request(context.end_request)
    app.teardown_request(context.teardown_request)
    errors.register(app)  # after Api(): our problem+json replaces its error handler
    if settings.cors_allowed_origins:
        # An explicit allowlist. Keys travel in the Authorization header, never
        # in cookies, so credentials are never allowed (and so never with "*").
        CORS(
            app,
            resources={r"/v1/*": {"origins": list(settings.cors_allowed_origins)}},
            supports_credentials=False,
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "traceparent"],
            expose_headers=[
                "Location", "Retry-After", "Idempotent-Replayed", "X-Trace-Id", "RateLimit", "RateLimit-Policy",
                "X-DPP-Cost-Reserved", "X-DPP-Cost-Actual", "X-DPP-Cost-Minimum-Fee",
            ],
            max_age=600,
        )
    return app
