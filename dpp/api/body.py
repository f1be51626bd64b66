"""Request bodies as SPEC §4 takes them: JSON per RFC 8259, and not too deep.

Python's json module accepts `NaN`, `Infinity` and `-Infinity`, which are not
JSON; a value holding one was refused later by the payload hash (a 500). And a
body nested a few hundred levels deep parses, then overflows the stack of
whatever walks it next (validation, hashing, the JSONB adapter): a 500 again.
Both are refused here, at the parse, as a 400 (Flask turns the ValueError into
a BadRequest), before anything is counted, held or stored.
"""
from __future__ import annotations

import json

from flask import Request
from flask.json.provider import DefaultJSONProvider
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request
from werkzeug.exceptions import BadRequest

# Deeper than any pack's inputs need (the decision pack's are 4 levels), far
# below the interpreter's recursion limit.
MAX_DEPTH = 64


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number (RFC 8259); send a finite number or a string")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e999: valid JSON, but no double holds it
        raise ValueError(f"the number {text[:40]} is out of range (a double's)")
    return value


def too_deep(value, limit: int = MAX_DEPTH) -> bool:
    """True if a container sits more than `limit` levels deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


class StrictJSONProvider(DefaultJSONProvider):
    def loads(self, s, **kwargs):
        try:
            value = json.loads(s, parse_constant=_refuse_constant, parse_float=_finite_float, **kwargs)
        except RecursionError:
            raise ValueError(f"nested more than {MAX_DEPTH} levels deep") from None
        if too_deep(value):
            raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
        return value


class StrictRequest(Request):
    def on_json_loading_failed(self, e: ValueError | None):
        # Flask hides the reason outside debug mode; an agent needs it to fix its
        # body, and it names only the body's own content (position, constant, depth).
        if e is None:  # get_json() on a body that is not application/json
            raise BadRequest("The body is not application/json.")
        raise BadRequest(f"The body is not valid JSON: {e}") from e


class BodyParser(FlaskParser):
    """webargs (flask-smorest's `@blp.arguments`) reads the body through the app's
    strict parser too: parsed once, cached by Flask, instead of a second, lenient
    `json.loads` of the same bytes that would accept what the first refused."""

    def _raw_load_json(self, req):
        if not is_json_request(req):
            return core.missing
        return req.get_json()
