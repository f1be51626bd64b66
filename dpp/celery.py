"""The Celery application (`celery -A dpp …` finds `dpp.celery.app`).

Tasks live in the top-level `tasks/` package as thin wrappers over services.
"""
import os
import sys

from celery import Celery
from celery.signals import beat_init, heartbeat_sent, setup_logging, worker_init, worker_process_init

from dpp.adapters import kombu_sqs
from dpp.config import check_flower, get_settings

# Worker, beat, Flower and the CLI refuse to start on a production config that
# points at loopback endpoints or holds static keys, like the API does.
get_settings().check_production()
if "flower" in sys.argv[1:]:
    check_flower(get_settings(), sys.argv[1:], os.environ)
kombu_sqs.register()  # before any connection: the broker URL's scheme is ours
app = Celery("dpp", include=["tasks.runs", "tasks.sweeps"])
app.config_from_object("celeryconfig")

if "flower" in sys.argv[1:]:
    # Flower sends no setup_logging signal, and tornado adds its own text handler
    # only when the root logger has none: ours first, so Flower logs JSON too.
    from dpp.logs import configure_logging

    configure_logging(get_settings())


@setup_logging.connect
def _logging(**_):
    # Our JSON logs in workers and beat too, instead of Celery's own format.
    from dpp.logs import configure_logging

    configure_logging(get_settings())


@worker_process_init.connect
def _trace_pool_process(**_):
    # Each pool process runs tasks: continue the `traceparent` each message carries.
    from dpp import telemetry

    telemetry.setup_tracing("dpp-worker")
    telemetry.instrument_celery()


@beat_init.connect
def _beat_init(**_):
    # Connected before redbeat's own beat_init handler, which blocks a standby
    # beat until it gets the lock: the standby answers its probes meanwhile.
    from dpp import telemetry
    from dpp.adapters import beat

    telemetry.setup_tracing("dpp-beat")
    telemetry.instrument_celery()
    _serve_metrics(beat.health)


# -- worker liveness and metrics -------------------------------------------------------
# Celery's heartbeat timer runs in the worker's event loop every 2 s (it also
# sends the worker-heartbeat event Flower shows): if it stops, the loop is stuck.

_worker_liveness = None


@worker_init.connect
def _worker_init(**_):
    global _worker_liveness
    from dpp import metrics

    _worker_liveness = metrics.Liveness(stale_sec=60)
    _serve_metrics(_worker_health)


@heartbeat_sent.connect
def _worker_heartbeat(**_):
    from dpp import metrics

    if _worker_liveness is not None:
        _worker_liveness.beat()
        metrics.WORKER_HEARTBEAT.set(_worker_liveness.last)


def _worker_health() -> tuple[bool, dict]:
    age = _worker_liveness.age()
    return age < _worker_liveness.stale_sec, {"role": "worker", "last_heartbeat_age_sec": round(age, 1)}


def _serve_metrics(health) -> None:
    port = os.environ.get("DPP_METRICS_PORT")
    if port:
        from dpp import metrics

        metrics.forget_dead_processes()
        metrics.serve(int(port), health)
