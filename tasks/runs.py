"""`dpp.execute_run`: one paid run on a worker."""
from celery.exceptions import Reject, SoftTimeLimitExceeded

from dpp.bootstrap import deps
from dpp.celery import app
from dpp.domain.packs.base import DEFAULT_TIME_LIMIT_SEC, HARD_LIMIT_GRACE_SEC
from dpp.services import execute


# The message carries its pack's time limits (dpp/adapters/queue.py); these
# defaults hold for one that does not (published before, or by hand).
@app.task(name="dpp.execute_run", bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
          soft_time_limit=DEFAULT_TIME_LIMIT_SEC, time_limit=DEFAULT_TIME_LIMIT_SEC + HARD_LIMIT_GRACE_SEC)
def execute_run(self, run_id: str) -> str:
    # An exception escaping here (PostgreSQL down at claim or finalize) is not
    # acknowledged: acks_on_failure is off, so SQS redelivers the message, and
    # its dead-letter queue takes it after three receives. The soft time limit
    # raised inside the pack ends the run FAILED PACK_TIMEOUT (the service).
    outcome = execute.execute_run(deps(), run_id, message=_sqs_message(self.request),
                                  timed_out=(SoftTimeLimitExceeded,))
    if outcome == execute.LEASE_LOST:
        # SPEC §3: only COMMIT acknowledges. Rejected without requeue, the message
        # stays on the queue (it has a redrive policy), SQS delivers it again
        # after its visibility timeout, and that delivery finds the run owned by
        # the sweeps and drops it; after 3 receives it is dead-lettered.
        raise Reject(f"{run_id}: lease lost before finalize", requeue=False)
    return outcome


def _sqs_message(request) -> tuple[str, str] | None:
    """(queue_url, receipt_handle) of the SQS message being worked, for the heartbeat.

    kombu's SQS transport puts the receipt handle in the message properties as
    its delivery tag, and the queue URL in their delivery_info.
    """
    props = getattr(request, "properties", None) or {}
    receipt = props.get("delivery_tag")
    queue_url = (props.get("delivery_info") or {}).get("sqs_queue")
    return (queue_url, receipt) if receipt and queue_url else None
