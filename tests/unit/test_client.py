"""dpp.client without a server: a scripted session object stands in for requests.Session."""
from __future__ import annotations

import json
from decimal import Decimal

import pytest
import requests
from requests.structures import CaseInsensitiveDict

from dpp import client as c
from dpp.client import DppClient

BASE = "http://dpp.test"
QUEUED = {
    "run_id": "r-1", "status": "QUEUED", "pack_type": "decision",
    "created_at": "2025-01-02T03:04:05.123456Z", "reserved_cost_usd": "0.50",
}


def run_view(status: str, **extra) -> dict:
    return {
        **QUEUED, "status": status, "progress": 0.5, "actual_cost_usd": None, "minimum_fee_usd": "0.005",
        "started_at": None, "finished_at": None, "error": None, "result_url": None,
        "result_url_expires_at": None, "result_expires_at": None, "trace_id": "tr-1", **extra,
    }


def problem(status: int, slug: str, **extra) -> dict:
    return {"type": f"https://docs.decisionproof.dev/problems/{slug}", "title": slug.title(), "status": status,
            "detail": f"{slug} detail", "instance": "/v1/runs", "trace_id": "tr-9", **extra}


class FakeResponse:
    def __init__(self, status: int, body=None, headers: dict | None = None, text: str | None = None):
        self.status_code = status
        self.headers = CaseInsensitiveDict(headers or {})
        self._body = body
        self.text = text if text is not None else json.dumps(body)
        self.reason = "Fake"

    def json(self):
        if self._body is None:
            raise ValueError("no JSON body")
        return self._body


class FakeSession:
    """requests.Session.request's signature; answers from a script, records every call."""

    def __init__(self, *script):
        self.script = list(script)
        self.calls: list[dict] = []

    def request(self, method, url, *, params=None, json=None, headers=None, timeout=None):
        self.calls.append({"method": method, "url": url, "params": params, "json": json,
                           "headers": dict(headers or {}), "timeout": timeout})
        answer = self.script.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


class FakeClock:
    """monotonic time that only moves when the client sleeps."""

    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def make(session, clock=None, **kwargs) -> tuple[DppClient, FakeClock]:
    clock = clock or FakeClock()
    return DppClient(BASE, "dpp_live_key", session=session, sleep=clock.sleep, clock=clock, **kwargs), clock


# ---- submission and retries


def test_submit_sends_money_as_a_string_with_bearer_key_and_a_generated_idempotency_key():
    session = FakeSession(FakeResponse(201, QUEUED))
    client, _ = make(session)

    run = client.submit("decision", {"q": 1}, "0.50")

    call = session.calls[0]
    assert (call["method"], call["url"]) == ("POST", f"{BASE}/v1/runs")
    assert call["json"] == {"pack_type": "decision", "inputs": {"q": 1}, "max_cost_usd": "0.50"}
    assert call["headers"]["Authorization"] == "Bearer dpp_live_key"
    assert call["headers"]["Idempotency-Key"].startswith("dpp-") and len(call["headers"]["Idempotency-Key"]) == 40
    assert call["timeout"] == 10
    assert run.run_id == "r-1" and run.status == "QUEUED" and run.replayed is False
    assert run.reserved_cost_usd == Decimal("0.50") and isinstance(run.reserved_cost_usd, Decimal)


def test_each_submit_gets_its_own_key():
    session = FakeSession(FakeResponse(201, QUEUED), FakeResponse(201, QUEUED))
    client, _ = make(session)
    client.submit("decision", {}, "0.50")
    client.submit("decision", {}, "0.50")
    first, second = (call["headers"]["Idempotency-Key"] for call in session.calls)
    assert first != second


def test_a_retried_submission_reuses_its_idempotency_key():
    session = FakeSession(
        requests.ConnectionError("reset by peer"),
        requests.ReadTimeout("response lost"),
        FakeResponse(503, problem(503, "unavailable"), {"Retry-After": "2"}),
        FakeResponse(201, QUEUED, {"Idempotent-Replayed": "true"}),
    )
    client, clock = make(session)

    run = client.submit("decision", {"q": 1}, "0.50")

    keys = {call["headers"]["Idempotency-Key"] for call in session.calls}
    assert len(session.calls) == 4 and len(keys) == 1
    assert all(call["json"] == session.calls[0]["json"] for call in session.calls)
    assert run.replayed is True and len(clock.sleeps) == 3


def test_a_given_idempotency_key_is_sent_as_is():
    session = FakeSession(requests.ConnectionError("down"), FakeResponse(201, QUEUED))
    client, _ = make(session)
    client.submit("decision", {}, "0.50", idempotency_key="task-42")
    assert [call["headers"]["Idempotency-Key"] for call in session.calls] == ["task-42", "task-42"]


@pytest.mark.parametrize("status, slug", [(429, "rate-limited"), (503, "unavailable")])
def test_retry_after_is_honoured(status, slug):
    session = FakeSession(
        FakeResponse(status, problem(status, slug), {"Retry-After": "3"}),
        FakeResponse(status, problem(status, slug), {"retry-after": "1"}),
        FakeResponse(201, QUEUED),
    )
    client, clock = make(session)
    client.submit("decision", {}, "0.50")
    assert clock.sleeps == [3.0, 1.0]


def test_a_huge_retry_after_is_capped_at_four_times_backoff_max():
    session = FakeSession(FakeResponse(429, problem(429, "rate-limited"), {"Retry-After": "3600"}),
                          FakeResponse(201, QUEUED))
    client, clock = make(session, backoff_max=8)
    client.submit("decision", {}, "0.50")
    assert clock.sleeps == [32.0]


def test_transport_errors_back_off_exponentially_with_jitter_up_to_the_max():
    failures = [requests.ConnectionError("down")] * 6
    session = FakeSession(*failures, FakeResponse(200, {"available_usd": "1.00", "held_usd": "0.00",
                                                          "spent_usd": "0.00", "tenant_id": "t"}))
    client, clock = make(session, max_retries=6, backoff_base=0.5, backoff_max=4)
    client.balance()
    ceilings = [0.5, 1, 2, 4, 4, 4]  # min(backoff_max, base * 2**attempt)
    assert len(clock.sleeps) == 6
    for slept, ceiling in zip(clock.sleeps, ceilings):
        assert ceiling / 2 <= slept <= ceiling


def test_retries_stop_after_max_retries_with_a_typed_error():
    session = FakeSession(*[FakeResponse(503, problem(503, "unavailable"), {"Retry-After": "1"})] * 3)
    client, clock = make(session, max_retries=2)
    with pytest.raises(c.Unavailable) as caught:
        client.submit("decision", {}, "0.50")
    assert len(session.calls) == 3 and clock.sleeps == [1.0, 1.0]
    assert caught.value.retry_after == 1.0


def test_an_unreachable_api_is_a_connection_error_after_the_retries():
    session = FakeSession(*[requests.ConnectTimeout("no route")] * 3)
    client, clock = make(session, max_retries=2)
    with pytest.raises(c.DppConnectionError):
        client.get("r-1")
    assert len(session.calls) == 3 and len(clock.sleeps) == 2


@pytest.mark.parametrize("status, slug", [(400, "bad-request"), (401, "unauthorized"), (402, "insufficient-budget"),
                                          (404, "not-found"), (409, "idempotency-mismatch"), (422, "validation"),
                                          (500, "internal")])
def test_other_errors_are_not_retried(status, slug):
    session = FakeSession(FakeResponse(status, problem(status, slug)))
    client, clock = make(session)
    with pytest.raises(c.DppApiError):
        client.submit("decision", {}, "0.50")
    assert len(session.calls) == 1 and clock.sleeps == []


# ---- errors


@pytest.mark.parametrize(
    "status, slug, cls",
    [
        (400, "bad-request", c.BadRequest),
        (401, "unauthorized", c.Unauthorized),
        (402, "insufficient-budget", c.InsufficientBudget),
        (403, "forbidden", c.Forbidden),
        (404, "not-found", c.NotFound),
        (409, "idempotency-mismatch", c.IdempotencyConflict),
        (409, "result-not-ready", c.ResultNotReady),
        (409, "something-else", c.DppApiError),
        (410, "result-gone", c.Gone),
        (422, "validation", c.ValidationFailed),
        (422, "plan-limit", c.ValidationFailed),
        (429, "rate-limited", c.RateLimited),
        (503, "unavailable", c.Unavailable),
        (500, "internal", c.DppApiError),
    ],
)
def test_problems_become_typed_errors(status, slug, cls):
    err = c.api_error(status, problem(status, slug))
    assert type(err) is cls and isinstance(err, c.DppApiError)
    assert err.status == status and err.type.endswith(slug) and err.trace_id == "tr-9"
    assert err.title == slug.title() and err.detail == f"{slug} detail"
    assert "tr-9" in str(err) and str(status) in str(err)


def test_insufficient_budget_carries_decimal_amounts():
    session = FakeSession(FakeResponse(402, problem(402, "insufficient-budget", available_usd="9.9942",
                                                    requested_usd="20.00")))
    client, _ = make(session)
    with pytest.raises(c.InsufficientBudget) as caught:
        client.submit("decision", {}, "20.00")
    assert caught.value.available_usd == Decimal("9.9942") and caught.value.requested_usd == Decimal("20.00")
    assert caught.value.problem["requested_usd"] == "20.00"


def test_validation_errors_list_fields_and_rate_limits_carry_retry_after():
    err = c.api_error(422, problem(422, "validation", errors={"inputs.options": ["too few"]}))
    assert err.errors == {"inputs.options": ["too few"]}
    assert c.api_error(422, problem(422, "validation")).errors == {}
    limited = c.api_error(429, problem(429, "rate-limited"), {"Retry-After": "7"})
    assert limited.retry_after == 7.0


def test_a_non_json_error_body_still_becomes_a_typed_error():
    session = FakeSession(FakeResponse(404, None, text="<html>nope</html>"))
    client, _ = make(session)
    with pytest.raises(c.NotFound) as caught:
        client.get("r-x")
    assert caught.value.status == 404 and "nope" in caught.value.detail


# ---- money


def test_run_and_balance_parse_money_as_decimal():
    run = c.Run.from_json(run_view("COMPLETED", actual_cost_usd="0.0058", finished_at="2025-01-02T03:04:06Z"))
    assert run.actual_cost_usd == Decimal("0.0058") and run.minimum_fee_usd == Decimal("0.005")
    assert run.reserved_cost_usd - run.actual_cost_usd == Decimal("0.4942")
    assert run.done and run.finished_at.tzinfo is not None and run.raw["actual_cost_usd"] == "0.0058"

    balance = c.Balance.from_json({"tenant_id": "t", "available_usd": "9.9942", "held_usd": "0.00",
                                   "spent_usd": "0.0058"})
    assert (balance.available_usd, balance.held_usd, balance.spent_usd) == (
        Decimal("9.9942"), Decimal("0"), Decimal("0.0058"))
    assert all(isinstance(v, Decimal) for v in (balance.available_usd, balance.held_usd, balance.spent_usd))


def test_money_arriving_as_a_json_number_is_refused():
    with pytest.raises(TypeError):
        c.Balance.from_json({"available_usd": 9.99, "held_usd": "0.00", "spent_usd": "0.00"})


@pytest.mark.parametrize("amount", [0.5, 1, True, None])
def test_a_float_or_other_non_decimal_cap_is_refused_before_any_request(amount):
    session = FakeSession()
    client, _ = make(session)
    with pytest.raises(TypeError):
        client.submit("decision", {}, amount)
    assert session.calls == []


@pytest.mark.parametrize(
    "amount, wire",
    [(Decimal("0.50"), "0.50"), (Decimal("5"), "5"), (Decimal("1E+1"), "10"), (Decimal("0.000125"), "0.000125"),
     (Decimal("0.5000000"), "0.500000"), (Decimal("-0"), "0"), ("0.50", "0.50")],
)
def test_decimal_caps_are_written_as_plain_strings(amount, wire):
    assert c.format_money(amount) == wire


@pytest.mark.parametrize("amount", [Decimal("0.1234567"), Decimal("-1"), Decimal("NaN"), Decimal("Infinity")])
def test_decimal_caps_that_would_need_rounding_or_are_not_amounts_are_refused(amount):
    with pytest.raises(ValueError):
        c.format_money(amount)


def test_submit_with_a_decimal_cap():
    session = FakeSession(FakeResponse(201, QUEUED))
    client, _ = make(session)
    client.submit("decision", {}, Decimal("0.25"))
    assert session.calls[0]["json"]["max_cost_usd"] == "0.25"


# ---- wait, result, pages


def test_wait_polls_with_doubling_intervals_up_to_poll_max():
    states = ["QUEUED", "PROCESSING", "PROCESSING", "PROCESSING", "PROCESSING", "COMPLETED"]
    session = FakeSession(*[FakeResponse(200, run_view(s)) for s in states])
    client, clock = make(session)

    run = client.wait("r-1", timeout=60, poll_initial=0.2, poll_max=1.0)

    assert run.status == "COMPLETED"
    assert clock.sleeps == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0])
    assert {call["url"] for call in session.calls} == {f"{BASE}/v1/runs/r-1"}


def test_wait_returns_a_failed_run_rather_than_raising():
    session = FakeSession(FakeResponse(200, run_view("FAILED", error={"code": "PACK_ERROR", "message": "x"})))
    client, clock = make(session)
    run = client.wait("r-1")
    assert run.status == "FAILED" and run.error["code"] == "PACK_ERROR" and clock.sleeps == []


def test_wait_times_out_with_the_last_state_seen():
    session = FakeSession(*[FakeResponse(200, run_view("PROCESSING")) for _ in range(20)])
    client, clock = make(session)
    with pytest.raises(c.RunTimeout) as caught:
        client.wait("r-1", timeout=3, poll_initial=0.5, poll_max=1.0)
    assert caught.value.run.status == "PROCESSING" and caught.value.run_id == "r-1"
    # 0.5 + 1 + 1 and then the last 0.5 up to the deadline, one final look, then give up.
    assert clock.sleeps == [0.5, 1.0, 1.0, 0.5] and clock.now == 3.0
    assert len(session.calls) == 5


def test_result_returns_the_envelope():
    envelope = {"envelope_version": "1", "run_id": "r-1", "result": {"recommendation": "Postgres"},
                "actual_cost_usd": "0.0058"}
    session = FakeSession(FakeResponse(200, envelope))
    client, _ = make(session)
    assert client.result("r-1") == envelope
    assert session.calls[0]["url"] == f"{BASE}/v1/runs/r-1/result"


def test_result_before_completion_is_result_not_ready():
    session = FakeSession(FakeResponse(409, problem(409, "result-not-ready")))
    client, _ = make(session)
    with pytest.raises(c.ResultNotReady):
        client.result("r-1")


def test_list_runs_follows_next_cursor_until_the_last_page():
    session = FakeSession(
        FakeResponse(200, {"items": [run_view("COMPLETED", run_id="a"), run_view("FAILED", run_id="b")],
                           "next_cursor": "c1"}),
        FakeResponse(200, {"items": [run_view("COMPLETED", run_id="c")], "next_cursor": None}),
    )
    client, _ = make(session)
    runs = list(client.list_runs(status="COMPLETED", limit=2))
    assert [r.run_id for r in runs] == ["a", "b", "c"]
    assert [call["params"] for call in session.calls] == [
        {"limit": 2, "status": "COMPLETED"}, {"limit": 2, "status": "COMPLETED", "cursor": "c1"}]


def test_ledger_iterates_transfers_with_decimal_amounts():
    transfer = {"transfer_id": "1", "kind": "TOPUP", "debit_account": "world", "credit_account": "available",
                "amount_usd": "10.00", "run_id": None, "memo": None, "created_at": "2025-01-02T03:04:05Z"}
    session = FakeSession(FakeResponse(200, {"items": [transfer], "next_cursor": "x"}),
                          FakeResponse(200, {"items": [{**transfer, "transfer_id": "0"}], "next_cursor": None}))
    client, _ = make(session)
    transfers = list(client.ledger(limit=1))
    assert [t.transfer_id for t in transfers] == ["1", "0"]
    assert transfers[0].amount_usd == Decimal("10.00")
    assert session.calls[1]["params"] == {"limit": 1, "cursor": "x"}


def test_the_client_never_shows_its_key():
    client, _ = make(FakeSession())
    assert "dpp_live_key" not in repr(client)


# ---- CLI registration


def test_register_attaches_submit_and_wait_once():
    import click

    from dpp import client_cli

    group = click.Group("dpp")
    client_cli.register(group)
    client_cli.register(group)
    assert group.commands["submit"] is client_cli.submit and group.commands["wait"] is client_cli.wait
    assert sorted(group.commands) == ["submit", "wait"]


# ---- CLI against the scripted session


@pytest.fixture
def cli(monkeypatch):
    """Runs `dpp submit|wait` with its client talking to a FakeSession."""
    import click
    from click.testing import CliRunner

    from dpp import client_cli

    def run(session, *args, env=None, stdin=None):
        monkeypatch.setattr(client_cli, "DppClient",
                            lambda url, key: DppClient(url, key, session=session, sleep=lambda s: None))
        group = click.Group("dpp")
        client_cli.register(group)
        return CliRunner().invoke(group, list(args), input=stdin, env={"DPP_API_KEY": "dpp_live_key", **(env or {})})

    return run


def test_cli_submit_prints_the_run_as_json(cli):
    session = FakeSession(FakeResponse(201, QUEUED))
    result = cli(session, "submit", "--pack", "decision", "--inputs", '{"q": 1}', "--max-cost", "0.50",
                 "--idempotency-key", "k-1", env={"DPP_API_URL": "http://api.test/"})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == QUEUED
    call = session.calls[0]
    assert call["url"] == "http://api.test/v1/runs" and call["headers"]["Idempotency-Key"] == "k-1"
    assert call["json"]["max_cost_usd"] == "0.50"


def test_cli_reads_inputs_from_a_file_or_stdin(cli, tmp_path):
    (tmp_path / "inputs.json").write_text('{"question": "from a file"}')
    session = FakeSession(FakeResponse(201, QUEUED), FakeResponse(201, QUEUED))
    by_file = cli(session, "submit", "--pack", "decision", "--inputs-file", str(tmp_path / "inputs.json"),
                  "--max-cost", "0.50")
    by_stdin = cli(session, "submit", "--pack", "decision", "--inputs-file", "-", "--max-cost", "0.50",
                   stdin='{"question": "from stdin"}')
    assert by_file.exit_code == by_stdin.exit_code == 0
    assert [call["json"]["inputs"]["question"] for call in session.calls] == ["from a file", "from stdin"]


@pytest.mark.parametrize("final, code", [("COMPLETED", 0), ("FAILED", 1)])
def test_cli_submit_wait_exits_by_outcome(cli, final, code):
    session = FakeSession(FakeResponse(201, QUEUED), FakeResponse(200, run_view("PROCESSING")),
                          FakeResponse(200, run_view(final)))
    result = cli(session, "submit", "--pack", "decision", "--inputs", "{}", "--max-cost", "0.50", "--wait")
    assert result.exit_code == code
    assert json.loads(result.stdout)["status"] == final


def test_cli_errors_exit_2_with_the_problem_on_stderr(cli):
    session = FakeSession(FakeResponse(402, problem(402, "insufficient-budget", available_usd="1.00",
                                                    requested_usd="20.00")))
    result = cli(session, "submit", "--pack", "decision", "--inputs", "{}", "--max-cost", "20.00")
    assert result.exit_code == 2 and result.stdout == ""
    assert "402" in result.stderr and "tr-9" in result.stderr


def test_cli_unreachable_api_tells_the_key_to_retry_with(cli):
    session = FakeSession(*[requests.ConnectionError("down")] * 6)
    result = cli(session, "submit", "--pack", "decision", "--inputs", "{}", "--max-cost", "0.50")
    assert result.exit_code == 2
    key = session.calls[0]["headers"]["Idempotency-Key"]
    assert f"--idempotency-key {key}" in result.stderr


@pytest.mark.parametrize("args", [[], ["--inputs", "[1]"], ["--inputs", "{"]])
def test_cli_refuses_bad_inputs_before_any_request(cli, args):
    session = FakeSession()
    result = cli(session, "submit", "--pack", "decision", "--max-cost", "0.50", *args)
    assert result.exit_code == 2 and session.calls == []


def test_cli_wait_on_an_unknown_run_exits_2(cli):
    result = cli(FakeSession(FakeResponse(404, problem(404, "not-found"))), "wait", "nope")
    assert result.exit_code == 2 and "404" in result.stderr


def test_cli_needs_an_api_key(cli):
    result = cli(FakeSession(), "wait", "r-1", env={"DPP_API_KEY": ""})
    assert result.exit_code == 2 and "API key" in result.stderr
