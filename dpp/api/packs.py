"""`/v1/packs`: what can be bought, its inputs and its public price. No key needed."""
from flask.views import MethodView
from flask_smorest import Blueprint

from dpp.api import schemas
from dpp.bootstrap import deps
from dpp.domain.money import format_usd
from dpp.domain.packs.base import time_limits

blp = Blueprint("packs", __name__, url_prefix="/v1/packs", description="The pack catalogue")


@blp.route("")
class Packs(MethodView):
    @blp.response(200, schemas.PackList)
    def get(self):
        """Every pack type: version, description, input JSON Schema and price formula (USD micros)."""
        registry = deps().packs
        items = []
        for pack_type in registry.types():
            pack = registry.get(pack_type)
            price = dict(getattr(pack, "price", {}))
            if "base_micros" in price:
                price["base_usd"] = format_usd(price["base_micros"])
            items.append({
                "pack_type": pack_type,
                "version": pack.version,
                "description": getattr(pack, "description", ""),
                "price": price,
                "input_schema": getattr(pack, "input_schema", {"type": "object"}),
                "time_limit_sec": time_limits(pack)[0],
            })
        return {"items": items}
