"""ByokKeys: tenants' own provider keys, through a store opened on first use.

The store seals with the BYOK master key the gateway read from its secrets folder at start
(``server_secrets.py``); nothing about the master key is in Redis.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from zumik_serve.providers.store import RedisByokStore


class ByokKeys:
    def __init__(self, open_store: Callable[[], Awaitable[RedisByokStore]]) -> None:
        self._open_store = open_store
        self._store: RedisByokStore | None = None

    async def store(self) -> RedisByokStore:
        if self._store is None:
            self._store = await self._open_store()
        return self._store

    async def get(self, tenant: str, route: str) -> str | None:
        """The tenant's key for ``route``; None when it has none (the route is skipped)."""
        return await (await self.store()).get(tenant, route)
