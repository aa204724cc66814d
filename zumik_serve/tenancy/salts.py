"""CacheSalts: each tenant's server-side cache salt, what engines mix into their block hashes.

Rule kept here: the salt is derived from a server secret, the tenant and the tenant's salt epoch,
and the epoch is read for every use, because a purge on any gateway moves it on and the cache made
before must be unreachable from then on: ``for_tenant`` reads it; a request reads it with its
release in one round trip (``routing/store.py``) and derives its salt with ``at_epoch``. No epoch
is ever kept. The secret is read once per process.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from zumik_serve.errors import EngineError
from zumik_serve.tenancy.tenant import TenantId, cache_salt


class CacheSalts:
    def __init__(
        self,
        secret: Callable[[], Awaitable[bytes]] | None,
        epoch: Callable[[TenantId], Awaitable[int]] | None = None,
    ) -> None:
        """``secret``: reads the server's cache-salt secret; ``epoch``: a tenant's salt epoch
        (None: always 0, for tests without purges)."""
        self._secret_source = secret
        self._secret: bytes | None = None
        self._epoch = epoch

    async def secret(self) -> bytes:
        if self._secret is None:
            if self._secret_source is None:
                raise EngineError("this gateway has no cache-salt secret configured", status=500)
            self._secret = await self._secret_source()
        return self._secret

    async def for_tenant(self, tenant: TenantId) -> str:
        """The tenant's salt now: its epoch read first."""
        epoch = 0 if self._epoch is None else await self._epoch(tenant)
        return await self.at_epoch(tenant, epoch)

    async def at_epoch(self, tenant: TenantId, epoch: int) -> str:
        """The tenant's salt at ``epoch``, an epoch its caller has just read (never one kept
        from an earlier request)."""
        return cache_salt(await self.secret(), tenant, epoch)
