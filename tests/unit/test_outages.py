"""Outage or bug (dpp.adapters.outages), and the API's answer to each, with no services."""
import psycopg2
import pytest
import redis.exceptions as r
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError
from sqlalchemy import exc as sa

from dpp.adapters.outages import dependency_of
from dpp.api import create_app


class _PgError(Exception):
    def __init__(self, pgcode):
        super().__init__(pgcode)
        self.pgcode = pgcode


def _db(pgcode: str) -> sa.DBAPIError:
    return sa.DBAPIError("SELECT 1", {}, _PgError(pgcode))


def _s3(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize("exc, dependency", [
    (r.ConnectionError("refused"), "redis"),
    (r.TimeoutError("slow"), "redis"),
    (r.BusyLoadingError("loading"), "redis"),
    (r.ReadOnlyError("You can't write against a read only replica."), "redis"),
    (r.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), "redis"),
    (r.ResponseError("OOM command not allowed when used memory > 'maxmemory'."), "redis"),
    (r.ResponseError("MISCONF Redis is configured to save RDB snapshots"), "redis"),
    (r.ClusterDownError("CLUSTERDOWN The cluster is down"), "redis"),
    (r.MovedError("3999 127.0.0.1:6381"), "redis"),
    (sa.OperationalError("SELECT 1", {}, psycopg2.OperationalError("server closed the connection")), "database"),
    (sa.TimeoutError("QueuePool limit of size 5 overflow 5 reached"), "database"),
    (_db("57P01"), "database"),  # admin_shutdown
    (_db("25006"), "database"),  # read_only_sql_transaction
    (_db("53300"), "database"),  # too_many_connections
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), "aws"),
    (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), "aws"),
    (_s3(503, "SlowDown"), "aws"),
    (_s3(500, "InternalError"), "aws"),
])
def test_outages_are_named(exc, dependency):
    assert dependency_of(exc) == dependency


@pytest.mark.parametrize("exc", [
    r.ResponseError("ERR Error running script: attempt to compare nil with number"),
    r.NoScriptError("NOSCRIPT"),
    _db("23505"),  # unique_violation: a bug or a race, not an outage
    _db("23514"),  # check_violation
    sa.IntegrityError("INSERT", {}, _PgError("23505")),
    _s3(403, "AccessDenied"),
    _s3(404, "NoSuchKey"),
    r.RedisClusterException("Keys in request don't hash to the same slot"),  # CROSSSLOT: ours
    r.ResponseError("BUSYKEY Target key name already exists."),
    NoCredentialsError(),
    _db("40P01"),  # deadlock: a bug in our lock order, not an outage
    ValueError("x"),
    KeyError("y"),
])
def test_bugs_are_not_outages(exc):
    assert dependency_of(exc) is None


def test_an_outage_found_only_in_the_cause_is_still_one():
    try:
        try:
            raise r.ConnectionError("refused")
        except r.ConnectionError as inner:
            raise RuntimeError("while authenticating") from inner
    except RuntimeError as outer:
        assert dependency_of(outer) == "redis"


def test_a_bug_raised_while_handling_an_outage_stays_a_bug():
    try:
        try:
            raise r.ConnectionError("refused")
        except r.ConnectionError:
            raise KeyError("a bug in the handler")  # noqa: B904 - the point of the test
    except KeyError as bug:
        assert bug.__context__ is not None and dependency_of(bug) is None


@pytest.mark.parametrize("exc", [
    sa.OperationalError("SELECT 1", {}, psycopg2.OperationalError("could not connect to server")),
    r.ReadOnlyError("READONLY You can't write against a read only replica."),
    EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
])
def test_the_api_answers_an_unhandled_outage_503_with_retry_after(exc):
    app = create_app()

    def broken():
        raise exc

    app.add_url_rule("/broken", "broken", broken)
    resp = app.test_client().get("/broken")
    assert resp.status_code == 503 and resp.mimetype == "application/problem+json"
    assert int(resp.headers["Retry-After"]) > 0
    assert resp.json["type"].endswith("/unavailable") and "nothing was reserved" in resp.json["detail"]
    assert "SELECT" not in resp.get_data(as_text=True)
