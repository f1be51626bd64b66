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


class Pack(Protocol):
    pack_type: str
    version: str
    description: str
    price: dict[str, Any]  # public: the formula and its figures, in USD micros
    input_schema: dict[str, Any]  # JSON Schema of `inputs`, published by GET /v1/packs

    def validate(self, inputs: Any) -> dict[str, Any]:
        """Return normalised inputs or raise `InvalidPackInputs` with per-field errors."""

    def min_price_micros(self, inputs: dict[str, Any]) -> int:
        """Lowest price this input can cost; submission refuses a cap below it."""

    def run(self, inputs: dict[str, Any], progress: Progress) -> PackResult:
        """Do the work on validated inputs. Deterministic: same inputs, same cost."""


__all__ = ["InvalidPackInputs", "Pack", "PackResult", "Progress"]
