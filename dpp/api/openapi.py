"""Make /openapi.json tell the truth about errors, auth and headers.

flask-smorest documents what the view decorators declare: the success response, a 422
for `@blp.arguments`, and a `default` response with its own `Error` schema served as
`application/json`. None of that is what DPP answers on error: every error is an RFC 9457
`application/problem+json` body built in `dpp.api.errors`, and each operation can
answer a known set of statuses (docs/api.md, SPEC §4). `document_errors(api)`, called once
after the blueprints are registered, rewrites the generated operations so that:

- each `/v1` operation lists exactly the error statuses it can return, each with a
  `Problem` body (`status` fixed to the response's code) and the headers that go with it
  (`WWW-Authenticate` on 401, `Retry-After` on 429 and 503, RateLimit headers on 429);
- flask-smorest's `default` response, its `UNPROCESSABLE_ENTITY`/`DEFAULT_ERROR`
  components and its `Error` schema are gone, so nothing contradicts the above;
- the operations require the `bearerAuth` security scheme (`Authorization: Bearer <key>`);
- `POST /v1/runs` declares its required `Idempotency-Key` header, a request example, and
  its response headers (`Location`, the cost headers; `RateLimit`, `RateLimit-Policy`
  and `Idempotent-Replayed` when they apply); `GET /v1/runs/{run_id}` its cost headers;
- every response declares `X-Trace-Id` (set on every response by `dpp.api.context`).

The e2e test `tests/e2e/test_openapi_schemathesis.py` holds the server to this document.
"""
from __future__ import annotations

from copy import deepcopy

from dpp.api.errors import PROBLEM_JSON, TYPE_BASE

PROBLEM = "Problem"
SECURITY_SCHEME = "bearerAuth"

_MONEY = {"type": "string", "pattern": r"^[0-9]+\.[0-9]{2,6}$"}
_TRACE_ID = {"type": "string", "pattern": "^[0-9a-f]{32}$"}

PROBLEM_SCHEMA = {
    "type": "object",
    "description": "RFC 9457 problem details. Every error DPP returns has this shape.",
    "required": ["type", "title", "status", "detail", "instance", "trace_id"],
    "properties": {
        "type": {"type": "string", "format": "uri", "description": f"`{TYPE_BASE}<slug>`"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "instance": {"type": "string", "description": "The request path."},
        "trace_id": {**_TRACE_ID, "description": "Quote it when reporting a problem; also in `X-Trace-Id`."},
        "errors": {
            "type": "object",
            "description": "Validation errors: field name or path -> messages.",
            "additionalProperties": {"type": "array", "items": {"type": "string"}},
        },
        "available_usd": {**_MONEY, "description": "402 only: the tenant's available budget."},
        "requested_usd": {**_MONEY, "description": "402 only: the `max_cost_usd` asked for."},
    },
}

# --- headers ----------------------------------------------------------------------------

_HEADERS = {
    "X-Trace-Id": ({**_TRACE_ID}, "The request's trace id (from `traceparent` when given)."),
    "WWW-Authenticate": ({"type": "string"}, 'Always `Bearer realm="dpp"`.'),
    "Retry-After": ({"type": "integer", "minimum": 0}, "Seconds to wait before retrying."),
    "RateLimit-Policy": ({"type": "string"}, 'IETF RateLimit policy, e.g. `"post-runs";q=600;w=60`.'),
    "RateLimit": ({"type": "string"}, 'IETF RateLimit state, e.g. `"post-runs";r=599;t=42`.'),
    "Location": ({"type": "string", "format": "uri-reference"}, "The new run: `/v1/runs/{run_id}`."),
    "Idempotent-Replayed": ({"type": "string", "enum": ["true"]}, "Present on a replay of an earlier submission."),
    "X-DPP-Cost-Reserved": (_MONEY, "USD reserved for the run (its `max_cost_usd`)."),
    "X-DPP-Cost-Minimum-Fee": (_MONEY, "USD charged if the run fails after it started (capped at the reservation)."),
    "X-DPP-Cost-Actual": (_MONEY, "USD charged; present once the run has settled."),
}


def _header(name: str, required: bool) -> dict:
    schema, description = _HEADERS[name]
    return {"description": description, "required": required, "schema": deepcopy(schema)}


def _headers(required=(), optional=()) -> dict:
    out = {"X-Trace-Id": _header("X-Trace-Id", True)}
    out.update({name: _header(name, True) for name in required})
    out.update({name: _header(name, False) for name in optional})
    return out


# --- error responses --------------------------------------------------------------------

# status -> (description, extra required Problem members, required headers, optional headers)
_ERRORS: dict[int, tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    400: ("Malformed request: missing or invalid `Idempotency-Key`, unreadable JSON, or a "
          "pagination cursor this server did not hand out.", (), (), ()),
    401: ("Missing, malformed or unknown API key.", (), ("WWW-Authenticate",), ()),
    402: ("The available budget is below `max_cost_usd`.", ("available_usd", "requested_usd"), (), ()),
    403: ("Revoked key, suspended tenant, or pack type not in the plan.", (), (), ()),
    404: ("No such run (another tenant's run is reported the same way).", (), (), ()),
    409: ("Conflict.", (), (), ()),
    410: ("The result is past the plan's retention and was deleted.", (), (), ()),
    413: ("The request body is larger than 256 KiB.", (), (), ()),
    415: ("The body is not `application/json`.", (), (), ()),
    422: ("Validation failed; `errors` lists each field.", ("errors",), (), ()),
    429: ("Too many submissions per minute, or too many runs in flight.",
          (), ("Retry-After",), ("RateLimit", "RateLimit-Policy")),
    500: ("Unexpected error; nothing internal is disclosed, quote the `trace_id`.", (), (), ()),
    503: ("A dependency (PostgreSQL, Redis, the queue) is unavailable; nothing was reserved.",
          (), ("Retry-After",), ()),
}

_AUTH_ERRORS = (401, 403)
_ALWAYS = (500, 503)

# (path, method) -> error statuses it can return, besides _AUTH_ERRORS and _ALWAYS.
OPERATION_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("/v1/runs", "post"): (400, 402, 409, 413, 415, 422, 429),
    ("/v1/runs", "get"): (400, 422),
    ("/v1/runs/{run_id}", "get"): (404,),
    ("/v1/runs/{run_id}/result", "get"): (404, 409, 410),
    ("/v1/balance", "get"): (),
    ("/v1/usage", "get"): (422,),
    ("/v1/ledger", "get"): (400, 422),
}

_CONFLICT = {
    ("/v1/runs", "post"): "The `Idempotency-Key` was used before with a different payload.",
    ("/v1/runs/{run_id}/result", "get"): "The run has no stored result: it is not COMPLETED.",
}


def _response_name(status: int) -> str:
    return f"Problem{status}"


def _error_response(status: int) -> dict:
    description, members, required, optional = _ERRORS[status]
    schema: dict = {
        "allOf": [
            {"$ref": f"#/components/schemas/{PROBLEM}"},
            {"properties": {"status": {"const": status}}, **({"required": list(members)} if members else {})},
        ]
    }
    return {
        "description": description,
        "headers": _headers(required, optional),
        "content": {PROBLEM_JSON: {"schema": schema}},
    }


# --- success responses and parameters --------------------------------------------------

_SUCCESS_HEADERS = {
    ("/v1/runs", "post"): dict(
        # RateLimit headers come with a submission that was counted; a replay is not
        # counted (docs/api.md), so it answers without them.
        required=("Location", "X-DPP-Cost-Reserved", "X-DPP-Cost-Minimum-Fee"),
        optional=("X-DPP-Cost-Actual", "Idempotent-Replayed", "RateLimit", "RateLimit-Policy"),
    ),
    ("/v1/runs/{run_id}", "get"): dict(
        required=("X-DPP-Cost-Reserved", "X-DPP-Cost-Minimum-Fee"),
        optional=("X-DPP-Cost-Actual",),
    ),
}

IDEMPOTENCY_KEY = {
    "in": "header",
    "name": "Idempotency-Key",
    "required": True,
    "description": "1-255 printable ASCII characters, spaces included (not at either end: HTTP trims a "
                   "header value). The same key with the same payload replays the original answer, before "
                   "any limit or budget check; with another payload it is a 409.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]([ -~]*[!-~])?$"},
}

RUN_EXAMPLE = {
    "pack_type": "decision",
    "inputs": {
        "question": "Which database?",
        "options": ["Postgres", "MySQL"],
        "criteria": [{"name": "cost", "weight": 1, "direction": "min"}, {"name": "features", "weight": 2}],
        "scores": {"Postgres": {"cost": 1, "features": 9}, "MySQL": {"cost": 1, "features": 7}},
    },
    "max_cost_usd": "0.50",
}


_METHODS = frozenset({"get", "put", "post", "delete", "patch", "head", "options"})
# Operations anyone may call: no key, so no 401/403 and no security requirement.
PUBLIC = frozenset({("/v1/packs", "get")})


def _is_error(status: str) -> bool:
    return status == "default" or status[:1] in ("4", "5")


def _ref(path: str, method: str) -> str:
    return "#/paths/" + path.replace("~", "~0").replace("/", "~1") + "/" + method


_RUN_ID = {"run_id": "$response.body#/run_id"}
# OpenAPI links: where a response's values lead (clients follow them; schemathesis'
# stateful phase chains calls through them).
LINKS = {
    ("/v1/runs", "post", "201"): {
        "GetRun": {"operationRef": _ref("/v1/runs/{run_id}", "get"), "parameters": _RUN_ID,
                   "description": "The run just created, to poll."},
        "GetResult": {"operationRef": _ref("/v1/runs/{run_id}/result", "get"), "parameters": _RUN_ID,
                      "description": "Its stored envelope, once COMPLETED."},
    },
    ("/v1/runs", "get", "200"): {
        "NextPage": {"operationRef": _ref("/v1/runs", "get"),
                     "parameters": {"cursor": "$response.body#/next_cursor"},
                     "description": "The next page, while `next_cursor` is not null."},
    },
    ("/v1/ledger", "get", "200"): {
        "NextPage": {"operationRef": _ref("/v1/ledger", "get"),
                     "parameters": {"cursor": "$response.body#/next_cursor"},
                     "description": "The next page, while `next_cursor` is not null."},
    },
}


def document_errors(api, pack_types: list[str] | None = None) -> None:
    """Rewrite the generated document; call once, after every blueprint is registered.

    `pack_types`: the packs this server runs, the only `pack_type` values a
    submission may name (an enum, so clients and fuzzers know them)."""
    spec = api.spec
    components = spec.components
    if pack_types:
        components.schemas["RunCreate"]["properties"]["pack_type"]["enum"] = list(pack_types)
    components.schema(PROBLEM, component=PROBLEM_SCHEMA)
    components.security_scheme(SECURITY_SCHEME, {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "dpp_live_<32 base62>_<8 checksum>",
        "description": "An API key; a bad or missing key is a 401, a revoked one a 403.",
    })
    used: set[int] = set()
    # apispec keeps the path items it generated in `_paths` (what `to_dict()` serves).
    for path, item in spec._paths.items():
        for method, operation in item.items():
            if method not in _METHODS or not path.startswith("/v1/"):
                continue
            responses = operation.setdefault("responses", {})
            declared = {str(s) for s in responses}
            extra = OPERATION_ERRORS.get((path, method))
            if extra is None:  # an operation this table does not know yet: what smorest knew
                extra = (422,) if "422" in declared else ()
            for status in [s for s in responses if _is_error(str(s))]:
                del responses[status]  # smorest's default/422 with its application/json Error
            for status, response in responses.items():
                response["headers"] = _headers(**_SUCCESS_HEADERS.get((path, method), {}))
                if (path, method) == ("/v1/runs/{run_id}/result", "get") and "content" not in response:
                    response["content"] = {"application/json": {"schema": {
                        "type": "object", "description": "The run's `pack_envelope.json`, byte for byte."}}}
            public = (path, method) in PUBLIC
            statuses = sorted({*(() if public else _AUTH_ERRORS), *_ALWAYS, *extra})
            for status in statuses:
                if status == 409:  # its meaning differs per operation: inline, with its own description
                    description = _CONFLICT.get((path, method), "Conflict.")
                    responses["409"] = {**_error_response(409), "description": description}
                else:
                    responses[str(status)] = {"$ref": f"#/components/responses/{_response_name(status)}"}
                    used.add(status)
            operation["security"] = [] if public else [{SECURITY_SCHEME: []}]
            for status, response in responses.items():
                links = LINKS.get((path, method, str(status)))
                if links and isinstance(response, dict):
                    response["links"] = deepcopy(links)
            if (path, method) == ("/v1/runs", "post"):
                params = operation.setdefault("parameters", [])
                if not any(p.get("name") == "Idempotency-Key" for p in params if isinstance(p, dict)):
                    params.append(deepcopy(IDEMPOTENCY_KEY))
                media = operation.get("requestBody", {}).get("content", {}).get("application/json")
                if media is not None:
                    media["examples"] = {"decision": {"summary": "A decision run", "value": deepcopy(RUN_EXAMPLE)}}
    for status in sorted(used):
        components.response(_response_name(status), _error_response(status))
    # Nothing refers to flask-smorest's own error responses and schema any more.
    for name in ("DEFAULT_ERROR", "UNPROCESSABLE_ENTITY"):
        components.responses.pop(name, None)
    components.schemas.pop("Error", None)
