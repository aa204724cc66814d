"""A purge job: its steps, what each step saved, and where the job stands.

A job is a frozen value; running a step gives a new job with that step's result, which
``purge/store.py`` saves (as JSON, through a pydantic ``TypeAdapter``) before the next step
starts. The JSON form is the one the first version wrote, so jobs it left unfinished still load:

    {"id", "target", "status", "created_at", "done": [step, ...], "error",
     "closure", "exposed",                      <- revoke
     "old_epoch",                               <- rotate (saved before it rotates)
     "scopes",                                  <- keys
     "entries": {"kv_engine": <store entry>,    <- rotate
                 "kv_host" | "kv_redis" | "kv_disk": {"removed_blocks",     <- tiers
                                                      "nodes": [{"node_id", "hostname",
                                                        "removed_blocks", "remaining_blocks",
                                                        "reason"}]}},  (nodes: kv_host, kv_disk)
     "removed_keys",                            <- objects
     "providers": [{"route", "kind", "retention_days", "last_sent_at_s"}],   <- providers
     "decisions_removed",                       <- decisions
     "compaction": {"done", "detail"}}          <- compact

A step's result is absent (``None`` here) until that step has run; ``error`` is absent (or null,
as the first version wrote it) while nothing failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import NewType, TypeVar

from pydantic import ConfigDict

from zumik_serve.purge.nodes import NodeTierSweep
from zumik_serve.purge.receipt import StoreEntry
from zumik_serve.routing.reach import ProviderReach

PurgeId = NewType("PurgeId", str)  # ``prg_…``: the job's id and its receipt's id
T = TypeVar("T")

_CONFIG = ConfigDict(extra="forbid")  # a stored job holds nothing this module does not name


class PurgeStep(StrEnum):
    """The steps of a purge, in the order they run (``PurgeService`` holds their table).

    The values are stable: they are stored in jobs (``done``) and shown in the 202 answer
    (``steps_done``)."""

    REVOKE = "revoke"
    ROTATE = "rotate"
    KEYS = "keys"
    TIERS = "tiers"
    OBJECTS = "objects"
    PROVIDERS = "providers"
    DECISIONS = "decisions"
    COMPACT = "compact"
    RECEIPT = "receipt"


class PurgeStatus(StrEnum):
    """``running``: claimed, between steps. ``incomplete``: a step failed; the job stays pending
    and the same request (or the next start) resumes it. ``done``: the receipt is signed."""

    RUNNING = "running"
    INCOMPLETE = "incomplete"
    DONE = "done"


class PurgeJobError(RuntimeError):
    """A job says a step is done but lacks what that step saves: the stored job is damaged."""


@dataclass(frozen=True)
class TierSweep:
    """What the tiers step removed from one tier: blocks over both sweeps (on every node, for a
    node tier). ``nodes``: a node tier's result on each node (``purge/nodes.py``); None for the
    Redis tier, and in jobs saved before nodes were swept one by one (their receipts list none)."""

    __pydantic_config__ = _CONFIG

    removed_blocks: int
    nodes: tuple[NodeTierSweep, ...] | None = None


@dataclass(frozen=True)
class Compaction:
    """What the compact step reached: ``done`` only when Redis' files were rewritten (and, where
    the AOF folder is visible, only the new files remain); ``detail`` says what happened."""

    __pydantic_config__ = _CONFIG

    done: bool
    detail: str


@dataclass(frozen=True)
class KvResults:
    """The KV steps' results (stored under ``entries``). ``kv_engine``: the rotate step's receipt
    line; ``kv_host``, ``kv_redis``, ``kv_disk``: the tiers the sweep found. None: not reached, or
    the purge never reached that store (content never exposed, or no such tier)."""

    __pydantic_config__ = _CONFIG

    kv_engine: StoreEntry | None = None
    kv_host: TierSweep | None = None
    kv_redis: TierSweep | None = None
    kv_disk: TierSweep | None = None


@dataclass(frozen=True)
class PurgeJob:
    """One purge of one target. ``done`` lists finished steps in order; each result field is
    None until its step ran (see the module docstring for which step sets which)."""

    __pydantic_config__ = _CONFIG

    id: PurgeId
    target: str
    created_at: int  # unix seconds
    status: PurgeStatus = PurgeStatus.RUNNING
    done: tuple[PurgeStep, ...] = ()
    error: str | None = None  # why the last run stopped (type and message, at most 500 chars)
    closure: tuple[str, ...] | None = None  # the target first, then what derives from it
    exposed: bool | None = None  # whether the closure's content may have reached an engine
    old_epoch: int | None = None  # the tenant's salt epoch before the rotation
    scopes: tuple[str, ...] | None = None  # the cache scopes of epochs 0..old_epoch
    entries: KvResults = field(default_factory=KvResults)
    removed_keys: int | None = None
    providers: tuple[ProviderReach, ...] | None = None  # the provider routes the closure reached
    decisions_removed: int | None = None  # decision records that carried the closure's content
    compaction: Compaction | None = None

    def finished(self, step: PurgeStep) -> PurgeJob:
        """This job with ``step`` done (and the purge done after the receipt step)."""
        status = PurgeStatus.DONE if step is PurgeStep.RECEIPT else PurgeStatus.RUNNING
        return replace(self, done=(*self.done, step), status=status, error=None)

    def failed(self, error: str) -> PurgeJob:
        """This job stopped by ``error``: incomplete, still pending."""
        return replace(self, status=PurgeStatus.INCOMPLETE, error=error[:500])


def saved(value: T | None, name: str) -> T:
    """A result an earlier step saved; PurgeJobError when it is missing (steps run in order, so
    a missing one means the stored job was damaged, and nothing may be signed from it)."""
    if value is None:
        raise PurgeJobError(f"the purge job lacks {name!r}, which an earlier step saves")
    return value


@dataclass(frozen=True)
class PendingPurge:
    """A purge not finished yet (``zumik:purges:pending``): resumed when Zumik starts."""

    tenant: str
    purge_id: PurgeId
