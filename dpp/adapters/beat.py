"""Celery beat's scheduler: redbeat (one active beat, held by a Redis lock), timed.

A standby beat waits for the lock and never ticks; the active one ticks at
least every `beat_max_loop_interval`. The tick time is a metric and the beat's
`/healthz` (dpp/celery.py): a beat that held the lock and stopped ticking is hung.

Redis is where redbeat keeps both the lock and the schedule, and Redis can lose
them (restarted without its data, flushed, failed over). Upstream redbeat then
raises out of `tick` and beat exits, and a beat that takes the lock on an empty
Redis finds no entries and sends nothing until it is restarted (issue 13). Here:
- a beat that loses the lock steps down (stops scheduling, reports standby) and
  re-acquires it the way redbeat does at start-up, blocking with the normal lock
  timeout, so a standby that took over meanwhile keeps it;
- the beat holding the lock checks each tick that every static entry is still
  in the schedule, and re-seeds the ones missing from `beat_schedule` at once,
  so the sweeps go on within one tick;
- Redis out of reach is waited out tick by tick; once the lock has had time to
  expire, the beat counts itself a standby.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from types import SimpleNamespace

from redbeat import RedBeatScheduler
from redbeat.schedulers import acquire_distributed_beat_lock, get_redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dpp import metrics

log = logging.getLogger(__name__)

LIVENESS = metrics.Liveness(stale_sec=60)
REDIS_RETRY_SEC = 1.0
LONG_AGO = datetime(2000, 1, 1, tzinfo=timezone.utc)  # a last run that makes any entry due


class Role:
    """What `/healthz` reports: since when this beat waits for the lock, or None while it schedules."""

    standby_since: float | None = time.time()


class Scheduler(RedBeatScheduler):
    _last_extended: float | None = None  # monotonic time of the last tick that extended the lock
    _redis_down_since: float | None = None

    def tick(self, *args, **kwargs):
        try:
            if self.lock_key:
                if self.lock is None:
                    self._acquire_lock()
                # Ours before the schedule is touched: only the lock holder re-seeds.
                self.lock.extend(int(self.lock_timeout))
            self._reseed_if_lost()
            interval = super().tick(*args, **kwargs)  # extends again (one cheap call), sends what is due
        except LockError as exc:  # LockNotOwnedError included: the key expired, was taken or wiped
            self._step_down(f"lost the lock ({exc})")
            return 0  # the next tick re-acquires it
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self._wait_for_redis(exc)
            return REDIS_RETRY_SEC
        self._last_extended, self._redis_down_since = time.monotonic(), None
        Role.standby_since = None
        LIVENESS.beat()
        metrics.BEAT_TICK.set(LIVENESS.last)
        return min(interval, watch_mirror())


    def _wait_for_redis(self, exc: Exception) -> None:
        now = time.monotonic()
        if self._redis_down_since is None:
            self._redis_down_since = now
            log.warning("beat: Redis out of reach, retrying every %ss: %s", REDIS_RETRY_SEC, exc)
        # The lock may still be ours when Redis answers again (a blip): keep it. Once
        # it has expired for sure, stop claiming to schedule; whoever gets it next
        # (this beat or a standby) re-seeds what Redis lost.
        if self.lock is not None and self._last_extended and now - self._last_extended > self.lock_timeout:
            self._step_down(f"Redis out of reach for longer than the lock timeout ({exc})")

    def _acquire_lock(self) -> None:
        # redbeat's own start-up path (beat_init): blocks until the lock is free,
        # trying every max_interval; a beat scheduling meanwhile keeps it.
        log.info("beat: waiting for the scheduler lock %s", self.lock_key)
        acquire_distributed_beat_lock(sender=SimpleNamespace(scheduler=self))

    def _step_down(self, why: str) -> None:
        log.warning("beat: %s; stepping down, scheduling nothing until the lock is re-acquired", why)
        metrics.BEAT_STEP_DOWNS.inc()
        self.lock = None  # never extended or released again: it is not ours
        if Role.standby_since is None:
            Role.standby_since = time.time()

    def _reseed_if_lost(self) -> None:
        """Re-create static entries missing from the schedule (Redis lost its data)."""
        names = list(self.app.redbeat_conf.schedule)
        if not names:
            return
        keys = [self.Entry.generate_key(self.app, name) for name in names]
        scores = get_redis(self.app).zmscore(self.app.redbeat_conf.schedule_key, keys)
        missing = [name for name, score in zip(names, scores) if score is None]
        if missing:
            log.warning("beat: %d of %d schedule entries missing from Redis (%s), re-seeding the schedule "
                        "from beat_schedule", len(missing), len(names), ", ".join(missing))
            metrics.BEAT_RESEEDS.inc()
            # redbeat's start-up path: entries still present keep their last run.
            self.setup_schedule()
            # It stores a new entry as if it had just run (Celery's default), so a 30 s
            # sweep would wait 30 s more, an hourly one an hour. Nobody knows when the
            # lost ones last ran, and every sweep is safe to run at any time: due now.
            for name in missing:
                self.Entry.from_key(self.Entry.generate_key(self.app, name), app=self.app).reschedule(LONG_AGO)


def health() -> tuple[bool, dict]:
    """A standby (waiting for the lock) is healthy; the scheduling beat must keep ticking."""
    if Role.standby_since is not None:
        return True, {"role": "standby", "waiting_sec": round(time.time() - Role.standby_since, 1)}
    age = LIVENESS.age()
    return age < LIVENESS.stale_sec, {"role": "scheduling", "last_tick_age_sec": round(age, 1)}


_restore_unfinished = False


def watch_mirror() -> float:
    """Restore every tenant's Redis mirror right after Redis lost its data.

    Run by the scheduling beat on every tick, not sent as a task: it must not
    wait behind a backlog of runs, and there is exactly one active beat. One GET
    when nothing happened. The sentinel is set before the restores, so a restore
    cut short (PostgreSQL blinking) is finished on the next tick by checking
    every tenant's key. Returns the seconds until the next check.
    """
    global _restore_unfinished
    from dpp.bootstrap import deps
    from dpp.services.sweeps import restore_mirrors

    d = deps()
    try:
        restore_mirrors(d, force=_restore_unfinished)
        _restore_unfinished = False
    except Exception:  # Redis or PostgreSQL blinking: the next tick tries again
        _restore_unfinished = True
        log.warning("mirror watch failed; retrying on the next tick", exc_info=True)
    return d.settings.mirror_watch_interval_sec
