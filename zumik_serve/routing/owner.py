"""ProfileOwner: the one owner of a profile's scheduler state in a cluster, and the ops that move it.

Every gateway replica decides with its own ``ProfileScheduler`` (its local view: no remote call
per request) and reports what it did as ops, in batches; the owner applies every gateway's
reports and the engines' KV events in one order and hands each gateway a versioned view:

    gateway A ── Report(seq, ops, load) ──►  ProfileOwner  ◄── Report ── gateway B
              ◄──────── View(version) ─────       ▲        ───── View ──►
                                                  └── KvEvent ops (engine replicas)

What a view carries, and how a gateway applies it (``ProfileScheduler.apply_view``):

    breakers, retry budget  the owner's state (small), then the gateway's own ops the owner has
                            not acknowledged yet replayed on top: a gateway never loses its own
                            outcomes and sees every other gateway's
    residency               the owner's log since the gateway's version, without the gateway's
                            own sends (it applied those when it sent); a gateway behind the
                            bounded log gets the whole index instead (``residency_full``)
    load                    the other gateways' in-flight counts per replica and per route, and
                            the prompt tokens they sent each replica that are not prefilled yet;
                            each gateway reports absolute figures, so a lost report costs
                            nothing, and a gateway silent for ``LOAD_TTL_MS`` counts for nothing

Pure: no I/O, no clock (``now_ms`` comes in), no framework. In one process the owner is a plain
object (``LocalLink``); in a cluster ``app/scheduler_actor.py`` puts it in one Ray actor per
profile and gateways long-poll it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Literal, Protocol

from zumik_serve.routing.breaker import (
    CLOSED,
    BreakerPolicy,
    BreakerState,
    admit,
    current,
    record_failure,
    record_success,
)
from zumik_serve.routing.residency import ResidencyIndex
from zumik_serve.routing.retry import RetryBudget

LOG_ENTRIES = 16_384  # residency ops kept for gateways catching up; older: the whole index
LOAD_TTL_MS = 5_000  # a gateway that has not reported for this long holds no load
ENGINE_KEY_CHARS = 16  # a block named by the engine (``block_hashes.event_key``); text keys: 32


@dataclass(frozen=True)
class Sent:
    """A gateway sent a prompt with these prefix keys (prompt order) to ``replica``."""

    replica: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class KvEvent:
    """What an engine replica says it holds now: ``stored`` keys (prompt order) are resident,
    ``removed`` ones are gone; ``cleared``: it dropped its whole prefix cache first."""

    replica: str
    stored: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    cleared: bool = False


BreakerKind = Literal["admit", "success", "failure", "release"]


@dataclass(frozen=True)
class BreakerOp:
    """A breaker transition of one candidate (``scheduler.breaker_key``), at ``now_ms``."""

    key: str
    kind: BreakerKind
    now_ms: int


@dataclass(frozen=True)
class BudgetOp:
    """A request (or a retry) counted into the profile's retry budget at ``now_ms``."""

    kind: Literal["request", "retry"]
    now_ms: int


Op = Sent | KvEvent | BreakerOp | BudgetOp


@dataclass(frozen=True)
class Report:
    """One batch from one gateway: its ops in the order it applied them, numbered ``seq``
    (1, 2, ... per gateway), and its own load now (absolute): in-flight counts per replica and
    route, and per replica the prompt tokens it sent there that are not prefilled yet."""

    gateway: str
    seq: int
    ops: tuple[Op, ...]
    inflight: tuple[tuple[str, int], ...] = ()
    route_inflight: tuple[tuple[str, int], ...] = ()
    pending_prefill: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class View:
    """The owner's state for one gateway at ``version``. ``acked_seq``: the last of the
    gateway's reports applied into it. ``residency_ops``: the log after the version the gateway
    asked from, other origins only; when ``residency_full`` is not None the gateway replaces its
    index with it (per replica, keys least recently used first) instead."""

    version: int
    acked_seq: int
    breakers: tuple[tuple[str, BreakerState], ...]
    budget: RetryBudget
    residency_ops: tuple[Sent | KvEvent, ...] = ()
    residency_full: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    load: tuple[tuple[str, int], ...] = ()
    route_load: tuple[tuple[str, int], ...] = ()
    prefill_load: tuple[tuple[str, int], ...] = ()


@dataclass
class SchedulerState:
    """The parts of a profile's scheduler state that ops move: the owner holds one, and each
    gateway's scheduler holds its own copy (``ProfileScheduler``)."""

    policy: BreakerPolicy
    residency: ResidencyIndex
    budget: RetryBudget
    breakers: dict[str, BreakerState] = field(default_factory=dict)

    def apply(self, op: Op) -> None:
        if isinstance(op, Sent):
            self.residency.record_sent(op.replica, op.keys)
        elif isinstance(op, KvEvent):
            apply_kv_event(self.residency, op)
        else:
            self.apply_small(op)

    def apply_small(self, op: BreakerOp | BudgetOp | Sent | KvEvent) -> None:
        """Breaker and budget ops only (what a gateway replays over a view); others pass."""
        if isinstance(op, BudgetOp):
            self.budget = budget_after(self.budget, op)
        elif isinstance(op, BreakerOp):
            state = breaker_transition(self.breakers.get(op.key, CLOSED), op, self.policy)
            if state == CLOSED:  # no entry: the same answer, and one per tenant costs nothing
                self.breakers.pop(op.key, None)
            else:
                self.breakers[op.key] = state


def breaker_transition(state: BreakerState, op: BreakerOp, policy: BreakerPolicy) -> BreakerState:
    """The state a breaker op leaves (the same functions the dispatcher's calls use)."""
    if op.kind == "admit":
        return admit(current(state, op.now_ms, policy), op.now_ms, policy)[1]
    if op.kind == "success":
        return record_success(state, op.now_ms, policy)
    if op.kind == "failure":
        return record_failure(state, op.now_ms, policy)
    if state.probe_started_at_ms is None:  # release: the probe goes back
        return state
    return replace(state, probe_started_at_ms=None)


def budget_after(budget: RetryBudget, op: BudgetOp) -> RetryBudget:
    return budget.record_request(op.now_ms) if op.kind == "request" else budget.record_retry(op.now_ms)


def apply_kv_event(residency: ResidencyIndex, event: KvEvent) -> None:
    if event.cleared:
        residency.forget_replica(event.replica)
    residency.apply_event(event.replica, stored=event.stored, removed=event.removed)


@dataclass
class _GatewayLoad:
    seen_ms: int
    inflight: dict[str, int]
    route_inflight: dict[str, int]
    pending_prefill: dict[str, int]


class ProfileOwner:
    """The owner's side: applies reports and engine events in arrival order, serves views."""

    def __init__(
        self,
        policy: BreakerPolicy,
        *,
        capacity_blocks: int,
        budget_ratio: Decimal,
        log_entries: int = LOG_ENTRIES,
    ) -> None:
        self.state = SchedulerState(
            policy=policy, residency=ResidencyIndex(capacity_blocks), budget=RetryBudget(ratio=budget_ratio)
        )
        self.version = 0
        self._log: deque[tuple[int, str, Sent | KvEvent]] = deque(maxlen=log_entries)
        self._acked: dict[str, int] = {}
        self._load: dict[str, _GatewayLoad] = {}
        # How often a belief built only from sends is wrong: at each send, the prefix the sends
        # alone say the replica holds vs what its engine's events say (replicas that report).
        self._sent_only = ResidencyIndex(capacity_blocks)
        self._engine_only = ResidencyIndex(capacity_blocks)
        self._reporting: set[str] = set()
        self.belief_checked = 0
        self.belief_wrong = 0
        self.engine_event_count = 0

    def report(self, report: Report, now_ms: int) -> int:
        """Apply one gateway batch (a batch seen before is ignored: its ops are in already);
        the version after it."""
        self._load[report.gateway] = _GatewayLoad(
            now_ms, dict(report.inflight), dict(report.route_inflight), dict(report.pending_prefill)
        )
        if report.seq <= self._acked.get(report.gateway, 0):
            return self.version
        self._acked[report.gateway] = report.seq
        if report.ops:
            self._apply(report.gateway, report.ops)
        return self.version

    def exchange(self, report: Report, since_version: int, now_ms: int) -> View:
        """One round of a gateway's link: its batch applied (``report``), then its view since
        ``since_version`` (``view``), in one call."""
        self.report(report, now_ms)
        return self.view(report.gateway, since_version, now_ms)

    def engine_events(self, events: Sequence[KvEvent]) -> int:
        """Apply KV events from engine replicas (origin: the replica)."""
        if events:
            self.engine_event_count += len(events)
            self._apply("", events)
        return self.version

    def engine_residency(self, replica: str) -> tuple[str, ...]:
        """The blocks ``replica`` holds by its engine's KV events alone (no gateway's sends),
        least recently stored first; empty for a replica whose engine never reported."""
        return self._engine_only.keys(replica)

    def view(self, gateway: str, since_version: int, now_ms: int) -> View:
        oldest = self._log[0][0] if self._log else self.version + 1
        behind = since_version < oldest - 1 or since_version > self.version
        ops: tuple[Sent | KvEvent, ...] = ()
        full = None
        if behind:
            full = tuple(
                (replica, self.state.residency.keys(replica)) for replica in self.state.residency.replicas()
            )
        else:  # the log is in version order: only its tail after ``since_version`` is read
            newer: list[Sent | KvEvent] = []
            for version, origin, op in reversed(self._log):
                if version <= since_version:
                    break
                if origin != gateway:
                    newer.append(op)
            ops = tuple(reversed(newer))
        load: dict[str, int] = {}
        route_load: dict[str, int] = {}
        prefill_load: dict[str, int] = {}
        for name, entry in self._load.items():
            if name == gateway or now_ms - entry.seen_ms > LOAD_TTL_MS:
                continue
            for totals, counts in (
                (load, entry.inflight),
                (route_load, entry.route_inflight),
                (prefill_load, entry.pending_prefill),
            ):
                for key, count in counts.items():
                    totals[key] = totals.get(key, 0) + count
        return View(
            version=self.version,
            acked_seq=self._acked.get(gateway, 0),
            breakers=tuple(sorted(self.state.breakers.items())),
            budget=self.state.budget,
            residency_ops=ops,
            residency_full=full,
            load=tuple(sorted(load.items())),
            route_load=tuple(sorted(route_load.items())),
            prefill_load=tuple(sorted(prefill_load.items())),
        )

    def _check_belief(self, op: Op) -> None:
        if isinstance(op, KvEvent):
            self._reporting.add(op.replica)
            apply_kv_event(self._engine_only, op)
        elif isinstance(op, Sent):
            # Only prompts keyed by the engine's own block names (token ids) can be checked.
            if op.replica in self._reporting and op.keys and len(op.keys[0]) == ENGINE_KEY_CHARS:
                self.belief_checked += 1
                believed = self._sent_only.matched_prefix_blocks(op.replica, op.keys)
                held = self._engine_only.matched_prefix_blocks(op.replica, op.keys)
                self.belief_wrong += believed != held
            self._sent_only.record_sent(op.replica, op.keys)

    def _apply(self, origin: str, ops: Iterable[Op]) -> None:
        self.version += 1
        for op in ops:
            self._check_belief(op)
            self.state.apply(op)
            if isinstance(op, Sent | KvEvent):
                self._log.append((self.version, origin, op))


class GatewayView(Protocol):
    """A gateway's local view of the profile's state (``ProfileScheduler`` once linked)."""

    gateway: str | None
    version: int

    def take_report(self) -> Report: ...

    def apply_view(self, view: View) -> None: ...


def exchange(view: GatewayView, owner: ProfileOwner, now_ms: int) -> None:
    """One round of a gateway's link with an owner in the same process: report, then view (the
    Ray adapter does the same over an actor, off the request path)."""
    view.apply_view(owner.exchange(view.take_report(), view.version, now_ms))
