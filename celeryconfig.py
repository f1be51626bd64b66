"""Celery settings (plain module, Celery's convention), derived from the environment.

SPEC §1: SQS broker through kombu, acks late, reject on worker lost, prefetch 1.
A task is acknowledged only after it returns, i.e. after finalize COMMIT; a
worker killed mid-run leaves the message to come back after its visibility
timeout, and the lease decides whether it may run again.
"""
import os
from urllib.parse import urlsplit

from kombu import Queue

from dpp.config import get_settings

_s = get_settings()


def _broker_url() -> str:
    # `dppsqs` is kombu's SQS transport with our fixes (dpp/adapters/kombu_sqs.py).
    if not _s.sqs_endpoint_url:
        return "dppsqs://"  # real AWS: region from transport options, credentials from the chain
    parts = urlsplit(_s.sqs_endpoint_url)
    creds = _s.aws_credentials(_s.sqs_endpoint_url)
    auth = f"{creds['aws_access_key_id']}:{creds['aws_secret_access_key']}@" if creds else ""
    port = f":{parts.port}" if parts.port else ""
    return f"dppsqs://{auth}{parts.hostname}{port}"


broker_url = _broker_url()
broker_transport_options = {
    "region": _s.aws_region,
    "is_secure": urlsplit(_s.sqs_endpoint_url).scheme != "http" if _s.sqs_endpoint_url else True,
    # Longer than the lease: a live worker's message must not reappear while it
    # still holds the lease (the heartbeat extends both).
    "visibility_timeout": _s.worker_visibility_timeout_sec or max(2 * _s.worker_lease_ttl_sec, 30),
    "wait_time_seconds": 5,
    "polling_interval": 0.1,
    # botocore's defaults (60 s connect and read, 3 attempts) held POST /v1/runs
    # for 6 minutes on a hung SQS endpoint: the agent got no answer while the
    # run held its reservation. Fail fast instead: the API answers 503 and gives
    # the money back. read_timeout must stay above wait_time_seconds.
    "client-config": {
        "connect_timeout": 2,
        "read_timeout": 6,
        "retries": {"mode": "standard", "total_max_attempts": 1},
    },
}
# The runs queue is never auto-created (its dead-letter queue would be missing);
# a known URL saves a lookup and may name a queue in another account.
broker_transport_options["work_queues"] = {_s.sqs_queue_name: _s.sqs_queue_url}

# Broadcast (Flower, `celery inspect`, `celery control`) goes through SNS topics
# that our transport manages (dpp/adapters/kombu_sqs.py). Their names derive from
# the queue's, so two deployments on one account (or `make run` beside
# `make test` on one moto) never answer each other's pings or see each other's
# events.
control_exchange = _s.sqs_queue_name              # SNS topic <queue>-pidbox; replies to <id>-reply-<queue>-pidbox
event_exchange = f"{_s.sqs_queue_name}-events"    # SNS topic, fanout (Celery would make it `topic`)
event_queue_prefix = f"{_s.sqs_queue_name}-ev"    # Flower's and `celery events`' receiving queues
broker_transport_options["supports_fanout"] = True
broker_transport_options["broadcast_exchanges"] = [event_exchange]
# A temporary queue (mailbox, reply, event receiver) untouched this long is
# deleted by the dpp.sweep_broker task; the tests shorten it.
broker_transport_options["temporary_queue_idle_sec"] = int(os.environ.get("DPP_BROKER_QUEUE_IDLE_SEC") or 300)
# Task events for Flower's task list (received, started, succeeded, failed).
# Not `task_send_sent_event`: that would add an SNS publish to POST /v1/runs.
worker_send_task_events = True

broker_connection_retry_on_startup = True
broker_connection_timeout = 5

task_default_queue = _s.sqs_queue_name
# Two queues (SPEC §3): runs, and the sweeps with the engineers' tasks. A worker
# consumes both unless told otherwise (`-Q`); the chart and the chaos runner can run
# a sweeper of its own (`celery -A dpp worker -Q <queue>-sweeps`). Either way a
# sweep never queues behind a backlog of runs (and runs never behind a backlog of
# expired sweeps: a worker restart once left runs behind a minute of them).
task_queues = (Queue(_s.sqs_queue_name), Queue(_s.sweeps_queue))


def route_task(name, args, kwargs, options, task=None, **kw):
    if name == "dpp.execute_run":
        return {"queue": _s.sqs_queue_name}
    return {"queue": _s.sweeps_queue}


task_routes = (route_task,)
task_serializer = "json"
accept_content = ["json"]
result_serializer = "json"
# Runs keep their results in PostgreSQL and S3; only the engineers' tasks
# (dpp.reconcile_run, dpp.audit_tenant) store a result, so that
# `celery -A dpp result <task id>` prints their report.
task_ignore_result = True
result_backend = _s.redis_url
result_expires = 7 * 24 * 3600

task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
# A task that raises (PostgreSQL down at claim or finalize) is rejected, not
# acknowledged: with the queue's redrive policy kombu leaves the message for
# SQS to deliver again, and the dead-letter queue takes it after 3 receives.
task_acks_on_failure = False
task_acks_on_timeout = False
worker_hijack_root_logger = False

# Publishing from the API must fail fast: a 503 with nothing reserved beats a
# request hanging on a dead queue.
task_publish_retry = True
task_publish_retry_policy = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}

beat_scheduler = "dpp.adapters.beat:Scheduler"  # redbeat, timed for /healthz and metrics
redbeat_redis_url = _s.redis_url
redbeat_key_prefix = os.environ.get("DPP_REDBEAT_KEY_PREFIX", "dpp:redbeat")
# Short, so a standby beat takes over within seconds of the active one dying
# (the sweeps bound how long a dead worker's run can stay unsettled).
redbeat_lock_timeout = 30
beat_max_loop_interval = 5

timezone = "UTC"
enable_utc = True

# Sweeps (SPEC §3). Intervals from the environment; redbeat's Redis lock keeps
# a second beat process idle until the first one's lock expires.
beat_schedule = {
    "sweep-expired-leases": {"task": "dpp.sweep_expired_leases", "schedule": float(_s.reaper_interval_sec)},
    "reconcile-stuck": {"task": "dpp.reconcile_stuck", "schedule": float(_s.reconcile_interval_sec)},
    "sweep-stale-queued": {"task": "dpp.sweep_stale_queued", "schedule": float(_s.reaper_interval_sec)},
    "release-orphan-holds": {"task": "dpp.release_orphan_holds", "schedule": float(_s.reaper_interval_sec)},
    "purge-expired-results": {"task": "dpp.purge_expired_results", "schedule": 3600.0},
    "audit-budgets": {"task": "dpp.audit_budgets", "schedule": float(_s.audit_interval_sec)},
    "audit-full": {"task": "dpp.audit_full", "schedule": float(_s.audit_full_interval_sec)},
    "record-queue-depth": {"task": "dpp.record_queue_depth", "schedule": 15.0},
    "sweep-broker": {"task": "dpp.sweep_broker", "schedule": 300.0},
}
# A sweep that waited behind a backlog longer than its own interval is stale:
# the next one is already on its way.
task_annotations = {
    entry["task"]: {"expires": max(5.0, entry["schedule"])} for entry in beat_schedule.values()
}
