"""Provider reach: which third-party provider a state object's content was sent to, and when.

A request whose content comes from a purgeable object (its snapshot, its session, a Responses
chain's session) and goes to a managed or BYOK route is recorded BEFORE it is sent, once per
route: ``routing/store.py`` keeps, per object, the route, its kind, the retention the profile
states for it and the last time content went there. A purge reads what every object of its
closure reached and gives each provider a ``provider_expiry`` line in the receipt: the provider
keeps its copy until ``expires_at_s``, which no purge of ours can shorten.

Every send to a provider is also recorded under the tenant itself (any request's content, with
objects or none), so the receipt of a tenant's deletion names every provider it reached.

Recording refuses an object that is revoked or gone, atomically with the check: a purge revokes
first and reads the reach after, so every send either is in the receipt or never happened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

DAY_S = 86_400


@dataclass(frozen=True)
class ProviderReach:
    """Content reached provider route ``route`` (``kind``: "managed" or "byok"); the last send was
    at ``last_sent_at_s`` (unix seconds) and the provider keeps what it is sent for
    ``retention_days`` (the route's ``retention_days`` when sent)."""

    route: str
    kind: str
    retention_days: int
    last_sent_at_s: int

    @property
    def expires_at_s(self) -> int:
        """When the provider's copy of the last send ends (unix seconds)."""
        return self.last_sent_at_s + self.retention_days * DAY_S

    def merged(self, other: ProviderReach) -> ProviderReach:
        """One line for one route reached through several objects: the latest expiry wins."""
        return self if self.expires_at_s >= other.expires_at_s else other


class ReachSink(Protocol):
    async def sent(self, tenant: str, sources: tuple[str, ...], reach: ProviderReach) -> None:
        """Record that content of ``sources`` goes to ``reach.route`` now. Raises
        ``NotFoundError`` (naming the object) when one of them is revoked or gone: nothing is
        recorded and the caller must not send."""
        ...
