"""`dpp.execute_run`: one paid run on a worker."""
from dpp.bootstrap import deps
from dpp.celery import app
from dpp.services import execute


@app.task(name="dpp.execute_run", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def execute_run(run_id: str) -> str:
    # An exception escaping here (PostgreSQL down at claim or finalize) is not
    # acknowledged: acks_on_failure is off, so SQS redelivers the message, and
    # its dead-letter queue takes it after three receives.
    return execute.execute_run(deps(), run_id)
