"""ByokKeys: tenants' own provider keys, through a store opened on first use.

Opening the store loads (or creates) the BYOK master key, a Redis round trip a gateway that
never serves a BYOK route should not pay at start.
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
