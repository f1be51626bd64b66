"""Logs with trace_id, run_id and tenant_id when known (SPEC §6).

JSON lines by default (`DPP_JSON_LOGS=1`); `make run` shows a readable text
form with the same fields at the end of each line. The fields come from
`dpp.telemetry` (the current trace and what was bound for this run), and a
log call's own `extra` wins over them.
"""
from __future__ import annotations

import json
import logging
import os
import sys

from dpp import telemetry

_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
_TEXT_FIELDS = ("trace_id", "run_id", "tenant_id")

# Where CRITICAL money alerts are routed (the `alert_channel` field of the log line).
ALERT_CHANNEL = os.environ.get("DPP_ALERT_CHANNEL", "payments-oncall")


def _fields(record: logging.LogRecord) -> dict:
    fields = telemetry.log_fields()
    for key, value in vars(record).items():
        if key not in _STANDARD and not key.startswith("_"):
            fields[key] = value
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        context = " ".join(f"{k}={fields[k]}" for k in _TEXT_FIELDS if fields.get(k))
        return f"{line} [{context}]" if context else line


def configure_logging(settings) -> None:
    root = logging.getLogger()
    if getattr(root, "_dpp_configured", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.json_logs else TextFormatter())
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    root._dpp_configured = True


def gunicorn_logconfig() -> dict:
    """gunicorn's `logconfig_dict`: its error and access loggers through our formatter."""
    from dpp.config import Settings

    formatter = "dpp.logs.JsonFormatter" if Settings.from_env().json_logs else "dpp.logs.TextFormatter"
    handler = {"class": "logging.StreamHandler", "formatter": "dpp", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"dpp": {"()": formatter}},
        "handlers": {"error_console": handler, "console": handler},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["error_console"], "propagate": False, "qualname": "gunicorn.error"},
            "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False, "qualname": "gunicorn.access"},
        },
    }
