"""Named fault points on the money path, for fault-injection tests (SPEC §2).

`DPP_FAULTS=after_finalize_claim,after_s3_upload` makes the process SIGKILL
itself when it reaches one of those points: no cleanup, no `finally`, exactly
what a power cut or the OOM killer does. Unset (production), a point costs one
frozenset lookup.
"""
from __future__ import annotations

import os
import signal

POINTS = (
    "after_reserve",          # Redis hold taken, no run row yet
    "after_run_row",          # run + RESERVE committed, not enqueued
    "after_enqueue",          # enqueued, no response sent
    "after_lease_claim",      # PROCESSING under a lease, pack not started
    "mid_pack",               # inside the pack (first progress report)
    "after_finalize_claim",   # CLAIMED, nothing uploaded
    "after_s3_upload",        # envelope in S3, not committed
    "after_redis_settle",     # Redis receipt written, ledger not committed
    "after_ledger_commit",    # COMMITTED, task not acknowledged
    "sweep_between_read_and_write",
)

_active = frozenset(p.strip() for p in os.environ.get("DPP_FAULTS", "").split(",") if p.strip())
unknown = _active - set(POINTS)
if unknown:
    raise RuntimeError(f"DPP_FAULTS names unknown fault points: {sorted(unknown)}")


def fault_point(name: str) -> None:
    if name in _active:
        os.kill(os.getpid(), signal.SIGKILL)
