"""Guarantee classes of a purge, ordered weakest first: a claim is a minimum, capped at a ceiling."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class GuaranteeClass(StrEnum):
    """What a purge achieved for one store, ordered by ``rank`` (API.md, Receipts).

    ``revoked`` < ``unindexed`` < ``deleted`` < ``compacted`` < ``crypto_erased``.
    ``provider_expiry`` (a third party keeps the data until its stated retention ends) ranks
    with ``revoked``: we removed nothing we can show, but it says more than ``revoked`` alone.
    The string values are stable: they are written into signed receipts.
    """

    REVOKED = "revoked"
    UNINDEXED = "unindexed"
    DELETED = "deleted"
    COMPACTED = "compacted"
    CRYPTO_ERASED = "crypto_erased"
    PROVIDER_EXPIRY = "provider_expiry"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK: dict[GuaranteeClass, int] = {
    GuaranteeClass.REVOKED: 0,
    GuaranteeClass.UNINDEXED: 1,
    GuaranteeClass.DELETED: 2,
    GuaranteeClass.COMPACTED: 3,
    GuaranteeClass.CRYPTO_ERASED: 4,
    GuaranteeClass.PROVIDER_EXPIRY: 0,
}


def weakest(classes: Iterable[GuaranteeClass]) -> GuaranteeClass:
    """The minimum by rank. On a tie at rank 0 ``provider_expiry`` wins over ``revoked``,
    because it says more (when the provider's copy ends). Raises ValueError when empty."""
    items = list(classes)
    if not items:
        raise ValueError("weakest() of no guarantee classes")
    return min(items, key=lambda cls: (cls.rank, cls is not GuaranteeClass.PROVIDER_EXPIRY))


def capped(cls: GuaranteeClass, ceiling: GuaranteeClass) -> GuaranteeClass:
    """``cls``, or ``ceiling`` where ``cls`` ranks above it: a claim never exceeds the ceiling."""
    return ceiling if cls.rank > ceiling.rank else cls
