"""Money on the wire and in memory (SPEC §2).

Inside DPP money is an `int` of USD micros (1 USD = 1,000,000). On the wire it
is a decimal string with at most 6 fractional digits and at least 2 shown.
Parsing is done on the text itself, never through float or Decimal contexts,
so "0.1" is exactly 100,000 micros and nothing can round.
"""
from __future__ import annotations

import re

from dpp.domain.errors import InvalidMoney

MICROS_PER_USD = 1_000_000

# Plain decimal: digits, optional point with 1–6 digits. No sign, exponent,
# whitespace, NaN/Infinity or leading "+" — each of those is a 422. Matched
# whole (fullmatch): "$" alone also matches before a trailing newline.
_MONEY_RE = re.compile(r"(0|[1-9][0-9]{0,11})(?:\.([0-9]{1,6}))?")


def parse_usd(text: object) -> int:
    """'5.00' -> 5_000_000. Rejects everything but a plain non-negative decimal string."""
    if not isinstance(text, str):
        # JSON numbers arrive as int/float: refused so that no float ever carries money.
        raise InvalidMoney("must be a decimal string such as \"5.00\", not a JSON number")
    match = _MONEY_RE.fullmatch(text)
    if match is None:
        raise InvalidMoney(
            "must be a non-negative decimal string with at most 6 fractional digits, e.g. \"5.00\""
        )
    whole, frac = match.group(1), match.group(2) or ""
    return int(whole) * MICROS_PER_USD + int(frac.ljust(6, "0"))


def format_usd(micros: int) -> str:
    """5_000_000 -> '5.00'; 125 -> '0.000125'. At least 2 fractional digits shown."""
    if not isinstance(micros, int) or isinstance(micros, bool):
        raise TypeError("money is an int of micros")
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_USD)
    frac_text = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{frac_text}"
