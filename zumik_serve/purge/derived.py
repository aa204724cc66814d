"""Stores outside the state objects that hold what derives from a target's content, and their
receipt lines.

    provider:<route>   a managed or BYOK provider the content was sent to (``routing/reach.py``):
                       nothing of ours removes its copy; ``provider_expiry`` until the route's
                       retention ends (``expires_at``)
    decision_records   routing decisions whose prompt carried the content (a salted prompt
                       digest, token counts): removed; the class of Redis when compacted after
    reuse_index        the opportunity index of the purged cache scopes (salted prefix-block
                       hashes), removed by the ``keys`` step: the class of Redis

The reuse ledger holds counts per snapshot handle (requests, tokens), no derivative of content,
so it has no line. A line appears only where the store held something for the target, so a
purge that reached none of these signs what it signed before they existed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from zumik_serve.purge.classes import GuaranteeClass
from zumik_serve.purge.receipt import StoreEntry, StoreResult
from zumik_serve.routing.reach import ProviderReach

PROVIDER_ACTION = "sent; kept by the provider until its retention ends"


class RoutingTraces(Protocol):
    """What routing keeps of a state object's content (``routing/store.py``)."""

    async def reached(self, tenant: str, handles: Sequence[str]) -> list[ProviderReach]: ...

    async def forget_reach(self, tenant: str, handles: Sequence[str]) -> None: ...

    async def forget_decisions(self, tenant: str, handles: Sequence[str]) -> int: ...


def provider_entries(reached: Sequence[ProviderReach]) -> list[StoreEntry]:
    """One ``provider_expiry`` line per provider route the content reached, by route name."""
    return [
        StoreEntry(
            store=f"provider:{reach.route}",
            action=PROVIDER_ACTION,
            result=StoreResult.DONE,
            guarantee_class=GuaranteeClass.PROVIDER_EXPIRY,
            detail=(
                f"{reach.kind} route; content last sent {_utc(reach.last_sent_at_s)}; the provider "
                f"keeps inputs and outputs up to {reach.retention_days} days (the route's retention_days)"
            ),
            expires_at=reach.expires_at_s,
        )
        for reach in sorted(reached, key=lambda reach: reach.route)
    ]


def decision_entry(removed: int, redis_class: GuaranteeClass, *, compacted_after: bool) -> StoreEntry | None:
    """The decision records' line: None when none held the content. Their removal reaches the
    class of Redis only when Redis was compacted after it (else ``deleted``)."""
    if removed == 0:
        return None
    cls = redis_class if compacted_after else GuaranteeClass.DELETED
    return StoreEntry(
        "decision_records", "unlink", StoreResult.DONE, cls,
        f"{removed} decision records whose prompt carried the content (salted prompt digest, "
        "token counts) removed",
    )  # fmt: skip


def reuse_index_entry(redis_class: GuaranteeClass) -> StoreEntry:
    """The opportunity index's line, for a purge whose ``keys`` step removed its scopes."""
    return StoreEntry(
        "reuse_index", "unlink_scope", StoreResult.DONE, redis_class,
        "salted prefix-block hashes of the purged cache scopes removed",
    )  # fmt: skip


def _utc(unix_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_s))
