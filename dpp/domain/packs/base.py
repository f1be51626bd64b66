"""What a pack is: validate inputs, price them, run them, report the actual cost.

Packs are pure: no database, queue or network (the `url` pack gets its fetcher
injected). The worker service drives them; the registry finds them by type.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from dpp.domain.errors import InvalidPackInputs

Progress = Callable[[float], None]
"""Called with a fraction 0.0–1.0 as the pack advances."""


@dataclass(frozen=True)
class PackResult:
    """A pack's output and what it actually cost, in USD micros."""

    output: dict[str, Any]
    actual_cost_micros: int
    meta: dict[str, Any] = field(default_factory=dict)


DEFAULT_TIME_LIMIT_SEC = 60.0
HARD_LIMIT_GRACE_SEC = 10.0


class Pack(Protocol):
    pack_type: str
    version: str
    description: str
    price: dict[str, Any]  # public: the formula and its figures, in USD micros
    input_schema: dict[str, Any]  # JSON Schema of `inputs`, published by GET /v1/packs
    time_limit_sec: float  # a run past it ends FAILED PACK_TIMEOUT (optional: DEFAULT_TIME_LIMIT_SEC)

    def validate(self, inputs: Any) -> dict[str, Any]:
        """Return normalised inputs or raise `InvalidPackInputs` with per-field errors."""

    def min_price_micros(self, inputs: dict[str, Any]) -> int:
        """Lowest price this input can cost; submission refuses a cap below it."""

    def run(self, inputs: dict[str, Any], progress: Progress) -> PackResult:
        """Do the work on validated inputs. Deterministic: same inputs, same cost."""


def time_limits(pack) -> tuple[float, float]:
    """(soft, hard) seconds for a run of `pack`: the worker enforces both (Celery's
    soft_time_limit and time_limit). At the soft one the pack is interrupted and the
    run ends FAILED PACK_TIMEOUT at the minimum fee; the hard one, for a pack that
    ignores the interruption, kills the pool process, which the worker replaces."""
    soft = float(getattr(pack, "time_limit_sec", DEFAULT_TIME_LIMIT_SEC))
    return soft, soft + HARD_LIMIT_GRACE_SEC


__all__ = ["InvalidPackInputs", "Pack", "PackResult", "Progress", "time_limits"]
