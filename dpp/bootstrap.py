"""Wire the adapters into the services, once per process.

Entrypoints call `deps()`; tests build their own `Deps` with other settings.
Nothing here connects at import: clients connect lazily on first use.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

from dpp.config import Settings, get_settings
from dpp.domain.packs import PackRegistry, builtin_registry


@dataclass
class Deps:
    settings: Settings

    @cached_property
    def db(self):
        from dpp.adapters.db import Database

        return Database(self.settings)

    @cached_property
    def budget(self):
        from dpp.adapters.budget import RedisBudget

        return RedisBudget.from_url(self.settings.redis_url, cluster=self.settings.redis_cluster)

    @cached_property
    def rate_limiter(self):
        from dpp.adapters.ratelimit import RedisRateLimiter

        return RedisRateLimiter(self.budget.client)

    @cached_property
    def results(self):
        from dpp.adapters.results import S3Results

        return S3Results(self.settings)

    @cached_property
    def sqs(self):
        from dpp.adapters.sqs import SqsAdmin

        return SqsAdmin(self.settings)

    @cached_property
    def queue(self):
        from dpp.adapters.queue import CeleryQueue
        from dpp.celery import app

        return CeleryQueue(app)

    @cached_property
    def packs(self) -> PackRegistry:
        from dpp.adapters.fetcher import HttpFetcher

        return builtin_registry(self.settings.extra_packs, url_fetcher=HttpFetcher(),
                                url_allowlist=self.settings.url_allowlist)


_deps: tuple[int, Deps] | None = None


def deps() -> Deps:
    """The process's dependencies; rebuilt after a fork so no socket is shared."""
    global _deps
    if _deps is None or _deps[0] != os.getpid():
        settings = get_settings()
        settings.check_production()
        _deps = (os.getpid(), Deps(settings))
    return _deps[1]
