"""Canonical JSON: sorted keys, no insignificant whitespace, UTF-8.

Used for payload hashes (idempotency) and result envelopes, so the same data
always has the same bytes and the same hash.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sha256_hex(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()
