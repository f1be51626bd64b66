"""The pack registry: `pack_type` -> pack. Extra packs load from configuration.

`DPP_EXTRA_PACKS=module:Class,...` adds packs (tests add a slow pack this way);
nothing outside the built-ins is registered unless configured.
"""
from __future__ import annotations

import importlib

from dpp.domain.errors import UnknownPackType
from dpp.domain.packs.base import Pack, PackResult, Progress


class PackRegistry:
    def __init__(self, packs: list[Pack] | None = None):
        self._packs: dict[str, Pack] = {}
        for pack in packs or []:
            self.register(pack)

    def register(self, pack: Pack) -> None:
        self._packs[pack.pack_type] = pack

    def get(self, pack_type: str) -> Pack:
        try:
            return self._packs[pack_type]
        except KeyError:
            raise UnknownPackType(pack_type) from None

    def types(self) -> list[str]:
        return sorted(self._packs)


def builtin_registry(extra: tuple[str, ...] = (), url_fetcher=None, url_allowlist: tuple[str, ...] = ()) -> PackRegistry:
    """The built-ins; `url` only with a fetcher, which the adapters provide (bootstrap)."""
    from dpp.domain.packs.decision import DecisionPack
    from dpp.domain.packs.url import AddressPolicy, UrlPack

    registry = PackRegistry([DecisionPack()])
    if url_fetcher is not None:
        registry.register(UrlPack(url_fetcher, AddressPolicy.from_cidrs(url_allowlist)))
    for spec in extra:
        module_name, _, attr = spec.partition(":")
        registry.register(getattr(importlib.import_module(module_name), attr)())
    return registry


__all__ = ["Pack", "PackRegistry", "PackResult", "Progress", "builtin_registry"]
