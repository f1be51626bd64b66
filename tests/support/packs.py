"""Test-only packs, registered through DPP_EXTRA_PACKS (never in production)."""
from __future__ import annotations

import time

from dpp.domain.packs.base import PackResult


class BoomPack:
    """Always fails once started: the run must end FAILED at the minimum fee."""

    pack_type = "boom"
    version = "test"

    def validate(self, inputs):
        return dict(inputs)

    def min_price_micros(self, inputs):
        return 1_000

    def run(self, inputs, progress):
        progress(0.5)
        raise RuntimeError("boom")


class HangPack:
    """Never ends by itself (a pack stuck in a wait): its 2 s time limit ends the run."""

    pack_type = "hang"
    version = "test"
    time_limit_sec = 2.0

    def validate(self, inputs):
        return dict(inputs)

    def min_price_micros(self, inputs):
        return 1_000

    def run(self, inputs, progress):
        progress(0.1)
        while True:
            time.sleep(3600)


class SlowPack:
    """Sleeps `seconds` (default 1) in small steps, reporting progress; costs 2,000 micros."""

    pack_type = "slow"
    version = "test"

    def validate(self, inputs):
        return {"seconds": float(inputs.get("seconds", 1))}

    def min_price_micros(self, inputs):
        return 2_000

    def run(self, inputs, progress):
        steps = max(1, int(inputs["seconds"] * 10))
        for i in range(steps):
            time.sleep(inputs["seconds"] / steps)
            progress((i + 1) / steps)
        return PackResult({"slept": inputs["seconds"]}, 2_000)
