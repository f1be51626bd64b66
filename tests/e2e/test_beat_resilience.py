"""Beat keeps the sweeps going when Redis loses its data or the scheduling beat dies (issue 13).

Real `celery beat` processes with our redbeat scheduler on a PRIVATE redis-server
(the test flushes and restarts it), sending to a queue of their own on the test
moto. What the operator sees is what is checked: beat's log says "Sending due
task", its `/healthz` says which beat schedules, and no beat process exits.
"""
from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
import requests

from tests.e2e.conftest import BIN, ROOT, devstack
from tests.support.services import private_redis
from tests.support.wait import wait_for

TICK_SEC = 5          # celeryconfig.beat_max_loop_interval: the longest a beat sleeps
LOCK_TIMEOUT_SEC = 30  # celeryconfig.redbeat_lock_timeout
SENT = "Sending due task"
# A sweep far less frequent than the ticks: sent right after a wipe only if the
# re-seeded entries are due at once rather than one interval later.
RECONCILE = "Sending due task reconcile-stuck"


class Beat:
    """One `celery -A dpp beat` with its log and its /healthz, stopped by PID."""

    def __init__(self, name: str, env: dict, tmp_path):
        self.name = name
        self.port = devstack.free_port()
        self.log = tmp_path / f"{name}.log"
        self.proc = devstack.start_process(
            [BIN / "celery", "-A", "dpp", "beat", "-l", "INFO", "-s", tmp_path / f"{name}-schedule"],
            env={**env, "DPP_METRICS_PORT": str(self.port)}, log_path=self.log,
        )

    def role(self) -> str | None:
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).json().get("role")
        except (requests.RequestException, ValueError):
            return None

    def mark(self) -> int:
        return len(self.text())

    def text(self, since: int = 0) -> str:
        return self.log.read_text(errors="replace")[since:] if self.log.exists() else ""

    def sent(self, since: int = 0, what: str = SENT) -> int:
        return self.text(since).count(what)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        devstack.stop_process(self.proc)


@pytest.fixture(scope="module")
def queue(settings):
    """A queue of their own, so the sweeps beat sends reach no test worker."""
    name = f"dpp-beat-{uuid.uuid4().hex[:6]}"
    url = devstack.ensure_queue(name, settings.aws_region, settings.sqs_endpoint_url)
    yield name, url
    sqs = devstack._aws_client("sqs", settings.aws_region, settings.sqs_endpoint_url)
    for queue_name in (name, f"{name}-dlq"):
        sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=queue_name)["QueueUrl"])


class Beats:
    """Beats sharing one private Redis and one redbeat key prefix."""

    def __init__(self, redis, queue: tuple, tmp_path):
        self.redis, self.tmp_path, self.started = redis, tmp_path, []
        self.prefix = f"dpp:redbeat:{uuid.uuid4().hex[:6]}"
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": redis.url,
                    "SQS_QUEUE_NAME": queue[0], "SQS_QUEUE_URL": queue[1],
                    "REAPER_INTERVAL_SEC": "2", "RECONCILE_INTERVAL_SEC": "60",
                    "DPP_REDBEAT_KEY_PREFIX": self.prefix}

    def start(self, name: str) -> Beat:
        self.started.append(Beat(name, self.env, self.tmp_path))
        return self.started[-1]

    def exists(self, suffix: str) -> bool:
        return devstack.redis_command(self.redis.url, "EXISTS", f"{self.prefix}:{suffix}") == 1


@pytest.fixture
def beats(queue, tmp_path):
    """Every beat is stopped by PID, then the private Redis."""
    with private_redis(tmp_path) as redis:
        group = Beats(redis, queue, tmp_path)
        try:
            yield group
        finally:
            devstack.stop_processes([beat.proc for beat in group.started])


def scheduling(beat: Beat) -> bool:
    return beat.role() == "scheduling" and beat.sent() > 0


def test_beat_keeps_scheduling_after_redis_loses_its_data(beats):
    """FLUSHALL under a scheduling beat and a standby: the lock and the schedule come back
    within a couple of ticks, one beat sends the sweeps again, neither exits."""
    active = beats.start("active")
    wait_for(lambda: scheduling(active), 60, "the first beat to schedule")
    standby = beats.start("standby")
    wait_for(lambda: standby.role() == "standby", 60, "the second beat to wait as a standby")

    marks = {beat.name: beat.mark() for beat in (active, standby)}
    devstack.redis_command(beats.redis.url, "FLUSHALL")

    wait_for(lambda: any(b.sent(marks[b.name], RECONCILE) for b in (active, standby)), 3 * TICK_SEC + 5,
             "the sweeps sent again after the wipe")
    assert active.alive() and standby.alive(), (active.text()[-3000:], standby.text()[-3000:])
    # /healthz says which one schedules once its tick is done (the sends are logged during it).
    wait_for(lambda: sorted(str(b.role()) for b in (active, standby)) == ["scheduling", "standby"], TICK_SEC,
             "one beat scheduling and one standing by")
    # The schedule is back in Redis, and the operator was told why.
    assert beats.exists("schedule") and beats.exists("lock")
    logs = active.text(marks["active"]) + standby.text(marks["standby"])
    assert "re-seeding" in logs, logs[-3000:]
    # Only the beat holding the lock sends: the other one sent nothing since the wipe.
    assert min(b.sent(marks[b.name]) for b in (active, standby)) == 0


def test_standby_takes_over_a_killed_beat_and_outlives_a_redis_restart(beats):
    """SIGKILL the scheduling beat: the standby schedules within the lock timeout. Then
    Redis restarts without its data: the new scheduler re-takes the lock and goes on."""
    active = beats.start("active")
    wait_for(lambda: scheduling(active), 60, "the first beat to schedule")
    standby = beats.start("standby")
    wait_for(lambda: standby.role() == "standby", 60, "the second beat to wait as a standby")

    killed_at = time.monotonic()
    active.kill()
    wait_for(lambda: scheduling(standby), LOCK_TIMEOUT_SEC + 2 * TICK_SEC + 5,
             "the standby to take over the schedule")
    assert time.monotonic() - killed_at <= LOCK_TIMEOUT_SEC + 2 * TICK_SEC + 5

    mark = standby.mark()
    beats.redis.restart()  # same port, no data: the lock and every schedule entry are gone
    wait_for(lambda: standby.sent(mark, RECONCILE), 3 * TICK_SEC + 5, "the sweeps sent after Redis came back empty")
    assert standby.alive(), standby.text()[-3000:]
    wait_for(lambda: standby.role() == "scheduling", 2 * TICK_SEC, "the beat to report scheduling again")
