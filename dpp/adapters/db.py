"""PostgreSQL engine and sessions, one engine per process.

Celery's prefork pool and gunicorn fork after import; an engine (and its
sockets) must never cross a fork, so the engine is keyed by PID.
"""
from __future__ import annotations

import os
import select
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from dpp.config import Settings

_engines: dict[tuple[int, str], Engine] = {}
# Set by `bound_waits`: the server's own statement_timeout (ms) for the engines made
# afterwards, below the client's bound; lock_timeout is three quarters of it.
_server_bound_ms: int | None = None


def engine_for(settings: Settings) -> Engine:
    key = (os.getpid(), settings.database_url)
    engine = _engines.get(key)
    if engine is None:
        kwargs: dict = {"future": True, "pool_pre_ping": True}
        if settings.db_pool == "nullpool":
            # For PgBouncer/Supabase transaction pooling: let the pooler pool.
            kwargs = {"poolclass": NullPool}
        else:
            kwargs.update(pool_size=5, max_overflow=5, pool_timeout=5)
        connect_args = {"connect_timeout": 5, "application_name": "dpp"}
        if _server_bound_ms and settings.db_pool != "nullpool":
            # Startup options: no round trip per transaction. Not through a pooler in
            # transaction mode (nullpool), which refuses them (docs/deploy.md).
            connect_args["options"] = (f"-c lock_timeout={_server_bound_ms * 3 // 4} "
                                       f"-c statement_timeout={_server_bound_ms}")
        engine = create_engine(settings.database_url, connect_args=connect_args, **kwargs)
        _engines[key] = engine
    return engine


def bound_waits(seconds: float) -> None:
    """Make every PostgreSQL wait of this process give up after `seconds` of silence.

    A hung server (SIGSTOPped, a network path that drops packets) still ACKs at
    the TCP level, so neither libpq's connect_timeout (after the handshake) nor
    keepalives notice, and a query on a pooled connection waits for ever: the
    API's request would die with its gunicorn worker at 30 s instead of getting
    its 503. psycopg2's wait callback lets us do the waiting: each wait for the
    socket is bounded, and giving up raises OperationalError, after which
    psycopg2 closes the connection (its "green panic") and SQLAlchemy discards
    it. Process-wide, so the API sets it (a worker's long sweep must not).

    A wait for a lock (a tenant's fence held by a stuck transaction) is silence
    too, but the server would go on waiting after the client gave up, its
    backend queued on the lock. So the engines made from here on also ask the
    server for statement_timeout at 80 % of `seconds` and lock_timeout at 60 %:
    the server gives up first, with SQLSTATE 55P03 / 57014 (an outage: 503).
    """
    import psycopg2
    from psycopg2 import extensions

    global _server_bound_ms
    _server_bound_ms = int(seconds * 800) if seconds > 0 else None

    events = {extensions.POLL_READ: select.POLLIN, extensions.POLL_WRITE: select.POLLOUT}

    def wait(conn) -> None:
        while True:
            state = conn.poll()
            if state == extensions.POLL_OK:
                return
            if state not in events:
                raise psycopg2.OperationalError(f"bad state from poll: {state!r}")
            poller = select.poll()  # not select(): it cannot watch a descriptor >= 1024
            poller.register(conn.fileno(), events[state] | select.POLLERR | select.POLLHUP)
            if not poller.poll(seconds * 1000):
                raise psycopg2.OperationalError(f"PostgreSQL did not answer within {seconds:g} s")

    extensions.set_wait_callback(wait if seconds > 0 else None)


_makers: dict[Engine, sessionmaker] = {}


def _sessions_for(engine: Engine) -> sessionmaker:
    # One sessionmaker per engine: building one creates a Session subclass and
    # sets up its event dispatch, which cost more than a short query (profiled).
    maker = _makers.get(engine)
    if maker is None:
        maker = _makers[engine] = sessionmaker(bind=engine, expire_on_commit=False)
    return maker


class Database:
    def __init__(self, settings: Settings):
        self.settings = settings

    @property
    def engine(self) -> Engine:
        return engine_for(self.settings)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: commit on success, roll back on any exception."""
        session = _sessions_for(self.engine)()
        try:
            with session.begin():
                yield session
        finally:
            session.close()

    @contextmanager
    def snapshot(self) -> Iterator[Session]:
        """A read-only REPEATABLE READ transaction: every statement sees one instant.

        The audit reads the balance row, the transfers and the runs in one of
        these, so it never pairs figures from two moments (false alarms under load).
        """
        session = _sessions_for(self.engine)()
        try:
            with session.begin():
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
                session.execute(text("SET TRANSACTION READ ONLY"))
                yield session
        finally:
            session.close()
