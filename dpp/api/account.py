"""`/v1/balance`, `/v1/usage`, `/v1/ledger`: what the tenant has, used and moved."""
from flask import g
from flask.views import MethodView
from flask_smorest import Blueprint, abort

from dpp.api import schemas
from dpp.api.context import require_principal
from dpp.bootstrap import deps
from dpp.services import runs_query
from dpp.services.runs_query import MAX_USAGE_DAYS

blp = Blueprint("account", __name__, url_prefix="/v1", description="Prepaid budget, usage and statement")
blp.before_request(require_principal)


@blp.route("/balance")
class Balance(MethodView):
    @blp.response(200, schemas.BalanceView)
    def get(self):
        """Available, held (reserved by runs in flight) and spent, from the ledger."""
        return runs_query.balance(deps(), g.principal.tenant_id)


@blp.route("/usage")
class Usage(MethodView):
    @blp.arguments(schemas.UsageArgs, location="query")
    @blp.response(200, schemas.UsageView)
    def get(self, args):
        """Daily rows between two dates (inclusive, UTC): runs by outcome, charged, released."""
        start, end = args["start_date"], args["end_date"]
        if end < start:
            abort(422, messages={"query": {"end_date": ["must not be before start_date"]}})
        if (end - start).days >= MAX_USAGE_DAYS:
            abort(422, messages={"query": {"end_date": [f"the range may span at most {MAX_USAGE_DAYS} days"]}})
        days = runs_query.usage(deps(), g.principal.tenant_id, start, end)
        return {"start_date": start.isoformat(), "end_date": end.isoformat(), "days": days}


@blp.route("/ledger")
class Ledger(MethodView):
    @blp.arguments(schemas.LedgerArgs, location="query")
    @blp.response(200, schemas.LedgerPage)
    def get(self, args):
        """The tenant's statement: every transfer, newest first."""
        page = runs_query.statement(deps(), g.principal.tenant_id, limit=args["limit"], cursor=args.get("cursor"))
        return {"items": page.items, "next_cursor": page.next_cursor}
