"""Request and response schemas (marshmallow); OpenAPI is generated from them."""
from __future__ import annotations

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from dpp.domain.errors import InvalidMoney
from dpp.domain.money import parse_usd


class Money(fields.Field):
    """A USD amount on the wire: a decimal string, parsed to int micros."""

    def _deserialize(self, value, attr, data, **kwargs):
        try:
            return parse_usd(value)
        except InvalidMoney as exc:
            raise ValidationError(str(exc)) from exc


# The wire form parse_usd accepts (dpp/domain/money.py), for the document.
MONEY_PATTERN = r"^(0|[1-9][0-9]{0,11})(\.[0-9]{1,6})?$"


class RunCreate(Schema):
    class Meta:
        unknown = RAISE

    pack_type = fields.String(required=True, validate=validate.Length(min=1, max=64))
    inputs = fields.Dict(required=True)
    max_cost_usd = Money(required=True, metadata={"type": "string", "pattern": MONEY_PATTERN, "example": "0.50"})

    @validates_schema
    def _storable_text(self, data, **kwargs):
        # PostgreSQL's JSONB refuses U+0000 and UTF-8 cannot encode a lone
        # surrogate: either would fail deep in the submission (as a 500, or a
        # 503 an agent retries forever). Bidi embedding/override/isolate controls
        # make a signed proof read differently from what was signed ("Trojan
        # Source"); right-to-left text itself needs none of them. Refuse all
        # here, where they are a 422.
        for path, text in _strings({"pack_type": data.get("pack_type"), "inputs": data.get("inputs")}):
            if "\x00" in text or not _encodable(text) or not _BIDI_CONTROLS.isdisjoint(text):
                raise ValidationError({path: ["must not contain U+0000, unpaired surrogates or bidi "
                                              "override/isolate controls (U+202A-U+202E, U+2066-U+2069)"]})


_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _strings(value, path: str = ""):
    """Every string in a JSON value, keys included, with its field path."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            if isinstance(key, str):
                yield sub, key
            yield from _strings(item, sub)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}[{i}]")


class RunCreated(Schema):
    run_id = fields.String()
    status = fields.String()
    pack_type = fields.String()
    created_at = fields.String()
    reserved_cost_usd = fields.String()


class RunError(Schema):
    code = fields.String()
    message = fields.String()


class RunView(Schema):
    run_id = fields.String()
    status = fields.String()
    pack_type = fields.String()
    progress = fields.Float()
    reserved_cost_usd = fields.String()
    actual_cost_usd = fields.String(allow_none=True)
    minimum_fee_usd = fields.String()
    created_at = fields.String()
    started_at = fields.String(allow_none=True)
    finished_at = fields.String(allow_none=True)
    error = fields.Nested(RunError, allow_none=True)
    result_url = fields.String(allow_none=True)
    result_url_expires_at = fields.String(allow_none=True)
    result_expires_at = fields.String(allow_none=True, metadata={"description": "End of the plan's retention"})
    trace_id = fields.String()


class RunListArgs(Schema):
    class Meta:
        unknown = RAISE

    status = fields.String(validate=validate.OneOf(["QUEUED", "PROCESSING", "COMPLETED", "FAILED"]))
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    cursor = fields.String(validate=validate.Length(min=1, max=512))


class RunPage(Schema):
    items = fields.List(fields.Nested(RunView))
    next_cursor = fields.String(allow_none=True)


class UsageArgs(Schema):
    class Meta:
        unknown = RAISE

    start_date = fields.Date(required=True, format="%Y-%m-%d")
    end_date = fields.Date(required=True, format="%Y-%m-%d")


class UsageDay(Schema):
    date = fields.String()
    runs_completed = fields.Integer()
    runs_failed = fields.Integer()
    charged_usd = fields.String()
    released_usd = fields.String()


class UsageView(Schema):
    start_date = fields.String()
    end_date = fields.String()
    days = fields.List(fields.Nested(UsageDay))


class LedgerArgs(Schema):
    class Meta:
        unknown = RAISE

    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=100))
    cursor = fields.String(validate=validate.Length(min=1, max=512))


class TransferView(Schema):
    transfer_id = fields.String()
    kind = fields.String()
    debit_account = fields.String()
    credit_account = fields.String()
    amount_usd = fields.String()
    run_id = fields.String(allow_none=True)
    memo = fields.String(allow_none=True)
    created_at = fields.String()


class LedgerPage(Schema):
    items = fields.List(fields.Nested(TransferView))
    next_cursor = fields.String(allow_none=True)


class BalanceView(Schema):
    tenant_id = fields.String()
    available_usd = fields.String()
    held_usd = fields.String()
    spent_usd = fields.String()


class PackView(Schema):
    pack_type = fields.String()
    version = fields.String()
    description = fields.String()
    price = fields.Dict(metadata={"description": "Formula and figures; amounts in USD micros"})
    input_schema = fields.Dict(metadata={"description": "JSON Schema of the pack's inputs"})
    time_limit_sec = fields.Float(metadata={"description": "A run past it is interrupted and ends FAILED "
                                                          "PACK_TIMEOUT at the minimum fee (docs/api.md)"})


class PackList(Schema):
    items = fields.List(fields.Nested(PackView))
