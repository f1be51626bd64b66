"""Enqueue runs on the Celery broker (SQS). The only place that publishes."""
from __future__ import annotations

import logging

from dpp.domain.errors import DependencyUnavailable

EXECUTE_RUN = "dpp.execute_run"
log = logging.getLogger(__name__)


class CeleryQueue:
    def __init__(self, app):
        self.app = app

    def enqueue_run(self, run_id: str, trace_id: str, time_limits: tuple[float, float] | None = None) -> None:
        """Publish one `dpp.execute_run`; the task id is the run id, for tracing in Flower.

        `time_limits`: the pack's (soft, hard) seconds, carried by the message (the
        task's own defaults are the longest a pack may take)."""
        limits = {} if time_limits is None else {"soft_time_limit": time_limits[0], "time_limit": time_limits[1]}
        try:
            self.app.send_task(
                EXECUTE_RUN,
                args=[run_id],
                task_id=run_id,
                headers={"trace_id": trace_id},
                **limits,
                # Runs keep no Celery result; without this every publish would
                # subscribe to the result backend and put Redis on the enqueue path.
                ignore_result=True,
            )
        except Exception as exc:  # kombu/boto raise many types; all mean "not enqueued"
            log.warning("enqueue failed", extra={"run_id": run_id, "error": repr(exc)})
            raise DependencyUnavailable("sqs", type(exc).__name__) from exc
