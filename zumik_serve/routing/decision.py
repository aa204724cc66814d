"""The scheduler's decision: which route (and which BYOC replica) serves one request, as data.

``decide(decision_id, inputs)`` is a pure function: no clock (``inputs.now_ms``), no randomness
but ``inputs.seed`` (ties break on sha256 of seed, request digest and candidate, never on
Python's ``hash()``), no I/O, integers only. Its ``DecisionRecord`` holds the inputs, each
candidate's filter verdicts and score components, the pick and the ordered fallbacks, so that
``replay`` rebuilds the same record byte for byte.

Policy (``DECIDE_VERSION``), in order:

1. **breaker**: a candidate whose breaker is open, or half open with its probe already out, is
   filtered; half open with no probe out passes (this request would be the probe).
2. **escalation**: the default route's kind (managed, normally) is the default pool. The
   escalation kind (byok or byoc) becomes the preferred pool only when the recorded evidence
   meets the profile's spec (level at least ``min_evidence`` and ``reused_tokens_in_window`` at
   least the threshold) **and** (``decide-2``) the priced comparison says it is cheaper: each
   side's expected cost of this request with the part of the prompt the evidence says is reused
   (``reused_tokens_in_window / prompt_tokens_in_window`` of the prompt, the family's reuse
   ratio) priced at that route's cached-input price, the rest at its input price, plus the
   expected output; the escalation kind's cheapest passing candidate must cost strictly less
   than the default route's (both figures are recorded in the verdict). Otherwise its
   candidates are filtered for the pick. Other kinds never make the pick except as a fallback.
   ``decide-1`` records (written before the priced comparison) replay under ``decide-1``.
3. **scores** (integers; lower rank wins):

   * every candidate: ``expected_cost_pusd`` = cached_tokens * cached_price + (prompt - cached)
     * input_price + expected_output_tokens * output_price, in pico-USD; cached_tokens is the
     provider's predicted cached part (``predicted_cached_tokens``; unknown: 0) or, for byoc,
     the matched prefix. ``tiebreak`` = the first 6 bytes of sha256(seed, digest, candidate).
   * byoc replicas: ``matched_tokens`` = matched_prefix_blocks * block_size (prefill saved);
     ``load_penalty_tokens`` (``decide-3``, when the candidate carries
     ``pending_prefill_tokens``) = pending_prefill_tokens + running * prompt_num_tokens //
     max_num_seqs: the prefill the replica still owes the requests sent to it (each one's
     prompt less the prefix the decision that sent it saw there, until its first output),
     which ours waits behind whether those requests are queued or already running (a CPU
     engine, and a GPU one with chunked prefill, prefills them in the same steps as ours),
     plus each running request's share of the batch. Before (``decide-1``, ``decide-2``, and a
     candidate without the figure) it was (queue_depth * max_num_seqs + running) *
     prompt_num_tokens // max_num_seqs: a queued request ahead of ours as one uncached
     prefill of a prompt like ours, a running one as 1/max_num_seqs of that, which let a
     replica holding many sessions' prefixes fall behind on their new tokens while its
     requests all counted as running. ``score_tokens`` = matched_tokens -
     load_penalty_tokens. A shared prefix goes where it lives unless the work queued there
     costs more than the prefill it saves; with no match anywhere this is "least loaded", and
     equal loads spread by the seeded tiebreak.
   * byoc replicas, ``decide-4``: the same comparison of expected waits (``wait_tokens`` =
     load_penalty_tokens + prompt - matched_tokens, the prefill ahead of this request's first
     token, its own included; ranking by it is ranking by ``score_tokens``), with a relative
     margin against leaving the prefix: a replica that does not hold the longest match among
     the byoc candidates passing the breaker filter (``holds_longest_match`` 0) counts its wait
     x 3/2 (``SPILL_MARGIN``), so it wins only when the holder's wait is more than 1.5x its
     own. Leaving the holder computes the prefix again elsewhere and evicts there; under
     saturation every replica's owed prefill swings by more than one prompt's, and decide-3's
     plain comparison left holders on those swings (with ``builtin:tiny-wide``, capture fell
     to 0.85 of the ideal open loop; ``docs/benchmarks.md``). A relative margin (as
     SGLang's router's ``balance_rel_threshold``) still sheds a busy holder's load to an idle
     replica, and keeps requests with their prefix when every replica is busy. ``score_tokens``
     = prompt - the wait as counted (the holders': decide-3's score).
   * rank: byoc by (-score_tokens, health, expected cost, tiebreak); managed and byok by
     (expected cost, health, not the default route, tiebreak); health is 0 closed, 1 half open.
4. **fallbacks**: every other candidate that passes the breaker filter and whose route is in
   the profile's fallback order, closed before half open, then in fallback order, then by rank.
   When no pool has a candidate, the first fallback is the pick.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    WrapSerializer,
)

from profiles.model import Profile, RouteKind, RouteSpec
from zumik_serve.reuse.evidence import EvidenceLevel
from zumik_serve.routing.breaker import (
    CLOSED,
    BreakerPolicy,
    BreakerState,
    BreakerStatus,
    current,
)

DECIDE_VERSION = "decide-4"
DECIDE_VERSIONS = ("decide-1", "decide-2", "decide-3", "decide-4")  # every policy a record may name (replay)
SPILL_MARGIN = (3, 2)  # decide-4: a replica without the longest match counts its wait x 3/2
PASS = "pass"


def _pairs_of_object(value: Any) -> Any:
    """A JSON object read back as its (name, value) pairs, sorted by name."""
    return tuple(sorted(value.items())) if isinstance(value, Mapping) else value


def _object_of_pairs(pairs: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    return dict(pairs)


def _without_none(value: Any, handler: SerializerFunctionWrapHandler) -> Any:
    """A value's JSON object without its fields that are None: fields added to a recorded value
    later are None in records written before, which then render as they were written."""
    data = handler(value)
    return {name: item for name, item in data.items() if item is not None} if isinstance(data, dict) else data


def _without_unknown_load(value: Any, handler: SerializerFunctionWrapHandler) -> Any:
    """A candidate's JSON object without ``pending_prefill_tokens`` when it is None (a record
    written before the figure renders as it was written; its other None fields stay)."""
    data = handler(value)
    if isinstance(data, dict) and data.get("pending_prefill_tokens", 0) is None:
        del data["pending_prefill_tokens"]
    return data


# (name, value) pairs sorted by name, written as one JSON object (so that a record read back from
# canonical JSON equals the one written).
NamedVerdicts = Annotated[
    tuple[tuple[str, str], ...],
    BeforeValidator(_pairs_of_object),
    PlainSerializer(_object_of_pairs, return_type=dict[str, str]),
]
NamedScores = Annotated[
    tuple[tuple[str, int], ...],
    BeforeValidator(_pairs_of_object),
    PlainSerializer(_object_of_pairs, return_type=dict[str, int]),
]


@dataclass(frozen=True)
class RouteCandidate:
    """One place this request could go: a provider route, or one replica of a byoc route.

    Prices are integer pico-USD per token (``RouteSpec.token_prices_pusd``). ``replica`` is None
    for managed and byok routes. ``predicted_cached_tokens`` is a provider route's predicted
    cached prompt part, None when unknown (then priced as all uncached). ``matched_prefix_blocks``
    comes from ``ResidencyIndex.snapshot``; ``queue_depth``, ``running``, ``max_num_seqs`` and
    ``pending_prefill_tokens`` (the prompt tokens sent there and not yet prefilled, as far as the
    gateways know: None in records written before it, and then absent from the JSON) are the
    replica's load as last published."""

    route: str
    kind: RouteKind
    input_pusd_per_token: int
    cached_input_pusd_per_token: int
    output_pusd_per_token: int
    breaker: BreakerState = CLOSED
    replica: str | None = None
    matched_prefix_blocks: int = 0
    queue_depth: int = 0
    running: int = 0
    max_num_seqs: int = 1
    predicted_cached_tokens: int | None = None
    pending_prefill_tokens: int | None = None

    @property
    def key(self) -> str:
        return self.route if self.replica is None else f"{self.route}/{self.replica}"


@dataclass(frozen=True)
class Evidence:
    """The recorded reuse evidence of this tenant for one prefix family (or, in records written
    before families, of the tenant or one snapshot) over the escalation window: the strongest
    capture level seen, and the reused tokens counted at that level or stronger
    (``reuse.family.FamilyEvidence``). ``NO_EVIDENCE`` is unknown with 0 tokens.

    ``family`` is the prompt's prefix family (``routing.family``); ``requests_in_window`` and
    ``prompt_tokens_in_window`` count the family's requests and their prompt tokens in the window
    (so ``reused / prompt`` is its reuse ratio, what the priced comparison uses); ``age_s`` is
    how long ago its newest capture was recorded (minute buckets). Each is None when not known
    (and then absent from the record's JSON). In a record, the level is its label
    (``"observed"``)."""

    level: EvidenceLevel
    reused_tokens_in_window: int
    family: str | None = None
    requests_in_window: int | None = None
    prompt_tokens_in_window: int | None = None
    age_s: int | None = None

    def reused_part(self, prompt_num_tokens: int) -> int:
        """The tokens of a prompt of ``prompt_num_tokens`` the evidence says are reused: the
        family's reuse ratio of it (0 when its prompt tokens are unknown)."""
        total = self.prompt_tokens_in_window
        if not total or prompt_num_tokens <= 0:
            return 0
        return min(prompt_num_tokens, prompt_num_tokens * self.reused_tokens_in_window // total)


NO_EVIDENCE = Evidence(EvidenceLevel.UNKNOWN, 0)


@dataclass(frozen=True)
class Escalation:
    """The profile's escalation spec, as recorded (``to``: "byok", "byoc" or "none")."""

    to: str
    min_evidence: EvidenceLevel
    min_reused_tokens_in_window: int
    window_s: int


@dataclass(frozen=True)
class DecisionInputs:
    """Everything ``decide`` reads. ``snapshot_id`` and ``release_id`` are None when the request
    pins none; ``expected_output_tokens`` is what the caller expects to be generated (e.g. its
    max_tokens; 0 to compare input cost only). ``qos`` and ``prefer_cheapest`` default to what a
    record written before they existed meant."""

    request_digest: str
    tenant: str
    prompt_num_tokens: int
    num_prompt_blocks: int
    block_size: int
    profile_name: str
    profile_fingerprint: str
    release_id: str | None
    snapshot_id: str | None
    policy_version: str
    now_ms: int
    seed: int
    candidates: tuple[Annotated[RouteCandidate, WrapSerializer(_without_unknown_load)], ...]
    evidence: Annotated[Evidence, WrapSerializer(_without_none)]
    escalation: Escalation
    fallback_order: tuple[str, ...]
    default_route: str
    breaker_policy: BreakerPolicy
    expected_output_tokens: int = 0
    qos: str = "standard"  # the request's QoS class
    prefer_cheapest: bool = False  # its class takes the cheapest healthy route (e.g. batch)

    def to_json(self) -> dict[str, Any]:
        return _INPUTS.dump_python(self, mode="json")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DecisionInputs:
        return _INPUTS.validate_python(data)


@dataclass(frozen=True)
class Pick:
    route: str
    replica: str | None


@dataclass(frozen=True)
class EscalationVerdict:
    """Whether the recorded evidence met the escalation spec and the escalation was priced
    cheaper, and why (``"met: ..."``, ``"not met: ..."`` or ``"disabled: ..."``).
    ``default_cost_pusd`` and ``escalated_cost_pusd``: this request's expected cost on the
    default route and on the escalation kind's cheapest passing candidate, at the evidence's
    reuse ratio (``decide-2``, once the evidence met the spec; None otherwise, and then absent
    from the JSON)."""

    met: bool
    reason: str
    default_cost_pusd: int | None = None
    escalated_cost_pusd: int | None = None


@dataclass(frozen=True)
class CandidateVerdict:
    """One candidate as the decision saw it: its breaker as of ``now_ms``, each filter's verdict
    ("pass", "pass:<why>" or the reason it was filtered) and each score component, each sorted by
    name (so that a record read back from canonical JSON equals the one written)."""

    route: str
    replica: str | None
    kind: RouteKind
    breaker: BreakerState
    filters: NamedVerdicts
    scores: NamedScores

    @property
    def passed(self) -> bool:
        return all(verdict.startswith(PASS) for _, verdict in self.filters)


@dataclass(frozen=True)
class DecisionRecord:
    """A decision as data: replaying ``inputs`` under ``decide_version`` gives the same record.
    ``pick`` is None only when no candidate passes the breaker filter (``pick_reason`` says why);
    ``fallbacks`` are tried in order after the pick fails.

    Its JSON (``to_json``) is what is recorded and what replay compares, byte for byte in
    canonical form (``canonical_bytes``): the fields in this order, levels as labels, kinds and
    breaker states as their values, each verdict's filters and scores as objects."""

    decision_id: str
    decide_version: str
    policy_version: str
    seed: int
    inputs: DecisionInputs
    escalation: Annotated[EscalationVerdict, WrapSerializer(_without_none)]
    candidates: tuple[CandidateVerdict, ...]
    pick: Pick | None
    pick_reason: str
    fallbacks: tuple[Pick, ...]

    @property
    def escalation_met(self) -> bool:
        return self.escalation.met

    @property
    def escalation_reason(self) -> str:
        return self.escalation.reason

    def prefill_tokens(self, pick: Pick) -> int:
        """The prompt tokens ``pick`` is expected to prefill: the prompt less the prefix this
        decision saw held there (a BYOC replica's ``matched_tokens``); 0 for a provider's route."""
        for verdict in self.candidates:
            if verdict.replica is not None and (verdict.route, verdict.replica) == (pick.route, pick.replica):
                matched = dict(verdict.scores).get("matched_tokens", 0)
                return max(0, self.inputs.prompt_num_tokens - matched)
        return 0

    def to_json(self) -> dict[str, Any]:
        return _RECORD.dump_python(self, mode="json")

    def to_json_bytes(self) -> bytes:
        """``to_json`` as compact UTF-8 JSON, in one step (what the decision store writes)."""
        return _RECORD.dump_json(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DecisionRecord:
        return _RECORD.validate_python(data)


_INPUTS: TypeAdapter[DecisionInputs] = TypeAdapter(DecisionInputs)
_RECORD: TypeAdapter[DecisionRecord] = TypeAdapter(DecisionRecord)


def candidate_for_route(
    route: RouteSpec,
    *,
    breaker: BreakerState = CLOSED,
    replica: str | None = None,
    matched_prefix_blocks: int = 0,
    queue_depth: int = 0,
    running: int = 0,
    max_num_seqs: int = 1,
    predicted_cached_tokens: int | None = None,
    pending_prefill_tokens: int | None = None,
    prices: tuple[int, int, int] | None = None,
) -> RouteCandidate:
    """A candidate for a profile's route (byoc: one per replica), priced from the profile
    (``prices``: its ``token_prices_pusd()`` computed once by the caller, the same figures)."""
    input_price, cached_price, output_price = route.token_prices_pusd() if prices is None else prices
    return RouteCandidate(
        route=route.name,
        kind=route.kind,
        input_pusd_per_token=input_price,
        cached_input_pusd_per_token=cached_price,
        output_pusd_per_token=output_price,
        breaker=breaker,
        replica=replica,
        matched_prefix_blocks=matched_prefix_blocks,
        queue_depth=queue_depth,
        running=running,
        max_num_seqs=max_num_seqs,
        predicted_cached_tokens=predicted_cached_tokens,
        pending_prefill_tokens=pending_prefill_tokens,
    )


def escalation_of(profile: Profile) -> Escalation:
    spec = profile.routing.escalation
    return Escalation(
        spec.to, EvidenceLevel.parse(spec.min_evidence), spec.min_reused_tokens_in_window, spec.window_s
    )


def breaker_policy_of(profile: Profile) -> BreakerPolicy:
    spec = profile.routing.breaker
    return BreakerPolicy(failure_threshold=spec.failure_threshold, cooldown_ms=spec.cooldown_s * 1000)


def canonical_bytes(record: DecisionRecord | dict[str, Any]) -> bytes:
    """The record's canonical JSON: sorted keys, no spaces, UTF-8 (what replay compares)."""
    data = record.to_json() if isinstance(record, DecisionRecord) else record
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def tiebreak(seed: int, request_digest: str, candidate_key: str) -> int:
    """A uniform 48-bit integer from sha256 (stable across processes and PYTHONHASHSEED)."""
    digest = hashlib.sha256(f"{seed}\x1f{request_digest}\x1f{candidate_key}".encode()).digest()
    return int.from_bytes(digest[:6], "big")


def escalation_verdict(evidence: Evidence, escalation: Escalation) -> EscalationVerdict:
    """Whether the recorded evidence meets the escalation spec, and why."""
    if escalation.to == "none":
        return EscalationVerdict(False, "disabled: escalation.to is none")
    level_ok = evidence.level >= escalation.min_evidence
    tokens_ok = evidence.reused_tokens_in_window >= escalation.min_reused_tokens_in_window
    detail = (
        f"evidence {evidence.level.label} {'>=' if level_ok else '<'} {escalation.min_evidence.label}, "
        f"reused {evidence.reused_tokens_in_window} {'>=' if tokens_ok else '<'} "
        f"{escalation.min_reused_tokens_in_window} in {escalation.window_s}s"
    )
    if evidence.requests_in_window is not None:
        detail += f" over {evidence.requests_in_window} requests"
    if evidence.age_s is not None:
        detail += f", newest {evidence.age_s}s ago"
    met = level_ok and tokens_ok
    return EscalationVerdict(met, f"{'met' if met else 'not met'}: {detail}")


def priced_verdict(
    verdict: EscalationVerdict, inputs: DecisionInputs, passing: list[RouteCandidate]
) -> EscalationVerdict:
    """``verdict`` (met by the evidence) checked against prices: the escalation kind's cheapest
    passing candidate must cost this request strictly less than the default route, both priced
    with the evidence's reused part of the prompt at each route's cached-input price. With no
    default candidate passing, the evidence alone decides (the default is unavailable)."""
    if not verdict.met:
        return verdict
    escalated = [c for c in passing if c.kind.value == inputs.escalation.to]
    if not escalated:
        return verdict
    default = [c for c in passing if c.route == inputs.default_route]
    prompt, output = inputs.prompt_num_tokens, inputs.expected_output_tokens
    reused = inputs.evidence.reused_part(prompt)
    escalated_cost = min(_cost_pusd(c, prompt, reused, output) for c in escalated)
    where = f"priced with {reused} of {prompt} prompt tokens reused"
    if not default:
        return EscalationVerdict(
            True, f"{verdict.reason}; {where}: {inputs.escalation.to} {escalated_cost} pUSD, default "
            "route unavailable", None, escalated_cost,
        )  # fmt: skip
    default_cost = min(_cost_pusd(c, prompt, reused, output) for c in default)
    cheaper = escalated_cost < default_cost
    comparison = (
        f"{where}: {inputs.escalation.to} {escalated_cost} {'<' if cheaper else '>='} "
        f"{inputs.default_route} {default_cost} pUSD"
    )
    if cheaper:
        return EscalationVerdict(True, f"{verdict.reason}; {comparison}", default_cost, escalated_cost)
    reason = "not met: " + verdict.reason.removeprefix("met: ") + f"; {comparison} (not cheaper)"
    return EscalationVerdict(False, reason, default_cost, escalated_cost)


def decide(decision_id: str, inputs: DecisionInputs, *, version: str = DECIDE_VERSION) -> DecisionRecord:
    """Choose a route (and replica) for one request; see the module docstring for the policy.
    ``version``: the policy (``DECIDE_VERSIONS``); a replay passes the record's own."""
    if version not in DECIDE_VERSIONS:
        raise ValueError(f"unknown decide version {version!r}; this build knows {', '.join(DECIDE_VERSIONS)}")
    candidates = inputs.candidates
    keys = [candidate.key for candidate in candidates]
    if len(set(keys)) != len(keys):
        raise ValueError(f"candidates must be unique by route and replica: {keys}")
    if inputs.prompt_num_tokens < 0 or inputs.block_size < 1 or inputs.expected_output_tokens < 0:
        raise ValueError("prompt_num_tokens and expected_output_tokens must be >= 0, block_size >= 1")

    # Each candidate's breaker as of now, and its verdict: computed once, read twice.
    now_ms, policy = inputs.now_ms, inputs.breaker_policy
    breakers = [current(c.breaker, now_ms, policy) for c in candidates]
    breaker_verdicts = [_breaker_verdict(breaker) for breaker in breakers]
    escalation = escalation_verdict(inputs.evidence, inputs.escalation)
    if version != "decide-1":
        passing = [c for c, v in zip(candidates, breaker_verdicts, strict=True) if v.startswith(PASS)]
        escalation = priced_verdict(escalation, inputs, passing)
    met = escalation.met
    default_kind = next((c.kind for c in candidates if c.route == inputs.default_route), RouteKind.MANAGED)
    escalated_kind = RouteKind(inputs.escalation.to) if inputs.escalation.to != "none" else None
    fallback_index = {route: index for index, route in enumerate(inputs.fallback_order)}

    # decide-4: the longest match any byoc candidate passing the breaker filter holds.
    longest = max(
        (
            _matched_tokens(c, inputs)
            for c, v in zip(candidates, breaker_verdicts, strict=True)
            if c.kind is RouteKind.BYOC and v.startswith(PASS)
        ),
        default=0,
    )

    verdicts: list[CandidateVerdict] = []
    ranked: list[tuple[int, tuple[int, ...], Pick]] = []  # (pool, rank key, pick)
    by_cost: list[tuple[tuple[int, ...], Pick]] = []  # every passing candidate, cheapest first
    fallback_pool: list[tuple[tuple[int, ...], Pick]] = []
    for candidate, key, breaker, breaker_verdict in zip(
        candidates, keys, breakers, breaker_verdicts, strict=True
    ):
        if candidate.kind is escalated_kind and met:
            pool, escalation_filter = 0, "pass:escalated"
        elif candidate.kind is default_kind:
            pool, escalation_filter = 1, "pass:default"
        elif candidate.kind is escalated_kind:
            pool, escalation_filter = -1, "escalation not met"
        else:
            pool, escalation_filter = -1, "neither the default nor the escalation kind"
        health = 0 if breaker.state is BreakerStatus.CLOSED else 1
        scores, rank_key, cost = _score(candidate, key, health, inputs, version, longest)
        verdict = CandidateVerdict(
            route=candidate.route,
            replica=candidate.replica,
            kind=candidate.kind,
            breaker=breaker,
            filters=(("breaker", breaker_verdict), ("escalation", escalation_filter)),
            scores=scores,
        )
        verdicts.append(verdict)
        if not breaker_verdict.startswith(PASS):
            continue
        pick = Pick(candidate.route, candidate.replica)
        by_cost.append(((cost, health, *rank_key), pick))
        if pool >= 0:
            ranked.append((pool, rank_key, pick))
        if candidate.route in fallback_index:
            fallback_pool.append(((health, fallback_index[candidate.route], *rank_key), pick))

    chosen: Pick | None = None
    pick_reason = "none: no candidate passes the breaker filter"
    if ranked:
        pool, _, chosen = min(ranked, key=lambda entry: (entry[0], entry[1]))
        if pool == 0:
            pick_reason = "escalated"
        else:
            pick_reason = "default: escalated kind unavailable" if met else "default"
    if inputs.prefer_cheapest and by_cost:
        chosen = min(by_cost, key=lambda entry: entry[0])[1]
        pick_reason = f"cheapest: qos {inputs.qos}"
    fallbacks = [pick for _, pick in sorted(fallback_pool, key=lambda entry: entry[0]) if pick != chosen]
    if chosen is None and fallbacks:
        chosen, fallbacks = fallbacks[0], fallbacks[1:]
        pick_reason = "fallback: no candidate in the default or escalation pool"

    return DecisionRecord(
        decision_id=decision_id,
        decide_version=version,
        policy_version=inputs.policy_version,
        seed=inputs.seed,
        inputs=inputs,
        escalation=escalation,
        candidates=tuple(verdicts),
        pick=chosen,
        pick_reason=pick_reason,
        fallbacks=tuple(fallbacks),
    )


def _breaker_verdict(breaker: BreakerState) -> str:
    if breaker.state is BreakerStatus.CLOSED:
        return PASS
    if breaker.state is BreakerStatus.OPEN:
        return "open"
    return "probe in flight" if breaker.probe_started_at_ms is not None else "pass:half_open probe"


def _matched_tokens(candidate: RouteCandidate, inputs: DecisionInputs) -> int:
    return min(candidate.matched_prefix_blocks * inputs.block_size, inputs.prompt_num_tokens)


def _score(
    candidate: RouteCandidate, key: str, health: int, inputs: DecisionInputs, version: str, longest: int
) -> tuple[tuple[tuple[str, int], ...], tuple[int, ...], int]:
    """The candidate's score components (sorted by name), its rank key and its expected cost.
    ``longest``: the longest match a passing byoc candidate holds (decide-4's margin)."""
    prompt = inputs.prompt_num_tokens
    tie = tiebreak(inputs.seed, inputs.request_digest, key)
    if candidate.kind is RouteKind.BYOC:
        matched_tokens = _matched_tokens(candidate, inputs)
        slots = max(1, candidate.max_num_seqs)
        pending = candidate.pending_prefill_tokens
        if version in ("decide-1", "decide-2") or pending is None:
            penalty = (candidate.queue_depth * slots + candidate.running) * prompt // slots
        else:
            penalty = pending + candidate.running * prompt // slots
        score = matched_tokens - penalty
        cost = _cost_pusd(candidate, prompt, matched_tokens, inputs.expected_output_tokens)
        margin: tuple[tuple[str, int], ...] = ()
        if version not in ("decide-1", "decide-2", "decide-3"):
            holds = 1 if matched_tokens >= longest else 0
            wait = penalty + prompt - matched_tokens
            if not holds:
                score = prompt - wait * SPILL_MARGIN[0] // SPILL_MARGIN[1]
            margin = (("holds_longest_match", holds), ("wait_tokens", wait))
        scores = (  # sorted by name
            ("expected_cost_pusd", cost),
            *margin[:1],
            ("load_penalty_tokens", penalty),
            ("matched_tokens", matched_tokens),
            ("score_tokens", score),
            ("tiebreak", tie),
            *margin[1:],
        )
        return scores, (-score, health, cost, tie), cost
    cached = min(candidate.predicted_cached_tokens or 0, prompt)
    cost = _cost_pusd(candidate, prompt, cached, inputs.expected_output_tokens)
    not_default = 0 if candidate.route == inputs.default_route else 1
    provider_scores = (("expected_cost_pusd", cost), ("predicted_cached_tokens", cached), ("tiebreak", tie))
    return provider_scores, (cost, health, not_default, tie), cost


def _cost_pusd(candidate: RouteCandidate, prompt: int, cached: int, output: int) -> int:
    return (
        cached * candidate.cached_input_pusd_per_token
        + (prompt - cached) * candidate.input_pusd_per_token
        + output * candidate.output_pusd_per_token
    )
