"""Celery beat's scheduler: redbeat (one active beat, held by a Redis lock), timed.

A standby beat waits for the lock and never ticks; the active one ticks at
least every `beat_max_loop_interval`. The tick time is a metric and the beat's
`/healthz` (dpp/celery.py): a beat that held the lock and stopped ticking is hung.
"""
from __future__ import annotations

from redbeat import RedBeatScheduler

from dpp import metrics

LIVENESS = metrics.Liveness(stale_sec=60)


class Scheduler(RedBeatScheduler):
    def tick(self, *args, **kwargs):
        interval = super().tick(*args, **kwargs)
        LIVENESS.beat()
        metrics.BEAT_TICK.set(LIVENESS.last)
        return interval


def health() -> tuple[bool, dict]:
    """A standby (never ticked) is healthy; the scheduling beat must keep ticking."""
    if LIVENESS.beats == 0:
        return True, {"role": "standby", "waiting_sec": round(LIVENESS.age(), 1)}
    age = LIVENESS.age()
    return age < LIVENESS.stale_sec, {"role": "scheduling", "last_tick_age_sec": round(age, 1)}
