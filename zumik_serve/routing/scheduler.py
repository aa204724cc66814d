"""ProfileScheduler: a gateway's view of its profile's replica selection state, and its decisions.

It keeps what ``routing.decision.decide`` needs as recorded inputs and nothing else:

    breakers     one per route (per replica for BYOC), moved by attempt outcomes, and one per
                 tenant and route where that tenant's timeouts count (a BYOK route's: the
                 tenant's only)
    residency    which prefix blocks each BYOC replica holds: the record of what was sent where,
                 corrected by the engines' KV events (bounded LRU per replica)
    in-flight    requests sent to each replica and not finished (running + queued), and the
                 prompt tokens sent to each replica that it has not prefilled yet (each
                 request's prompt less the prefix its decision saw there, until its first output)
    retry budget retries allowed per request volume

Each request becomes ``DecisionInputs`` (time, seed and state passed in, then recorded) and one
``decide()`` call; the record replays exactly from its inputs. Prefix keys are chained hashes of
the prompt text in chunks of about one KV block (``CHARS_PER_TOKEN`` characters per token),
seeded with the tenant's cache salt, so one tenant's traffic never changes another's routing.
Computing them does not need the tokenizer (SGLang's cache-aware router matches text too).
A prompt given as token ids is keyed by the engine's own block hashes instead
(``routing/block_hashes.py``, salted by the engine with the same cache salt), the names its KV
events use; so is a /v1 chat prompt when the group's engines report KV events
(``engine_events``): the gateway renders and tokenizes it as vLLM will
(``engines/chat_prompt.py``) and counts, by reason, the chat prompts it keeps text keys for
(``chat_keys``). Both chains are remembered across requests (``routing/chain_memo.py``, one
memo per process): an agent's next turn hashes only what it added to its previous prompt. And a decision
computes them only as far as its residency walks read (``routing/prompt_keys.py``): a first
request hashes one memo run of its prompt (512 tokens), the rest after the call is handed on.

No I/O, no clock: the gateway passes ``now_ms`` and the seed in. It runs inside each gateway
process as that gateway's local view of the profile's state (a remote call per request would cost
milliseconds here, see docs/benchmarks.md). Linked to the profile's owner (``routing/owner.py``,
``link``), it also queues what it did as ops (``take_report``) and takes the owner's view back
(``apply_view``): other gateways' sends, outcomes and load, the engines' KV events. Unlinked (one
process) it is the owner itself.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import Decimal

from profiles import Profile
from profiles.model import RouteKind, RouteSpec
from zumik_serve.routing.breaker import (
    CLOSED,
    BreakerState,
    BreakerStatus,
    admit,
    can_admit,
    current,
    record_failure,
    record_success,
)
from zumik_serve.routing.chain_memo import PREFIX_CHAINS, ChainMemo
from zumik_serve.routing.decision import (
    DecisionInputs,
    DecisionRecord,
    Evidence,
    Pick,
    breaker_policy_of,
    candidate_for_route,
    decide,
    escalation_of,
)
from zumik_serve.routing.owner import (
    BreakerKind,
    BreakerOp,
    BudgetOp,
    KvEvent,
    Op,
    ProfileOwner,
    Report,
    Sent,
    View,
    apply_kv_event,
    breaker_transition,
    budget_after,
)
from zumik_serve.routing.prompt_keys import PromptKeys, TextChain, TokenIdChain
from zumik_serve.routing.residency import ResidencyIndex
from zumik_serve.routing.retry import AttemptOutcome, RetryBudget

logger = logging.getLogger("ray.serve")

CHARS_PER_TOKEN = 4
ENGINE_KEYS = "engine"  # a chat prompt keyed by the engine's block hashes (``chat_keys``)
ANY_REPLICA = "*"  # a BYOC pick that names no replica: the group had none the scheduler knew
RESIDENCY_BLOCKS_PER_REPLICA = 65_536


def prefix_keys(
    text: str, *, block_size: int, salt: str, max_blocks: int, memo: ChainMemo | None = None
) -> list[str]:
    """Chained keys of every full chunk of ``text`` (about one KV block each). With ``memo``,
    the chunks a recent prompt of the same salt began with are recalled, not hashed
    (``routing/chain_memo.py``): the same keys, byte for byte."""
    return text_prefix_keys(text, block_size=block_size, salt=salt, max_blocks=max_blocks, memo=memo).all()


def text_prefix_keys(
    text: str, *, block_size: int, salt: str, max_blocks: int, memo: ChainMemo | None
) -> PromptKeys:
    """``prefix_keys``, computed as far as they are read (``routing/prompt_keys.py``)."""
    chain = TextChain(text, width=block_size * CHARS_PER_TOKEN, salt=salt, block_size=block_size)
    return PromptKeys(chain, min(chain.num_blocks(), max_blocks), memo)


def token_prefix_keys(
    token_ids: Sequence[int], *, block_size: int, cache_salt: str | None, max_blocks: int,
    memo: ChainMemo | None,
) -> PromptKeys:  # fmt: skip
    """``block_hashes.engine_block_keys``, computed as far as they are read."""
    chain = TokenIdChain(token_ids, block_size=block_size, cache_salt=cache_salt)
    return PromptKeys(chain, min(len(token_ids) // block_size, max_blocks), memo)


def owner_for(profile: Profile) -> ProfileOwner:
    """The owner of ``profile``'s scheduler state (``routing/owner.py``), sized as a gateway's."""
    return ProfileOwner(
        breaker_policy_of(profile),
        capacity_blocks=RESIDENCY_BLOCKS_PER_REPLICA,
        budget_ratio=Decimal(profile.routing.breaker.retry_budget_ratio),
    )


def breaker_key(pick: Pick, tenant: str | None = None) -> str:
    """The breaker a pick's outcomes move: per route (per replica for BYOC), and per tenant too
    when ``tenant`` is given (a BYOK route: one tenant's bad key is no other tenant's fault)."""
    key = pick.route if pick.replica is None else f"{pick.route}/{pick.replica}"
    return key if tenant is None else f"{tenant}|{key}"


@dataclass(frozen=True)
class SchedulingRequest:
    """One request as the scheduler sees it (the prompt as text, already tenant-scoped)."""

    tenant: str
    cache_salt: str
    prompt_text: str
    expected_output_tokens: int
    request_digest: str
    release_id: str | None
    snapshot_id: str | None
    allowed_routes: frozenset[str] | None  # a release pins its route table; None: every route
    evidence: Evidence
    qos: str = "standard"
    prefer_cheapest: bool = False
    # A prompt given as token ids: its prefix keys are then the engine's own block hashes
    # (routing/block_hashes.py), which the engines' KV events name too.
    prompt_token_ids: Sequence[int] | None = None


class ProfileScheduler:
    def __init__(
        self,
        profile: Profile,
        *,
        replicas: dict[str, Sequence[str]],
        chains: ChainMemo | None = PREFIX_CHAINS,
        engine_events: bool = False,
    ) -> None:
        """``replicas``: the replica ids of each BYOC route (e.g. ``{"local": ["r0", "r1"]}``).
        ``chains``: where prompts' prefix key chains are remembered across requests (the
        process's memo; ``None``: every prompt is hashed whole). ``engine_events``: the BYOC
        group's engines report KV events, so a chat prompt is worth its engine keys (the
        request pipeline tokenizes it then)."""
        self.profile = profile
        self.chains = chains
        self.engine_events = engine_events
        # Chat prompts by how they were keyed: ENGINE_KEYS, or the ChatFallback value that kept
        # text keys (engine_events only).
        self.chat_keys: Counter[str] = Counter()
        self.routes = {route.name: route for route in profile.effective_routes()}
        self.replicas = {name: list(ids) for name, ids in replicas.items()}
        self.fingerprint = profile.fingerprint()
        self._policy = breaker_policy_of(profile)
        self._escalation = escalation_of(profile)
        self.breakers: dict[str, BreakerState] = {}
        self.residency = ResidencyIndex(RESIDENCY_BLOCKS_PER_REPLICA)
        self.inflight: dict[str, int] = {}  # by replica
        self.pending_prefill: dict[str, int] = {}  # by replica: prompt tokens sent, not prefilled
        self.route_inflight: dict[str, int] = {}  # by route (admission per route)
        self.budget = RetryBudget(ratio=Decimal(profile.routing.breaker.retry_budget_ratio))
        self._max_blocks = profile.engine.max_model_len // profile.engine.block_size + 1
        # What every decision reads of the profile, computed once (a profile does not change).
        self._prices = {name: route.token_prices_pusd() for name, route in self.routes.items()}
        self._fallback_order = tuple(profile.effective_fallback_order())
        self._default_route = profile.effective_default_route()
        # Linked to the profile's owner (``link``): ops not yet reported, reports not yet
        # acknowledged, the owner's version applied here, other gateways' load.
        self.gateway: str | None = None
        self.version = 0
        self._outbox: list[Op] | None = None
        self._unacked: list[Report] = []
        self._seq = 0
        self.remote_inflight: dict[str, int] = {}
        self.remote_route_inflight: dict[str, int] = {}
        self.remote_pending_prefill: dict[str, int] = {}

    def route(self, name: str) -> RouteSpec:
        return self.routes[name]

    def count_chat_keys(self, kind: str) -> None:
        """A chat prompt was keyed as ``kind`` (``ENGINE_KEYS`` or a fallback's reason); each
        reason is logged the first time this process sees it."""
        if kind != ENGINE_KEYS and not self.chat_keys[kind]:
            logger.info("zumik: a chat prompt keeps text keys (%s); chat_keys counts each reason", kind)
        self.chat_keys[kind] += 1

    def inputs(
        self, request: SchedulingRequest, *, now_ms: int, seed: int
    ) -> tuple[DecisionInputs, PromptKeys]:
        """The recorded inputs of one decision, and the prompt's prefix keys: computed here only
        as far as the residency walks need them (a first request's: its first run of blocks),
        the rest when read (``sent``, after the call is handed on)."""
        block_size = self.profile.engine.block_size
        if request.prompt_token_ids is not None:
            keys = token_prefix_keys(
                request.prompt_token_ids, block_size=block_size, cache_salt=request.cache_salt,
                max_blocks=self._max_blocks, memo=self.chains,
            )  # fmt: skip
            num_tokens = len(request.prompt_token_ids)
        else:
            keys = text_prefix_keys(
                request.prompt_text, block_size=block_size, salt=request.cache_salt,
                max_blocks=self._max_blocks, memo=self.chains,
            )  # fmt: skip
            num_tokens = len(request.prompt_text) // CHARS_PER_TOKEN
        candidates = []
        max_seqs = self.profile.engine.max_num_seqs
        for route in self.routes.values():
            if request.allowed_routes is not None and route.name not in request.allowed_routes:
                continue
            prices = self._prices[route.name]
            if route.kind is RouteKind.BYOC:
                # A group whose running replicas are not known (yet, or none is running): one
                # candidate for the group; its engine client waits for a replica, bounded.
                for replica in self.replicas.get(route.name) or [ANY_REPLICA]:
                    pick = Pick(route.name, replica)
                    inflight = self.inflight.get(replica, 0) + self.remote_inflight.get(replica, 0)
                    candidates.append(
                        candidate_for_route(
                            route,
                            breaker=self._breaker(pick, now_ms, request.tenant),
                            replica=replica,
                            matched_prefix_blocks=self.residency.matched_prefix_blocks(replica, keys),
                            queue_depth=max(0, inflight - max_seqs),
                            running=min(inflight, max_seqs),
                            max_num_seqs=max_seqs,
                            pending_prefill_tokens=self.pending_prefill.get(replica, 0)
                            + self.remote_pending_prefill.get(replica, 0),
                            prices=prices,
                        )
                    )
            else:
                pick = Pick(route.name, None)
                candidates.append(
                    candidate_for_route(
                        route, breaker=self._breaker(pick, now_ms, request.tenant), prices=prices
                    )
                )
        inputs = DecisionInputs(
            request_digest=request.request_digest,
            tenant=request.tenant,
            prompt_num_tokens=max(1, num_tokens),
            num_prompt_blocks=len(keys),
            block_size=block_size,
            profile_name=self.profile.name,
            profile_fingerprint=self.fingerprint,
            release_id=request.release_id,
            snapshot_id=request.snapshot_id,
            policy_version=self.profile.routing.policy_version,
            now_ms=now_ms,
            seed=seed,
            candidates=tuple(candidates),
            evidence=request.evidence,
            escalation=self._escalation,
            fallback_order=self._fallback_order,
            default_route=self._default_route,
            breaker_policy=self._policy,
            expected_output_tokens=request.expected_output_tokens,
            qos=request.qos,
            prefer_cheapest=request.prefer_cheapest,
        )
        return inputs, keys

    def decide(
        self, decision_id: str, request: SchedulingRequest, *, now_ms: int, seed: int
    ) -> tuple[DecisionRecord, PromptKeys]:
        inputs, keys = self.inputs(request, now_ms=now_ms, seed=seed)
        self.budget = self.budget.record_request(now_ms)
        if self._outbox is not None:
            self._outbox.append(BudgetOp("request", now_ms))
        return decide(decision_id, inputs), keys

    # --- what happened -----------------------------------------------------------------------

    def route_full(self, name: str) -> bool:
        """Whether ``name`` has its ``max_inflight`` requests already (this gateway's and, linked
        to the owner, the others' as of its last view)."""
        limit = self.routes[name].max_inflight
        inflight = self.route_inflight.get(name, 0) + self.remote_route_inflight.get(name, 0)
        return limit is not None and inflight >= limit

    def sent(self, pick: Pick, keys: Sequence[str]) -> None:
        """A request of ``pick`` went out with these prefix keys: ``started`` and ``record_sent``."""
        self.started(pick)
        self.record_sent(pick, keys)

    def started(self, pick: Pick, prefill_tokens: int = 0) -> None:
        """A request of ``pick`` is going out: in flight from now on (decisions see its load),
        and its ``prefill_tokens`` (``DecisionRecord.prefill_tokens``) owed by the replica until
        ``prefilled``."""
        self.route_inflight[pick.route] = self.route_inflight.get(pick.route, 0) + 1
        if pick.replica is not None:
            self.inflight[pick.replica] = self.inflight.get(pick.replica, 0) + 1
            if prefill_tokens:
                owed = self.pending_prefill.get(pick.replica, 0)
                self.pending_prefill[pick.replica] = owed + prefill_tokens

    def prefilled(self, pick: Pick, prefill_tokens: int) -> None:
        """The request ``started`` with ``prefill_tokens`` has its first output (or failed
        before it): the replica owes its prefill no more."""
        if pick.replica is not None and prefill_tokens:
            left = self.pending_prefill.get(pick.replica, 0) - prefill_tokens
            if left > 0:
                self.pending_prefill[pick.replica] = left
            else:
                self.pending_prefill.pop(pick.replica, None)

    def record_sent(self, pick: Pick, keys: Sequence[str]) -> None:
        """The request of ``pick`` went out with these prefix keys: a BYOC replica holds them
        now (every key is computed here when ``keys`` is a ``PromptKeys``)."""
        if pick.replica is not None:
            every = keys.all() if isinstance(keys, PromptKeys) else keys
            self.residency.record_sent(pick.replica, every)
            if self._outbox is not None:
                self._outbox.append(Sent(pick.replica, tuple(every)))

    def finished(self, pick: Pick) -> None:
        self.route_inflight[pick.route] = max(0, self.route_inflight.get(pick.route, 0) - 1)
        if pick.replica is not None:
            self.inflight[pick.replica] = max(0, self.inflight.get(pick.replica, 0) - 1)

    def admit(self, pick: Pick, now_ms: int, tenant: str | None = None) -> bool:
        """Whether ``pick``'s breakers (``_breaker_keys``) let a request of ``tenant`` through
        now; half open, the admitted request takes the one probe, and later decisions see it
        out (``breaker.admit``). Refused by one, it takes no probe from the other."""
        states = {
            key: current(self.breakers.get(key, CLOSED), now_ms, self._policy)
            for key in self._breaker_keys(pick, tenant)
        }
        if not all(can_admit(state, now_ms, self._policy) for state in states.values()):
            return False
        for key, state in states.items():
            if state.state is BreakerStatus.CLOSED:
                continue  # a closed breaker admits and stays as it is: nothing to store or report
            self._set_breaker(key, admit(state, now_ms, self._policy)[1])
            self._report_breaker(key, "admit", now_ms)
        return True

    def breaker_open(self, pick: Pick, now_ms: int, tenant: str | None = None) -> bool:
        return self._breaker(pick, now_ms, tenant).state is BreakerStatus.OPEN

    def release_probe(self, pick: Pick, tenant: str | None = None) -> None:
        """Give back a half-open probe whose attempt ended without saying anything of the route
        (a client error): the next request may probe."""
        for key in self._breaker_keys(pick, tenant):
            self._give_back_probe(key)

    def _give_back_probe(self, key: str) -> None:
        state = self.breakers.get(key)
        if state is not None and state.probe_started_at_ms is not None:
            self._set_breaker(key, replace(state, probe_started_at_ms=None))
            self._report_breaker(key, "release", 0)

    def succeeded(self, pick: Pick, now_ms: int, tenant: str | None = None) -> BreakerState:
        """A success closes each of the pick's breakers for ``tenant``."""
        for key in self._breaker_keys(pick, tenant):
            self._set_breaker(key, record_success(self.breakers.get(key, CLOSED), now_ms, self._policy))
            self._report_breaker(key, "success", now_ms)
        return self._breaker(pick, now_ms, tenant)

    def failed(
        self, pick: Pick, now_ms: int, tenant: str | None = None, outcome: AttemptOutcome | None = None
    ) -> BreakerState:
        """A failure counts on the route's shared breaker, but a timeout of ``tenant``'s request
        only on the tenant's own: its own request may have been too big for the route's
        timeout, which says nothing of the route for other tenants (a route that hangs for
        everyone opens each tenant's own). The state the tenant's requests meet now."""
        keys = self._breaker_keys(pick, tenant)
        counted = keys[-1:] if outcome is AttemptOutcome.TIMEOUT else keys[:1]
        for key in keys:
            if key in counted:
                self._set_breaker(key, record_failure(self.breakers.get(key, CLOSED), now_ms, self._policy))
                self._report_breaker(key, "failure", now_ms)
            else:  # a half-open probe this request took there says nothing of it: given back
                self._give_back_probe(key)
        return self._breaker(pick, now_ms, tenant)

    def allow_retry(self, now_ms: int) -> bool:
        if not self.budget.allow(now_ms):
            return False
        self.budget = self.budget.record_retry(now_ms)
        if self._outbox is not None:
            self._outbox.append(BudgetOp("retry", now_ms))
        return True

    def _breaker_keys(self, pick: Pick, tenant: str | None) -> tuple[str, ...]:
        """The breakers a request of ``tenant`` passes at ``pick``, shared one first: a BYOK
        route's is the tenant's alone (its key is the tenant's, so are its failures); any other
        route's is shared by every tenant, and the tenant has its own besides, where its
        timeouts count (``failed``)."""
        if tenant is None:
            return (breaker_key(pick),)
        if self.routes[pick.route].kind is RouteKind.BYOK:
            return (breaker_key(pick, tenant),)
        return breaker_key(pick), breaker_key(pick, tenant)

    def _breaker(self, pick: Pick, now_ms: int, tenant: str | None = None) -> BreakerState:
        """The state a request of ``tenant`` meets at ``pick``: the worst of its breakers."""
        states = [
            current(self.breakers.get(key, CLOSED), now_ms, self._policy)
            for key in self._breaker_keys(pick, tenant)
        ]
        return max(states, key=_severity)

    def _set_breaker(self, key: str, state: BreakerState) -> None:
        """Store a breaker's state; a closed one with no failures is no entry at all (so that
        one per tenant and route costs nothing until that tenant's requests fail)."""
        if state == CLOSED:
            self.breakers.pop(key, None)
        else:
            self.breakers[key] = state

    # --- replicas and the engines' own word --------------------------------------------------

    def set_replicas(self, route: str, replicas: Sequence[str]) -> None:
        """The live replicas of BYOC route ``route`` (a group that scaled, a replica that died):
        the next decision chooses among these; a replica gone is forgotten."""
        gone = set(self.replicas.get(route, [])) - set(replicas)
        self.replicas[route] = sorted(replicas)
        for replica in gone:
            self.residency.forget_replica(replica)
            self.inflight.pop(replica, None)
            self.pending_prefill.pop(replica, None)

    def apply_kv_events(self, events: Sequence[KvEvent]) -> None:
        """KV events of engine replicas, applied here at once (an unlinked scheduler is the
        owner; a linked one receives them in views)."""
        for event in events:
            apply_kv_event(self.residency, event)

    # --- the owner's link (routing/owner.py) -------------------------------------------------

    def link(self, gateway: str) -> None:
        """From now on, queue every op for the profile's owner as gateway ``gateway``."""
        if not gateway:
            raise ValueError("a gateway id must not be empty (the empty origin is the engines')")
        self.gateway = gateway
        self._outbox = []

    @property
    def ops_to_report(self) -> bool:
        """Whether ops were queued since the last report (``take_report``)."""
        return bool(self._outbox)

    def load_now(self) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]:
        """This gateway's in-flight counts per replica and per route, as a report carries them."""
        return (
            tuple(sorted((r, n) for r, n in self.inflight.items() if n)),
            tuple(sorted((r, n) for r, n in self.route_inflight.items() if n)),
        )

    def take_report(self) -> Report:
        """The ops since the last report as the next batch (kept until the owner acknowledges
        it), with this gateway's load now; an empty batch is a heartbeat of the load."""
        if self._outbox is None or self.gateway is None:
            raise RuntimeError("take_report needs link() first")
        ops, self._outbox = tuple(self._outbox), []
        seq = self._seq
        if ops:
            self._seq += 1
            seq = self._seq
        inflight, route_inflight = self.load_now()
        report = Report(
            self.gateway, seq, ops, inflight=inflight, route_inflight=route_inflight,
            pending_prefill=tuple(sorted(self.pending_prefill.items())),
        )  # fmt: skip
        if ops:
            self._unacked.append(report)
        return report

    def apply_view(self, view: View) -> None:
        """Take the owner's state: its breakers and budget with this gateway's unacknowledged
        ops replayed on top, the residency ops of others since the last view (or the whole
        index, then this gateway's unacknowledged sends again), the others' load."""
        self._unacked = [report for report in self._unacked if report.seq > view.acked_seq]
        pending = [op for report in self._unacked for op in report.ops] + list(self._outbox or [])
        self.breakers = dict(view.breakers)
        self.budget = view.budget
        for op in pending:
            if isinstance(op, BreakerOp):
                self._set_breaker(
                    op.key, breaker_transition(self.breakers.get(op.key, CLOSED), op, self._policy)
                )
            elif isinstance(op, BudgetOp):
                self.budget = budget_after(self.budget, op)
        if view.residency_full is not None:
            self.residency.replace(view.residency_full)
            for op in pending:
                if isinstance(op, Sent):
                    self.residency.record_sent(op.replica, op.keys)
        for residency_op in view.residency_ops:
            if isinstance(residency_op, Sent):
                self.residency.record_sent(residency_op.replica, residency_op.keys)
            else:
                apply_kv_event(self.residency, residency_op)
        self.remote_inflight = dict(view.load)
        self.remote_route_inflight = dict(view.route_load)
        self.remote_pending_prefill = dict(view.prefill_load)
        self.version = view.version

    def _report_breaker(self, key: str, kind: BreakerKind, now_ms: int) -> None:
        if self._outbox is not None:
            self._outbox.append(BreakerOp(key, kind, now_ms))


_SEVERITY = {BreakerStatus.CLOSED: 0, BreakerStatus.HALF_OPEN: 1, BreakerStatus.OPEN: 2}


def _severity(state: BreakerState) -> tuple[int, bool]:
    """Orders breaker states from the one that lets most through: closed, half open with its
    probe free, half open with the probe out, open."""
    return _SEVERITY[state.state], state.probe_started_at_ms is not None
