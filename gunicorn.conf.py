"""gunicorn's settings, read from the working directory (make run, tests, the image).

Its own loggers (errors, access lines) write through our formatter, so every line of
the API process is JSON like the application's (`DPP_JSON_LOGS`, docs/operations.md).
"""
import os

from dpp.logs import gunicorn_logconfig

logconfig_dict = gunicorn_logconfig()


def child_exit(server, worker):
    # A gunicorn worker that exits leaves its live gauges behind: mark them dead so
    # /metrics stops reporting them (prometheus_client's multiprocess mode).
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
