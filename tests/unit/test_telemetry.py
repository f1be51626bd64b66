"""The log context and run scopes (dpp/telemetry.py, dpp/logs.py), without services."""
import json
import logging

from dpp import telemetry
from dpp.logs import JsonFormatter, TextFormatter


def record(msg="m", **extra) -> logging.LogRecord:
    rec = logging.makeLogRecord({"msg": msg, "levelname": "INFO", "name": "t"})
    rec.__dict__.update(extra)
    return rec


def test_bound_fields_are_on_every_line_and_a_calls_own_extra_wins():
    with telemetry.bind(run_id="r1", tenant_id="t1"):
        doc = json.loads(JsonFormatter().format(record(tenant_id="t2")))
    assert (doc["run_id"], doc["tenant_id"]) == ("r1", "t2")
    assert "run_id" not in json.loads(JsonFormatter().format(record()))  # unbound after the block


def test_a_sweep_logs_in_the_runs_trace_with_a_span_of_its_own():
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    telemetry.setup_tracing("test")
    with telemetry.run_scope("dpp.sweep_expired_leases", trace_id, "r1", "t1"):
        assert telemetry.current_trace_id() == trace_id
        line = TextFormatter().format(record("lease expired"))
    assert line.endswith(f"[trace_id={trace_id} run_id=r1 tenant_id=t1]")
    assert telemetry.current_trace_id() is None


def test_a_malformed_stored_trace_id_is_logged_and_never_breaks_a_settlement():
    for stored in ("t", "", None, "0" * 32, "XYZ" * 11):
        with telemetry.run_scope("dpp.reconcile_stuck", stored, "r1"):
            doc = json.loads(JsonFormatter().format(record()))
        assert doc["run_id"] == "r1" and doc.get("trace_id") == (stored or None)
