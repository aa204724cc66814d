"""ProfileScheduler: the one owner of a profile's replica selection state, and its decisions.

It keeps what ``routing.decision.decide`` needs as recorded inputs and nothing else:

    breakers     one per route (per replica for BYOC), moved by attempt outcomes
    residency    which prefix blocks each BYOC replica holds: its own record of what it sent
                 where (bounded LRU per replica)
    in-flight    requests sent to each replica and not finished (running + queued)
    retry budget retries allowed per request volume

Each request becomes ``DecisionInputs`` (time, seed and state passed in, then recorded) and one
``decide()`` call; the record replays exactly from its inputs. Prefix keys are chained hashes of
the prompt text in chunks of about one KV block (``CHARS_PER_TOKEN`` characters per token),
seeded with the tenant's cache salt, so one tenant's traffic never changes another's routing.
Computing them does not need the tokenizer (SGLang's cache-aware router matches text too).

No I/O, no clock: the gateway passes ``now_ms`` and the seed in. It runs inside the gateway
process (a handle call per request costs milliseconds here, see docs/benchmarks.md); a profile
has one gateway replica that routes, so one scheduler.
"""

from __future__ import annotations

import hashlib
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
    current,
    record_failure,
    record_success,
)
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
from zumik_serve.routing.residency import ResidencyIndex
from zumik_serve.routing.retry import RetryBudget

CHARS_PER_TOKEN = 4
RESIDENCY_BLOCKS_PER_REPLICA = 65_536


def prefix_keys(text: str, *, block_size: int, salt: str, max_blocks: int) -> list[str]:
    """Chained keys of every full chunk of ``text`` (about one KV block each)."""
    width = block_size * CHARS_PER_TOKEN
    data = text.encode()
    parent = hashlib.blake2b(f"zumik-prefix|{salt}".encode(), digest_size=16).digest()
    keys: list[str] = []
    for start in range(0, min(len(data) - width + 1, max_blocks * width), width):
        parent = hashlib.blake2b(parent + data[start : start + width], digest_size=16).digest()
        keys.append(parent.hex())
    return keys


def breaker_key(pick: Pick) -> str:
    return pick.route if pick.replica is None else f"{pick.route}/{pick.replica}"


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


class ProfileScheduler:
    def __init__(self, profile: Profile, *, replicas: dict[str, Sequence[str]]) -> None:
        """``replicas``: the replica ids of each BYOC route (e.g. ``{"local": ["r0", "r1"]}``)."""
        self.profile = profile
        self.routes = {route.name: route for route in profile.effective_routes()}
        self.replicas = {name: list(ids) for name, ids in replicas.items()}
        self.fingerprint = profile.fingerprint()
        self._policy = breaker_policy_of(profile)
        self._escalation = escalation_of(profile)
        self.breakers: dict[str, BreakerState] = {}
        self.residency = ResidencyIndex(RESIDENCY_BLOCKS_PER_REPLICA)
        self.inflight: dict[str, int] = {}  # by replica
        self.route_inflight: dict[str, int] = {}  # by route (admission per route)
        self.budget = RetryBudget(ratio=Decimal(profile.routing.breaker.retry_budget_ratio))
        self._max_blocks = profile.engine.max_model_len // profile.engine.block_size + 1

    def route(self, name: str) -> RouteSpec:
        return self.routes[name]

    def inputs(
        self, request: SchedulingRequest, *, now_ms: int, seed: int
    ) -> tuple[DecisionInputs, list[str]]:
        """The recorded inputs of one decision, and the prompt's prefix keys."""
        block_size = self.profile.engine.block_size
        keys = prefix_keys(
            request.prompt_text, block_size=block_size, salt=request.cache_salt, max_blocks=self._max_blocks
        )
        candidates = []
        for route in self.routes.values():
            if request.allowed_routes is not None and route.name not in request.allowed_routes:
                continue
            if route.kind is RouteKind.BYOC:
                for replica in self.replicas.get(route.name, []):
                    pick = Pick(route.name, replica)
                    inflight = self.inflight.get(replica, 0)
                    max_seqs = self.profile.engine.max_num_seqs
                    candidates.append(
                        candidate_for_route(
                            route,
                            breaker=self._breaker(pick, now_ms),
                            replica=replica,
                            matched_prefix_blocks=self.residency.matched_prefix_blocks(replica, keys),
                            queue_depth=max(0, inflight - max_seqs),
                            running=min(inflight, max_seqs),
                            max_num_seqs=max_seqs,
                        )
                    )
            else:
                candidates.append(
                    candidate_for_route(route, breaker=self._breaker(Pick(route.name, None), now_ms))
                )
        inputs = DecisionInputs(
            request_digest=request.request_digest,
            tenant=request.tenant,
            prompt_num_tokens=max(1, len(request.prompt_text) // CHARS_PER_TOKEN),
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
            fallback_order=tuple(self.profile.effective_fallback_order()),
            default_route=self.profile.effective_default_route(),
            breaker_policy=self._policy,
            expected_output_tokens=request.expected_output_tokens,
            qos=request.qos,
            prefer_cheapest=request.prefer_cheapest,
        )
        return inputs, keys

    def decide(
        self, decision_id: str, request: SchedulingRequest, *, now_ms: int, seed: int
    ) -> tuple[DecisionRecord, list[str]]:
        inputs, keys = self.inputs(request, now_ms=now_ms, seed=seed)
        self.budget = self.budget.record_request(now_ms)
        return decide(decision_id, inputs), keys

    # --- what happened -----------------------------------------------------------------------

    def route_full(self, name: str) -> bool:
        """Whether ``name`` has its ``max_inflight`` requests from this gateway already."""
        limit = self.routes[name].max_inflight
        return limit is not None and self.route_inflight.get(name, 0) >= limit

    def sent(self, pick: Pick, keys: Sequence[str]) -> None:
        self.route_inflight[pick.route] = self.route_inflight.get(pick.route, 0) + 1
        if pick.replica is not None:
            self.inflight[pick.replica] = self.inflight.get(pick.replica, 0) + 1
            self.residency.record_sent(pick.replica, keys)

    def finished(self, pick: Pick) -> None:
        self.route_inflight[pick.route] = max(0, self.route_inflight.get(pick.route, 0) - 1)
        if pick.replica is not None:
            self.inflight[pick.replica] = max(0, self.inflight.get(pick.replica, 0) - 1)

    def admit(self, pick: Pick, now_ms: int) -> bool:
        """Whether ``pick``'s breaker lets a request through now; half open, the admitted request
        takes the one probe, and later decisions see it out (``breaker.admit``)."""
        admitted, state = admit(self._breaker(pick, now_ms), now_ms, self._policy)
        self.breakers[breaker_key(pick)] = state
        return admitted

    def breaker_open(self, pick: Pick, now_ms: int) -> bool:
        return self._breaker(pick, now_ms).state is BreakerStatus.OPEN

    def release_probe(self, pick: Pick) -> None:
        """Give back a half-open probe whose attempt ended without saying anything of the route
        (a client error): the next request may probe."""
        state = self.breakers.get(breaker_key(pick))
        if state is not None and state.probe_started_at_ms is not None:
            self.breakers[breaker_key(pick)] = replace(state, probe_started_at_ms=None)

    def succeeded(self, pick: Pick, now_ms: int) -> BreakerState:
        state = record_success(self._breaker(pick, now_ms), now_ms, self._policy)
        self.breakers[breaker_key(pick)] = state
        return state

    def failed(self, pick: Pick, now_ms: int) -> BreakerState:
        state = record_failure(self._breaker(pick, now_ms), now_ms, self._policy)
        self.breakers[breaker_key(pick)] = state
        return state

    def allow_retry(self, now_ms: int) -> bool:
        if not self.budget.allow(now_ms):
            return False
        self.budget = self.budget.record_retry(now_ms)
        return True

    def _breaker(self, pick: Pick, now_ms: int) -> BreakerState:
        return current(self.breakers.get(breaker_key(pick), CLOSED), now_ms, self._policy)
