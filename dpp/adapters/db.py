"""PostgreSQL engine and sessions, one engine per process.

Celery's prefork pool and gunicorn fork after import; an engine (and its
sockets) must never cross a fork, so the engine is keyed by PID.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from dpp.config import Settings

_engines: dict[tuple[int, str], Engine] = {}


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
        engine = create_engine(
            settings.database_url,
            connect_args={"connect_timeout": 5, "application_name": "dpp"},
            **kwargs,
        )
        _engines[key] = engine
    return engine


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
