"""Which infrastructure errors mean "a dependency is out", and which one.

An outage is answered 503 with Retry-After (SPEC §4): the request did nothing
that stays, and the same request later may succeed. A bug (a constraint broken,
a script error, a type error) is not an outage and stays a 500. Only the
adapters know the drivers' exception types; the API asks `dependency_of`.
"""
from __future__ import annotations

import redis.exceptions as redis_errors
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from sqlalchemy import exc as sa_errors

from dpp.domain.errors import DependencyUnavailable

# Redis: unreachable, slow, loading, a replica (READONLY), out of memory, a
# failover or resharding in progress (cluster errors, MOVED to a node we cannot reach).
_REDIS_OUTAGES = (
    redis_errors.ConnectionError,  # includes BusyLoadingError
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.OutOfMemoryError,
    redis_errors.MasterDownError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
    redis_errors.ClusterError,
    redis_errors.SlotNotCoveredError,
    redis_errors.MovedError,
    redis_errors.AskError,
    redis_errors.MaxConnectionsError,
)
# Not RedisClusterException: redis-py raises it client-side for keys of several
# slots in one call (CROSSSLOT), a bug that no retry mends.
# Replies redis-py does not map to a class of its own (older servers, proxies);
# "BUSY " with its space: BUSYKEY is a bug, a busy script is not.
_REDIS_OUTAGE_PREFIXES = ("OOM ", "READONLY ", "LOADING ", "MASTERDOWN ", "CLUSTERDOWN ", "TRYAGAIN ", "MISCONF ",
                          "NOREPLICAS ", "BUSY ")

# PostgreSQL SQLSTATE classes and codes that say "not now", not "never".
_PG_OUTAGE_CLASSES = ("08", "53", "57")  # connection, insufficient resources, operator intervention
_PG_OUTAGE_CODES = {"25006", "55P03", "57014"}  # read-only transaction, lock not available, query canceled

_AWS_RETRYABLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable",
                        "InternalError", "RequestThrottled", "TooManyRequestsException"}


def redis_outage(exc: BaseException) -> bool:
    if isinstance(exc, _REDIS_OUTAGES):
        return True
    return isinstance(exc, redis_errors.ResponseError) and str(exc).startswith(_REDIS_OUTAGE_PREFIXES)


def raise_if_outage(exc: BaseException) -> None:
    """In an adapter's `except redis.RedisError`: an outage becomes DependencyUnavailable
    (503, "nothing was reserved"); anything else is re-raised by the caller as it is."""
    if redis_outage(exc):
        raise DependencyUnavailable("redis", str(exc)) from exc


def database_outage(exc: BaseException) -> bool:
    if isinstance(exc, (sa_errors.OperationalError, sa_errors.InterfaceError, sa_errors.TimeoutError,
                        sa_errors.DisconnectionError)):
        return True
    if isinstance(exc, sa_errors.DBAPIError):
        if exc.connection_invalidated:
            return True
        code = getattr(exc.orig, "pgcode", None) or ""
        return code[:2] in _PG_OUTAGE_CLASSES or code in _PG_OUTAGE_CODES
    return False


def aws_outage(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or error.get("Code") in _AWS_RETRYABLE_CODES
    # No answer at all (connect, read, a closed connection); not the BotoCoreErrors
    # that are our own configuration (no credentials, no region, bad parameters).
    return isinstance(exc, (BotoConnectionError, HTTPClientError))


def dependency_of(exc: BaseException) -> str | None:
    """"redis", "database" or "aws" if `exc` is an outage, or was raised from one
    (`raise … from`, explicitly): an error merely raised while handling an outage
    may be a bug of its own, and stays a 500 with its traceback logged."""
    seen = 0
    while exc is not None and seen < 5:
        if redis_outage(exc):
            return "redis"
        if database_outage(exc):
            return "database"
        if aws_outage(exc):
            return "aws"
        exc, seen = exc.__cause__, seen + 1
    return None
