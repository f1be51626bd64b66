"""API key format: `dpp_live_<32 base62>_<8 checksum>` (SPEC §4).

The checksum lets the API refuse a mistyped or made-up key before touching
the database; only the SHA-256 of a key is ever stored.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
PREFIX = "dpp_live_"
_KEY_RE = re.compile(r"^dpp_live_([0-9A-Za-z]{32})_([0-9A-Za-z]{8})$")


def _base62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


def checksum(body: str) -> str:
    digest = hashlib.sha256(f"{PREFIX}{body}".encode()).digest()
    return _base62(int.from_bytes(digest[:6], "big"), 8)


def generate() -> str:
    body = "".join(secrets.choice(_ALPHABET) for _ in range(32))
    return f"{PREFIX}{body}_{checksum(body)}"


def well_formed(key: str) -> bool:
    """Format and checksum, compared in constant time."""
    match = _KEY_RE.match(key or "")
    if match is None:
        return False
    return hmac.compare_digest(checksum(match.group(1)), match.group(2))


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    """What may be shown back to a person: enough to tell keys apart, not to use one."""
    return key[: len(PREFIX) + 6]
