"""Decision proofs: a signed, canonical result envelope anyone holding the key can check.

The signature is HMAC-SHA256 over the canonical JSON (sorted keys, no
insignificant whitespace) of the envelope without its `signature` member, so
re-indenting a stored envelope does not break it but changing any value does.
`input_hash` is the SHA-256 of the canonical inputs, which the envelope carries
too: a verifier can recompute both the hash and, for pure packs, the result.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from dpp.domain.canonical import canonical_json, sha256_hex

ALGORITHM = "HMAC-SHA256"


def sign(envelope: dict[str, Any], key: bytes, key_id: str) -> dict[str, Any]:
    unsigned = {k: v for k, v in envelope.items() if k != "signature"}
    digest = hmac.new(key, canonical_json(unsigned), hashlib.sha256).hexdigest()
    return {**unsigned, "signature": {"alg": ALGORITHM, "key_id": key_id, "value": digest}}


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str


def verify(document: Any, keys: dict[str, bytes]) -> Verdict:
    """Check a parsed envelope against the known keys (key id -> secret)."""
    if not isinstance(document, dict):
        return Verdict(False, "not a JSON object")
    signature = document.get("signature")
    if not isinstance(signature, dict) or not {"alg", "key_id", "value"} <= signature.keys():
        return Verdict(False, "no signature (alg, key_id, value)")
    if signature["alg"] != ALGORITHM:
        return Verdict(False, f"unsupported algorithm {signature['alg']!r}")
    key = keys.get(signature["key_id"])
    if key is None:
        return Verdict(False, f"unknown key id {signature['key_id']!r}")
    unsigned = {k: v for k, v in document.items() if k != "signature"}
    try:
        expected = hmac.new(key, canonical_json(unsigned), hashlib.sha256).hexdigest()
    except (TypeError, ValueError) as exc:
        return Verdict(False, f"cannot canonicalise: {exc}")
    if not isinstance(signature["value"], str) or not hmac.compare_digest(expected, signature["value"]):
        return Verdict(False, "signature does not match: the envelope was altered or signed with another key")
    if "inputs" in document and document.get("input_hash") != sha256_hex(document["inputs"]):
        return Verdict(False, "input_hash does not match the inputs")
    return Verdict(True, f"valid {ALGORITHM} signature by key {signature['key_id']!r}")
