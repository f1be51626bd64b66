"""Celery beat's scheduler: redbeat (one active beat, held by a Redis lock), timed.

A standby beat waits for the lock and never ticks; the active one ticks at
least every `beat_max_loop_interval`. The tick time is a metric and the beat's
`/healthz` (dpp/celery.py): a beat that held the lock and stopped ticking is hung.
"""
from __future__ import annotations

import logging

from redbeat import RedBeatScheduler

from dpp import metrics

log = logging.getLogger(__name__)
LIVENESS = metrics.Liveness(stale_sec=60)


class Scheduler(RedBeatScheduler):
    def tick(self, *args, **kwargs):
        interval = super().tick(*args, **kwargs)
        LIVENESS.beat()
        metrics.BEAT_TICK.set(LIVENESS.last)
        return min(interval, watch_mirror())


def watch_mirror() -> float:
    """Restore every tenant's Redis mirror right after Redis lost its data.

    Run by the scheduling beat on every tick, not sent as a task: it must not
    wait behind a backlog of runs, and there is exactly one active beat. One GET
    when nothing happened. Returns the seconds until the next check.
    """
    from dpp.bootstrap import deps
    from dpp.services.sweeps import restore_mirrors

    d = deps()
    try:
        restore_mirrors(d)
    except Exception:  # Redis or PostgreSQL blinking: the next tick tries again
        log.warning("mirror watch failed; retrying on the next tick", exc_info=True)
    return d.settings.mirror_watch_interval_sec


def health() -> tuple[bool, dict]:
    """A standby (never ticked) is healthy; the scheduling beat must keep ticking."""
    if LIVENESS.beats == 0:
        return True, {"role": "standby", "waiting_sec": round(LIVENESS.age(), 1)}
    age = LIVENESS.age()
    return age < LIVENESS.stale_sec, {"role": "scheduling", "last_tick_age_sec": round(age, 1)}
