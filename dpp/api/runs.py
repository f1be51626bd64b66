"""`/v1/runs`: parse, call a service, map the result. Nothing else."""
from __future__ import annotations

from flask import Response, g, request, url_for
from flask.views import MethodView
from flask_smorest import Blueprint, abort

from dpp.api import schemas
from dpp.api.body import BodyParser
from dpp.api.context import require_principal
from dpp.bootstrap import deps
from dpp.domain.errors import RunNotFound
from dpp.services import runs_query
from dpp.services.submit import Submission, submit_run

blp = Blueprint("runs", __name__, url_prefix="/v1/runs", description="Paid runs of packs")
blp.ARGUMENTS_PARSER = BodyParser()  # before the @blp.arguments below read it

_KEY_CHARS = set(chr(c) for c in range(0x20, 0x7F))  # printable ASCII, space included (SPEC §4)


def _idempotency_key() -> str:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        abort(400, message="The Idempotency-Key header is required.")
    if not (1 <= len(key) <= 255) or not set(key) <= _KEY_CHARS:
        abort(400, message="Idempotency-Key must be 1-255 printable ASCII characters (space included).")
    return key


@blp.before_request
def _before():
    # Order of refusals: who you are (401/403), headers (400), media type (415),
    # the body (400/422); then the service: a replay answers as its first
    # request did, before the rate (429), plan, concurrency and money checks.
    require_principal()
    if request.method == "POST":
        g.idempotency_key = _idempotency_key()
        if not request.is_json:
            abort(415, message="POST /v1/runs takes application/json.")
        request.get_json()  # parsed once here (dpp.api.body: 400 on NaN or deep nesting), cached for the view


@blp.after_request
def _after(response):
    for name, value in (g.get("rate_headers") or {}).items():
        response.headers.setdefault(name, value)
    return response


def _cost_headers(view: dict) -> dict:
    headers = {
        "X-DPP-Cost-Reserved": view["reserved_cost_usd"],
        "X-DPP-Cost-Minimum-Fee": view["minimum_fee_usd"],
    }
    if view.get("actual_cost_usd") is not None:
        headers["X-DPP-Cost-Actual"] = view["actual_cost_usd"]
    return headers


@blp.route("")
class Runs(MethodView):
    @blp.arguments(schemas.RunListArgs, location="query")
    @blp.response(200, schemas.RunPage)
    def get(self, args):
        """The tenant's runs, newest first; `next_cursor` fetches the next page."""
        page = runs_query.list_runs(
            deps(), g.principal.tenant_id, status=args.get("status"), limit=args["limit"], cursor=args.get("cursor")
        )
        return {"items": page.items, "next_cursor": page.next_cursor}

    @blp.arguments(schemas.RunCreate)
    @blp.response(201, schemas.RunCreated)
    def post(self, body):
        """Submit a run; reserves `max_cost_usd` until the run settles."""
        sub = Submission(
            pack_type=body["pack_type"],
            inputs=request.get_json()["inputs"],
            max_cost_micros=body["max_cost_usd"],
            max_cost_text=request.get_json()["max_cost_usd"],
        )
        done = submit_run(deps(), g.principal, g.idempotency_key, sub, g.trace_id)
        g.rate_headers = done.rate_headers
        view = runs_query.view(deps(), done.run)
        created = runs_query.created_body(done.run)
        headers = {"Location": url_for("runs.Run", run_id=created["run_id"]), **_cost_headers(view)}
        if done.replayed:
            headers["Idempotent-Replayed"] = "true"
        return created, 201, headers


@blp.route("/<run_id>")
class Run(MethodView):
    @blp.response(200, schemas.RunView)
    def get(self, run_id):
        """A run's status, costs and, once COMPLETED, a presigned result URL."""
        view = runs_query.get_run(deps(), g.principal.tenant_id, run_id)
        if view is None:
            raise RunNotFound(run_id)
        return view, 200, _cost_headers(view)


@blp.route("/<run_id>/result")
class RunResult(MethodView):
    @blp.response(200, content_type="application/json")
    def get(self, run_id):
        """The stored `pack_envelope.json` of a COMPLETED run, byte for byte."""
        body = runs_query.result(deps(), g.principal.tenant_id, run_id)
        return Response(body, status=200, mimetype="application/json")
