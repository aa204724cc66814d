"""CacheSalts: each tenant's server-side cache salt, what engines mix into their block hashes.

Rule kept here: the salt is derived from a server secret, the tenant and the tenant's salt epoch,
and the epoch is read on every call, because a purge on any gateway moves it on and the cache made
before must be unreachable from then on. The secret is read once per process.
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
        epoch = 0 if self._epoch is None else await self._epoch(tenant)
        return cache_salt(await self.secret(), tenant, epoch)
