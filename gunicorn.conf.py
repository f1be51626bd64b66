"""gunicorn's settings, read from the working directory (make run, tests, the image).

Its own loggers (errors, access lines) write through our formatter, so every line of
the API process is JSON like the application's (`DPP_JSON_LOGS`, docs/operations.md).
"""
import os

from dpp.logs import gunicorn_logconfig

logconfig_dict = gunicorn_logconfig()


def when_ready(server):
    # /metrics (every worker's samples, summed through PROMETHEUS_MULTIPROC_DIR) and
    # /healthz of the master on a port of their own, as the worker and beat serve
    # theirs: in production the API's public port does not serve metrics.
    port = os.environ.get("DPP_METRICS_PORT")
    if port:
        from dpp import metrics

        try:
            metrics.serve(int(port), lambda: (True, {"role": "api"}))
        except OSError as exc:  # a USR2 re-exec's new master, while the old one still holds it
            server.log.warning("metrics not served on :%s: %s", port, exc)


def post_fork(server, worker):
    # A hung PostgreSQL, SQS or S3 must give the request its 503 before this worker's
    # timeout kills it (dpp.adapters.db.bound_waits, dpp.adapters.aws.bound_waits).
    # Here, in the API's processes only: the setting is process-wide, and a worker's
    # or a test's long wait is not a hang.
    from dpp.adapters import aws, db
    from dpp.config import get_settings

    db.bound_waits(get_settings().io_timeout_sec)
    aws.bound_waits(get_settings().io_timeout_sec)


def child_exit(server, worker):
    # A gunicorn worker that exits leaves its live gauges behind: mark them dead so
    # /metrics stops reporting them (prometheus_client's multiprocess mode).
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
