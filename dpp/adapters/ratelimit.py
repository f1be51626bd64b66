"""Per-tenant request counting in Redis (`lua/ratelimit.lua`)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources

import redis

from dpp.adapters.outages import raise_if_outage


@dataclass(frozen=True)
class Window:
    position: int  # this request's 1-based place in the window
    reset_after_sec: int  # seconds until the window ends


class RedisRateLimiter:
    def __init__(self, client: redis.Redis):
        self.client = client
        self._script = client.register_script(
            resources.files("dpp.adapters").joinpath("lua", "ratelimit.lua").read_text()
        )

    def hit(self, tenant_id: str, name: str, window_sec: int) -> Window:
        now = time.time()
        index = int(now // window_sec)
        key = f"ratelimit:{{{tenant_id}}}:{name}:{index}"
        try:
            position = int(self._script(keys=[key], args=[window_sec]))
        except redis.RedisError as exc:
            raise_if_outage(exc)
            raise
        return Window(position, max(1, int((index + 1) * window_sec - now + 0.999)))
