"""`/v1/balance`: the tenant's ledger balances."""
from flask import g
from flask.views import MethodView
from flask_smorest import Blueprint

from dpp.api import schemas
from dpp.api.context import require_principal
from dpp.bootstrap import deps
from dpp.services import runs_query

blp = Blueprint("balance", __name__, url_prefix="/v1/balance", description="Prepaid budget")
blp.before_request(require_principal)


@blp.route("")
class Balance(MethodView):
    @blp.response(200, schemas.BalanceView)
    def get(self):
        """Available, held (reserved by runs in flight) and spent, from the ledger."""
        return runs_query.balance(deps(), g.principal.tenant_id)
