"""What the state store answers for writes that can end more than one way, as typed values.

Rule kept here: an expected outcome (the session is gone, the Idempotency-Key was used before)
is a value the service matches on, never a tagged string or an exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field


@dataclass(frozen=True, kw_only=True)
class IdempotentEntry:
    """The first write under an Idempotency-Key, kept 24 h: the hash of its request and its
    result. ``result`` is the response body of a create, or the seq of an appended turn (an int).
    In JSON, ``request_hash`` is ``hash``."""

    request_hash: Annotated[str, Field(alias="hash")]
    result: int | dict[str, Any]

    @property
    def purged(self) -> bool:
        """The object this key created was purged: the entry is ``PURGED_ENTRY``, which keeps
        no digest of the request and no handle (``purge/store.py``)."""
        return self.request_hash == "" and self.result == {"purged": True}


# What a purge leaves of an Idempotency-Key whose result named a purged object: a retry gets
# 409 instead of the purged handle made again (under a key, a create's handle is derived from it).
PURGED_ENTRY = '{"hash":"","result":{"purged":true}}'


@dataclass(frozen=True)
class ParentNotLive:
    """A new object was not written: ``handle``, an object it is built on and needs live, was
    missing or revoked by then (a purge revoked it after the request read it)."""

    handle: str


@dataclass(frozen=True)
class HandlePurged:
    """A new object was not written: a purge removed an object of this ``handle`` before (a
    create retried under its Idempotency-Key derives the same handle)."""

    handle: str


@dataclass(frozen=True)
class TurnAppended:
    """The turn was appended as number ``seq`` of the session or branch."""

    seq: int


@dataclass(frozen=True)
class TurnReplayed:
    """Nothing was appended: the Idempotency-Key was used before, by ``first``. It is a replay
    only if ``first.request_hash`` is this request's hash; otherwise the key was reused."""

    first: IdempotentEntry


@dataclass(frozen=True)
class SessionNotLive:
    """Nothing was appended: the session or branch is unknown, revoked, or another tenant's."""


AppendOutcome = TurnAppended | TurnReplayed | SessionNotLive
