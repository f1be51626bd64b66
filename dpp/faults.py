"""Named fault points on the money path, for fault-injection tests (SPEC §2).

A point SIGKILLs the process that reaches it: no cleanup, no `finally`, exactly
what a power cut or the OOM killer does. Two ways to arm one:
- `DPP_FAULTS=after_finalize_claim,...`: every time the point is reached;
- `DPP_FAULT_TOKENS=<dir>`: once per token file `<dir>/<point>.<n>` — the
  process that manages to delete one dies, so a restarted process does not die
  again (the chaos runner arms one token per trial, several trials at once).
  A token armed with a scope (a tenant) is taken only where that tenant's money
  or run passes the point: under other tenants' traffic the fault lands on the
  trial's own tenant, whose recovery the judge then times against the bound.
Unset (production), a point costs one frozenset lookup and one None check.
"""
from __future__ import annotations

import hashlib
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
    "orphan_sweep_between_read_and_write",
    "rebuild_between_read_and_write",  # tenant fenced, ledger read, Redis not yet restored
)

_active = frozenset(p.strip() for p in os.environ.get("DPP_FAULTS", "").split(",") if p.strip())
unknown = _active - set(POINTS)
if unknown:
    raise RuntimeError(f"DPP_FAULTS names unknown fault points: {sorted(unknown)}")


_tokens = os.environ.get("DPP_FAULT_TOKENS") or None


def fault_point(name: str, *scopes: str) -> None:
    """`scopes`: the tenants whose money passes this point here (a sweep's batch may
    carry several); a scoped token fires only for one of them, an unscoped one always."""
    if name in _active:
        os.kill(os.getpid(), signal.SIGKILL)
    if _tokens is not None:
        prefixes = (name + ".", *(_scoped(name, scope) for scope in scopes))
        for token in os.listdir(_tokens):
            if token.startswith(prefixes):
                try:
                    os.remove(os.path.join(_tokens, token))  # atomic: one process wins each token
                except FileNotFoundError:
                    continue
                os.kill(os.getpid(), signal.SIGKILL)


def _scoped(name: str, scope: str) -> str:
    # Hashed: a tenant id may hold any character, and no id may be a prefix of another's tag.
    return f"{name}@{hashlib.sha256(str(scope).encode()).hexdigest()[:16]}."


def arm(tokens_dir: str, name: str, scope: str | None = None) -> str:
    """Arm one firing of `name` for processes started with DPP_FAULT_TOKENS=tokens_dir;
    with `scope`, only where that tenant passes the point."""
    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r}")
    prefix = name + "." if scope is None else _scoped(name, scope)
    token = os.path.join(tokens_dir, f"{prefix}{os.urandom(6).hex()}")
    with open(token, "w"):
        pass
    return token
