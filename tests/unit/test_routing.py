"""The profile-scoped scheduler's pure domain: breakers, residency, decisions, replay, retries.

Invariants held here:
- a breaker opens after ``failure_threshold`` consecutive failures, goes half open after the
  cooldown, admits exactly one probe, closes on its success and re-opens on its failure;
- the residency walk stops at the first missing block, and each replica's index stays within
  its bound, forgetting leaf blocks before the prefix they hang from;
- a shared prefix goes to the replica that holds it unless the prefill that replica still owes
  its requests (queued or running) costs more than the prefill it saves; without reuse,
  requests spread evenly over equally loaded replicas;
- an open breaker is filtered and recorded; escalation leaves the managed default only on
  recorded evidence that meets the profile's spec, and the evidence is in the record;
- a record holds no floats, round-trips through JSON, and replays byte for byte, also in another
  process with another PYTHONHASHSEED;
- profiles with routes fail at load with the field named; local-cpu-2x loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
from pydantic import TypeAdapter

from profiles import ProfileError, load_builtin, parse_profile
from profiles.model import RouteKind
from zumik_serve.reuse.evidence import EvidenceLevel
from zumik_serve.routing import breaker as br
from zumik_serve.routing.breaker import BreakerPolicy, BreakerState, BreakerStatus
from zumik_serve.routing.decision import (
    NO_EVIDENCE,
    DecisionInputs,
    DecisionRecord,
    Evidence,
    Pick,
    RouteCandidate,
    breaker_policy_of,
    candidate_for_route,
    canonical_bytes,
    decide,
    escalation_of,
)
from zumik_serve.routing.replay import replay
from zumik_serve.routing.residency import ResidencyIndex
from zumik_serve.routing.retry import AttemptOutcome, RetryAction, RetryBudget, classify

PROFILE = load_builtin("local-cpu-2x")
ROUTES = {route.name: route for route in PROFILE.effective_routes()}
POLICY = BreakerPolicy(failure_threshold=3, cooldown_ms=10_000)
OPEN = BreakerState(BreakerStatus.OPEN, 3, opened_at_ms=900)
PROMPT_TOKENS = 8192
BLOCK_SIZE = 32


def make_replica(
    replica: str, *, matched: int = 0, queue: int = 0, running: int = 0, owed: int | None = None
) -> RouteCandidate:
    return candidate_for_route(
        ROUTES["local"],
        replica=replica,
        matched_prefix_blocks=matched,
        queue_depth=queue,
        running=running,
        max_num_seqs=16,
        pending_prefill_tokens=owed,
    )


def make_inputs(
    *candidates: RouteCandidate,
    evidence: Evidence | None = None,
    digest: str = "d" * 64,
    seed: int = 7,
    now_ms: int = 1_000,
) -> DecisionInputs:
    if not candidates:
        candidates = (
            candidate_for_route(ROUTES["managed"]),
            candidate_for_route(ROUTES["byok"]),
            make_replica("r0"),
            make_replica("r1"),
        )
    return DecisionInputs(
        request_digest=digest,
        tenant="ten_acme",
        prompt_num_tokens=PROMPT_TOKENS,
        num_prompt_blocks=PROMPT_TOKENS // BLOCK_SIZE,
        block_size=BLOCK_SIZE,
        profile_name=PROFILE.name,
        profile_fingerprint=PROFILE.fingerprint(),
        release_id=None,
        snapshot_id="snp_aaaaaaaaaaaaaaaaaaaaaaaaaa",
        policy_version=PROFILE.routing.policy_version,
        now_ms=now_ms,
        seed=seed,
        candidates=tuple(candidates),
        evidence=evidence or NO_EVIDENCE,
        escalation=escalation_of(PROFILE),
        fallback_order=PROFILE.effective_fallback_order(),
        default_route=PROFILE.effective_default_route(),
        breaker_policy=breaker_policy_of(PROFILE),
        expected_output_tokens=64,
    )


# Past the profile's threshold, with a family that reuses 20000 of its 21000 prompt tokens: at
# that ratio the BYOC replicas are cheaper than the managed route (decide-2 prices it).
ENOUGH = Evidence(EvidenceLevel.REPORTED, 20_000, "fam_a", 5, 21_000, 30)


def verdict_of(record: DecisionRecord, route: str, replica: str | None = None) -> dict[str, Any]:
    for verdict in record.to_json()["candidates"]:
        if verdict["route"] == route and verdict["replica"] == replica:
            return verdict
    raise KeyError((route, replica))


# --- breaker ---------------------------------------------------------------------------------


def test_breaker_opens_after_threshold_consecutive_failures_only() -> None:
    state = br.CLOSED
    for now in (1, 2):
        state = br.record_failure(state, now, POLICY)
    assert state.state is BreakerStatus.CLOSED and state.consecutive_failures == 2
    assert br.record_success(state, 3, POLICY) == br.CLOSED  # a success resets the count
    state = br.record_failure(state, 3, POLICY)
    assert state == BreakerState(BreakerStatus.OPEN, 3, opened_at_ms=3)
    assert not br.can_admit(state, 3 + POLICY.cooldown_ms - 1, POLICY)


def test_breaker_half_open_admits_one_probe_and_success_closes() -> None:
    later = OPEN.opened_at_ms + POLICY.cooldown_ms  # type: ignore[operator]
    assert br.current(OPEN, later, POLICY).state is BreakerStatus.HALF_OPEN
    admitted, probing = br.admit(OPEN, later, POLICY)
    assert admitted and probing.probe_started_at_ms == later
    assert br.admit(probing, later + 1, POLICY)[0] is False  # only one probe at a time
    assert br.record_success(probing, later + 2, POLICY) == br.CLOSED


def test_breaker_failed_probe_reopens_with_a_new_cooldown() -> None:
    later = 900 + POLICY.cooldown_ms
    _, probing = br.admit(OPEN, later, POLICY)
    reopened = br.record_failure(probing, later + 5, POLICY)
    assert reopened.state is BreakerStatus.OPEN and reopened.opened_at_ms == later + 5
    assert not br.can_admit(reopened, later + 5 + POLICY.cooldown_ms - 1, POLICY)
    assert br.can_admit(reopened, later + 5 + POLICY.cooldown_ms, POLICY)


def test_breaker_lost_probe_is_forgotten_after_a_cooldown() -> None:
    _, probing = br.admit(OPEN, 20_000, POLICY)
    assert not br.can_admit(probing, 29_999, POLICY)
    assert br.can_admit(probing, 30_000, POLICY)


def test_breaker_state_records_and_restores_through_json() -> None:
    adapter = TypeAdapter(BreakerState)
    state = br.CLOSED
    for now in range(3):
        state = br.record_failure(state, now, POLICY)
    restored = adapter.validate_json(adapter.dump_json(state))
    assert restored == state and br.current(restored, 5, POLICY).state is BreakerStatus.OPEN
    admitted, probing = br.admit(restored, 2 + POLICY.cooldown_ms, POLICY)
    assert admitted and probing.state is BreakerStatus.HALF_OPEN
    assert br.record_success(probing, 2 + POLICY.cooldown_ms + 1, POLICY) == br.CLOSED


# --- residency -------------------------------------------------------------------------------


def test_residency_walk_stops_at_the_first_gap() -> None:
    index = ResidencyIndex(capacity_blocks=100)
    keys = [f"k{i}" for i in range(10)]
    index.record_sent("r0", keys)
    assert index.matched_prefix_blocks("r0", keys) == 10
    index.apply_event("r0", removed=["k4"])
    assert index.matched_prefix_blocks("r0", keys) == 4  # k5..k9 are held but follow a gap
    assert index.matched_prefix_blocks("r0", ["other", *keys]) == 0
    assert index.snapshot(["r0", "r1"], keys) == {"r0": 4, "r1": 0}
    index.apply_event("r1", stored=keys[:3])
    assert index.snapshot(["r0", "r1"], keys) == {"r0": 4, "r1": 3}


def test_residency_lru_bound_holds_and_forgets_leaves_before_roots() -> None:
    index = ResidencyIndex(capacity_blocks=8)
    first = [f"a{i}" for i in range(6)]
    second = [f"b{i}" for i in range(6)]
    index.record_sent("r0", first)
    index.record_sent("r0", second)
    assert index.num_blocks("r0") == 8
    assert index.matched_prefix_blocks("r0", second) == 6
    assert index.matched_prefix_blocks("r0", first) == 2  # its tail went first, its root stayed
    index.record_sent("r0", [f"c{i}" for i in range(20)])
    assert index.num_blocks("r0") == 8
    index.forget_replica("r0")
    assert index.num_blocks("r0") == 0 and index.replicas() == []


# --- decide: residency and load --------------------------------------------------------------


def test_decide_sends_a_shared_prefix_where_it_lives() -> None:
    record = decide(
        "dec_1", make_inputs(make_replica("r0"), make_replica("r1", matched=200), evidence=ENOUGH)
    )
    assert record.pick == Pick("local", "r1")
    assert verdict_of(record, "local", "r1")["scores"]["matched_tokens"] == 200 * BLOCK_SIZE


def test_decide_leaves_the_prefix_holder_when_its_queue_costs_more_than_the_prefix_saves() -> None:
    busy_holder = make_replica("r0", matched=200, queue=2, running=16)
    record = decide("dec_1", make_inputs(busy_holder, make_replica("r1", running=1), evidence=ENOUGH))
    assert record.pick == Pick("local", "r1")
    scores = verdict_of(record, "local", "r0")["scores"]
    assert scores["load_penalty_tokens"] > scores["matched_tokens"]
    lightly_loaded_holder = make_replica("r0", matched=200, running=4)
    record = decide("dec_1", make_inputs(lightly_loaded_holder, make_replica("r1"), evidence=ENOUGH))
    assert record.pick == Pick("local", "r0")


def test_decide_leaves_a_holder_that_owes_more_prefill_than_the_prefix_saves_though_nothing_queues() -> None:
    # r0 holds 6,400 tokens of this prompt and runs 10 requests (no queue) that still owe 7,000
    # tokens of prefill: on r0 ours waits for those 7,000 and prefills 1,792 more; on the idle r1
    # it prefills all 8,192. decide-2 saw 10 running requests as 10/16 of one prefill and stayed.
    holder = make_replica("r0", matched=200, running=10, owed=7_000)
    inputs = make_inputs(holder, make_replica("r1", owed=0), evidence=ENOUGH)
    record = decide("dec_1", inputs)
    assert record.decide_version == "decide-4" and record.pick == Pick("local", "r1")
    assert decide("dec_1", inputs, version="decide-3").pick == Pick("local", "r1")
    scores = verdict_of(record, "local", "r0")["scores"]
    assert scores["load_penalty_tokens"] == 7_000 + 10 * PROMPT_TOKENS // 16
    assert decide("dec_1", inputs, version="decide-2").pick == Pick("local", "r0")
    lightly_owing = make_replica("r0", matched=200, running=10, owed=500)
    assert decide("dec_1", make_inputs(lightly_owing, make_replica("r1", owed=0))).pick == Pick("local", "r0")
    for version in ("decide-2", "decide-3", "decide-4"):
        stored = json.loads(canonical_bytes(decide("dec_1", inputs, version=version)))
        assert stored["inputs"]["candidates"][0]["pending_prefill_tokens"] == 7_000
        assert replay(stored)[0]


def test_decide_4_keeps_a_busy_holder_when_the_other_replica_is_busy_too() -> None:
    # Both owe prefill, r0 a little more: on r0 ours waits 20,000 + 1,792; on r1 12,000 + 8,192.
    # decide-3 compared the two waits and left the prefix (recomputed on r1, evicting there);
    # decide-4 leaves it only when the holder's wait is more than 3/2 of the other's.
    holder, other = make_replica("r0", matched=200, owed=20_000), make_replica("r1", owed=12_000)
    inputs = make_inputs(holder, other, evidence=ENOUGH)
    assert decide("dec_1", inputs, version="decide-3").pick == Pick("local", "r1")
    record = decide("dec_1", inputs)
    assert record.pick == Pick("local", "r0")
    held, spilled = verdict_of(record, "local", "r0")["scores"], verdict_of(record, "local", "r1")["scores"]
    held_wait = 20_000 + PROMPT_TOKENS - 200 * BLOCK_SIZE
    assert (held["holds_longest_match"], held["wait_tokens"]) == (1, held_wait)
    assert held["score_tokens"] == 200 * BLOCK_SIZE - 20_000  # a holder scores as in decide-3
    assert (spilled["holds_longest_match"], spilled["wait_tokens"]) == (0, 12_000 + PROMPT_TOKENS)
    assert spilled["score_tokens"] == PROMPT_TOKENS - (12_000 + PROMPT_TOKENS) * 3 // 2
    assert replay(json.loads(canonical_bytes(record)))[0]


def test_decide_4_still_sheds_a_busy_holders_load_to_an_idle_replica() -> None:
    holder = make_replica("r0", matched=200, owed=20_000)
    assert decide("dec_1", make_inputs(holder, make_replica("r1", owed=0))).pick == Pick("local", "r1")


def test_decide_4_counts_the_margin_against_a_shorter_match_and_ignores_an_open_breakers_match() -> None:
    # r1 holds half the prefix r0 holds: it is not the longest match, and pays the margin.
    longer, shorter = make_replica("r0", matched=200, owed=9_000), make_replica("r1", matched=100, owed=3_000)
    record = decide("dec_1", make_inputs(longer, shorter, evidence=ENOUGH))
    assert verdict_of(record, "local", "r1")["scores"]["holds_longest_match"] == 0
    assert record.pick == Pick("local", "r0")  # 9,000 + 1,792 < (3,000 + 4,992) x 3/2
    # A holder whose breaker is open cannot be picked: the longest match among the rest counts.
    blocked = replace(make_replica("r0", matched=200), breaker=OPEN)
    record = decide("dec_1", make_inputs(blocked, make_replica("r1", matched=100), make_replica("r2")))
    assert verdict_of(record, "local", "r1")["scores"]["holds_longest_match"] == 1
    assert record.pick == Pick("local", "r1")


def test_a_candidate_without_the_owed_prefill_keeps_the_old_penalty_and_json() -> None:
    # A record written before the figure has no such key; read back, it is None, decide-3 scores
    # it as decide-2 did, and its JSON renders without the key again.
    busy_holder = make_replica("r0", matched=200, queue=2, running=16)
    record = decide("dec_1", make_inputs(busy_holder, make_replica("r1", running=1), evidence=ENOUGH))
    assert "pending_prefill_tokens" not in record.to_json()["inputs"]["candidates"][0]
    assert (
        verdict_of(record, "local", "r0")["scores"]["load_penalty_tokens"]
        == (2 * 16 + 16) * PROMPT_TOKENS // 16
    )
    stored = json.loads(canonical_bytes(record))
    assert replay(stored)[0]


def test_the_prefill_a_pick_owes_is_the_prompt_less_the_prefix_its_decision_saw_there() -> None:
    record = decide("dec_1", make_inputs(make_replica("r0", matched=10), make_replica("r1"), evidence=ENOUGH))
    assert record.prefill_tokens(Pick("local", "r0")) == PROMPT_TOKENS - 10 * BLOCK_SIZE
    assert record.prefill_tokens(Pick("local", "r1")) == PROMPT_TOKENS
    assert record.prefill_tokens(Pick("managed", None)) == 0


def test_decide_without_reuse_spreads_evenly_over_request_digests() -> None:
    replicas = [make_replica(f"r{i}") for i in range(3)]
    counts = Counter(
        decide("dec_1", make_inputs(*replicas, evidence=ENOUGH, digest=f"{i:064x}")).pick for i in range(3000)
    )
    assert set(counts) == {Pick("local", f"r{i}") for i in range(3)}
    assert all(900 <= count <= 1100 for count in counts.values()), counts


def test_decide_without_reuse_prefers_the_least_loaded_replica() -> None:
    record = decide(
        "dec_1", make_inputs(make_replica("r0", running=3), make_replica("r1", running=1), evidence=ENOUGH)
    )
    assert record.pick == Pick("local", "r1")


# --- decide: breaker, escalation, cost ---------------------------------------------------------


def test_decide_filters_an_open_breaker_and_records_it() -> None:
    managed = replace(candidate_for_route(ROUTES["managed"]), breaker=OPEN)
    record = decide("dec_1", make_inputs(managed, candidate_for_route(ROUTES["byok"]), make_replica("r0")))
    verdict = verdict_of(record, "managed")
    assert verdict["filters"]["breaker"] == "open"
    assert verdict["breaker"]["state"] == "open"
    assert record.pick == Pick("byok", None)  # the first healthy route in the fallback order
    assert record.pick_reason.startswith("fallback")
    assert Pick("managed", None) not in record.fallbacks
    assert record.fallbacks == (Pick("local", "r0"),)


def test_decide_lets_a_half_open_candidate_probe_but_not_twice() -> None:
    managed = replace(candidate_for_route(ROUTES["managed"]), breaker=OPEN)
    cooled = 900 + 10_000
    record = decide("dec_1", make_inputs(managed, make_replica("r0"), now_ms=cooled))
    assert verdict_of(record, "managed")["filters"]["breaker"] == "pass:half_open probe"
    assert record.pick == Pick("managed", None)
    _, probing = br.admit(OPEN, cooled, breaker_policy_of(PROFILE))
    record = decide(
        "dec_1", make_inputs(replace(managed, breaker=probing), make_replica("r0"), now_ms=cooled)
    )
    assert verdict_of(record, "managed")["filters"]["breaker"] == "probe in flight"
    assert record.pick == Pick("local", "r0")


@pytest.mark.parametrize(
    "evidence",
    [
        Evidence(EvidenceLevel.UNKNOWN, 50_000),
        Evidence(EvidenceLevel.ESTIMATED, 50_000),
        Evidence(EvidenceLevel.OBSERVED, 9_999),
    ],
)
def test_decide_keeps_the_managed_default_without_enough_evidence(evidence: Evidence) -> None:
    holder = make_replica("r0", matched=256)
    record = decide("dec_1", make_inputs(candidate_for_route(ROUTES["managed"]), holder, evidence=evidence))
    assert record.pick == Pick("managed", None) and record.pick_reason == "default"
    assert record.escalation_met is False and record.escalation_reason.startswith("not met")
    assert verdict_of(record, "local", "r0")["filters"]["escalation"] == "escalation not met"
    assert record.to_json()["inputs"]["evidence"] == {
        "level": evidence.level.label,
        "reused_tokens_in_window": evidence.reused_tokens_in_window,
    }


def test_decide_escalates_on_recorded_evidence_and_says_why() -> None:
    record = decide("dec_1", make_inputs(evidence=ENOUGH))
    assert record.pick is not None and record.pick.route == "local" and record.pick_reason == "escalated"
    assert record.escalation_met is True
    assert record.escalation_reason.startswith(
        "met: evidence reported >= reported, reused 20000 >= 10000 in 3600s over 5 requests, newest 30s ago; "
        "priced with "
    )
    verdict = record.escalation
    assert verdict.escalated_cost_pusd is not None and verdict.default_cost_pusd is not None
    assert verdict.escalated_cost_pusd < verdict.default_cost_pusd
    assert record.fallbacks[:2] == (Pick("managed", None), Pick("byok", None))


def test_decide_escalation_falls_back_to_the_default_when_every_replica_is_open() -> None:
    open_replicas = [replace(make_replica(f"r{i}"), breaker=OPEN) for i in range(2)]
    record = decide(
        "dec_1", make_inputs(candidate_for_route(ROUTES["managed"]), *open_replicas, evidence=ENOUGH)
    )
    assert record.pick == Pick("managed", None)
    assert record.pick_reason == "default: escalated kind unavailable"


def test_decide_ranks_managed_routes_by_expected_cost_with_predicted_caching() -> None:
    cheap = replace(candidate_for_route(ROUTES["managed"]), route="cheap", input_pusd_per_token=100_000)
    cached = replace(candidate_for_route(ROUTES["managed"]), predicted_cached_tokens=8000)
    inputs = replace(
        make_inputs(cheap, candidate_for_route(ROUTES["managed"])), fallback_order=("managed", "cheap")
    )
    assert decide("dec_1", inputs).pick == Pick("cheap", None)
    record = decide("dec_1", replace(inputs, candidates=(cheap, cached)))
    assert record.pick == Pick("managed", None)
    assert verdict_of(record, "managed")["scores"]["expected_cost_pusd"] == (
        8000 * 75_000 + 192 * 150_000 + 64 * 600_000
    )


def test_decide_with_no_usable_candidate_picks_nothing() -> None:
    managed = replace(candidate_for_route(ROUTES["managed"]), breaker=OPEN)
    record = decide("dec_1", make_inputs(managed))
    assert record.pick is None and record.fallbacks == () and record.pick_reason.startswith("none")


def test_decide_refuses_duplicate_candidates() -> None:
    with pytest.raises(ValueError, match="unique"):
        decide("dec_1", make_inputs(make_replica("r0"), make_replica("r0")))


# --- records and replay ----------------------------------------------------------------------


def _values(node: object) -> list[object]:
    if isinstance(node, dict):
        return [value for child in node.values() for value in _values(child)]
    if isinstance(node, list):
        return [value for child in node for value in _values(child)]
    return [node]


def test_record_json_holds_no_floats_and_round_trips() -> None:
    busy = replace(make_replica("r0", matched=100, queue=1), breaker=BreakerState(BreakerStatus.CLOSED, 2))
    record = decide("dec_1", make_inputs(candidate_for_route(ROUTES["managed"]), busy, evidence=ENOUGH))
    data = record.to_json()
    assert all(value is None or isinstance(value, bool | int | str) for value in _values(data))
    assert not any(isinstance(value, float) for value in _values(data))
    assert DecisionRecord.from_json(json.loads(canonical_bytes(record))) == record
    assert (
        canonical_bytes(record)
        == json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )


def test_replay_reproduces_the_record_and_detects_a_change() -> None:
    record = decide("dec_1", make_inputs(make_replica("r0", matched=10), make_replica("r1"), evidence=ENOUGH))
    stored = json.loads(canonical_bytes(record))
    equal, recomputed = replay(stored)
    assert equal and canonical_bytes(recomputed) == canonical_bytes(record)
    tampered = json.loads(canonical_bytes(record))
    tampered["pick"] = {"route": "local", "replica": "r1"}
    assert replay(tampered)[0] is False
    moved = json.loads(canonical_bytes(record))
    moved["inputs"]["candidates"][0]["queue_depth"] = 5  # different inputs give another decision
    assert replay(moved)[0] is False


def test_replay_is_equal_in_another_process_with_another_hash_seed() -> None:
    record = decide("dec_1", make_inputs(*(make_replica(f"r{i}") for i in range(4)), evidence=ENOUGH))
    code = (
        "import json, sys\n"
        "from zumik_serve.routing.decision import DecisionInputs, canonical_bytes, decide\n"
        "data = json.loads(sys.stdin.read())\n"
        "record = decide(data['decision_id'], DecisionInputs.from_json(data['inputs']))\n"
        "sys.stdout.write(canonical_bytes(record).decode())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        input=canonical_bytes(record).decode(),
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.encode() == canonical_bytes(record)


def test_evidence_levels_are_ordered_weakest_first() -> None:
    labels = [level.label for level in sorted(EvidenceLevel)]
    assert labels == ["unknown", "estimated", "reported", "observed"]
    assert Evidence(EvidenceLevel.UNKNOWN, 0) == NO_EVIDENCE


# --- retries ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "retry_after_s", "attempt", "action", "counts"),
    [
        (AttemptOutcome.OK, None, 1, RetryAction.DONE, False),
        (AttemptOutcome.RATE_LIMITED, 2, 1, RetryAction.RETRY, False),
        (AttemptOutcome.RATE_LIMITED, 60, 1, RetryAction.FALLBACK, False),
        (AttemptOutcome.RATE_LIMITED, None, 1, RetryAction.FALLBACK, False),
        (AttemptOutcome.SERVER_ERROR, None, 1, RetryAction.RETRY, True),
        (AttemptOutcome.SERVER_ERROR, None, 2, RetryAction.FALLBACK, True),
        (AttemptOutcome.TIMEOUT, None, 1, RetryAction.FALLBACK, True),
        (AttemptOutcome.CONNECT_ERROR, None, 1, RetryAction.FALLBACK, True),
        (AttemptOutcome.CLIENT_ERROR, None, 1, RetryAction.FAIL, False),
    ],
)
def test_classify_maps_outcomes_to_actions(
    outcome: AttemptOutcome, retry_after_s: int | None, attempt: int, action: RetryAction, counts: bool
) -> None:
    verdict = classify(outcome, attempt=attempt, max_retries=1, retry_after_s=retry_after_s)
    assert verdict.action is action and verdict.counts_as_failure is counts
    if action is RetryAction.RETRY and retry_after_s is not None:
        assert verdict.delay_ms == retry_after_s * 1000


def test_retry_budget_caps_retries_at_the_ratio_and_recovers_as_the_window_slides() -> None:
    budget = RetryBudget(
        ratio=Decimal(PROFILE.routing.breaker.retry_budget_ratio), window_ms=10_000, min_retries=0
    )
    for _ in range(10):
        budget = budget.record_request(1_000)
    assert budget.allow(1_000)
    budget = budget.record_retry(1_000).record_retry(1_000)
    assert budget.counts(1_000) == (10, 2)
    assert not budget.allow(1_000)  # 3 retries would exceed 0.2 * 10
    assert budget.counts(11_000) == (0, 0)  # the window has moved past every count
    assert not budget.allow(11_000)  # no requests, no floor: no retries
    for _ in range(5):
        budget = budget.record_request(11_000)
    assert budget.allow(11_000) and not budget.record_retry(11_000).allow(11_000)
    assert RetryBudget(min_retries=3).allow(0)  # the floor lets a quiet route retry


# --- profiles with routes --------------------------------------------------------------------

ROUTED = """
name: routed
model: {source: "builtin:tiny", served_name: tiny}
engine: {device: cpu, kv_cache_memory_bytes: 1048576}
routes:
  - {name: m, kind: managed, base_url: "http://x/v1", model: gpt,
     prices: {input: "1", cached_input: "0.5", output: "2"}}
  - {name: local, kind: byoc, replica_hour_usd: "1.00", tokens_per_replica_hour: 3000000}
"""


def test_local_cpu_2x_loads_with_two_replicas_and_three_routes() -> None:
    assert PROFILE.engine.num_replicas == 2 and PROFILE.engine.kv_cache_memory_bytes == 33554432
    assert PROFILE.gateway.placement.value == "separate" and PROFILE.kv_tiers.enabled is False
    assert [(r.name, r.kind) for r in PROFILE.routes] == [
        ("local", RouteKind.BYOC),
        ("managed", RouteKind.MANAGED),
        ("byok", RouteKind.BYOK),
    ]
    assert ROUTES["local"].token_prices_pusd() == (250_000, 0, 250_000)
    assert ROUTES["managed"].token_prices_pusd() == (150_000, 75_000, 600_000)
    assert PROFILE.effective_default_route() == "managed"
    assert PROFILE.routing.escalation.to == "byoc" and PROFILE.routing.escalation.min_evidence == "reported"


def test_route_base_urls_expand_from_the_environment() -> None:
    text = load_builtin_text("local-cpu-2x")
    profile = parse_profile(text, source="t", env={"ZUMIK_BYOK_BASE_URL": "https://byok.example/v1"})
    urls = {route.name: route.base_url for route in profile.routes}
    assert urls == {"local": None, "managed": "http://127.0.0.1:8101/v1", "byok": "https://byok.example/v1"}
    with pytest.raises(ProfileError, match=r"routes\.0\.base_url: environment variable NOPE is not set"):
        parse_profile(ROUTED.replace("http://x/v1", "${NOPE}"), source="t", env={})


def load_builtin_text(name: str) -> str:
    from importlib import resources

    return resources.files("profiles.builtin").joinpath(f"{name}.yaml").read_text(encoding="utf-8")


def test_routes_default_to_the_first_managed_and_no_routes_means_local() -> None:
    profile = parse_profile(ROUTED, source="t")
    assert profile.effective_default_route() == "m"
    assert profile.effective_fallback_order() == ("m", "local")
    assert profile.routes[1].token_prices_pusd() == (333_333, 0, 333_333)  # rounded half-even
    bare = load_builtin("local-cpu")
    assert [(r.name, r.kind) for r in bare.effective_routes()] == [("local", RouteKind.BYOC)]
    assert bare.effective_default_route() == "local"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("routes:\n", "routing: {default_route: nope}\nroutes:\n"),
            r"routing\.default_route: 'nope' is not a route",
        ),
        (
            ("routes:\n", "routing: {fallback_order: [m, gone]}\nroutes:\n"),
            r"routing\.fallback_order: 'gone'",
        ),
        (('input: "1"', "input: 1.5"), r"routes\.0\.prices\.input: .*quoted decimal string"),
        (('input: "1"', 'input: "1.1234567"'), r"routes\.0\.prices\.input: .*more than 6 decimal places"),
        (('input: "1"', 'input: "-1"'), r"routes\.0\.prices\.input: .*>= 0"),
        (("kind: managed", "kind: byoc"), r"routes\.0: .*base_url is not allowed on a byoc route"),
        (("model: gpt,", "model: gpt, api_key_env: K,"), None),
        (
            ("kind: byoc,", "kind: byoc, base_url: 'http://y',"),
            r"routes\.1: .*base_url is not allowed on a byoc",
        ),
        (("name: m,", "name: M,"), r"routes\.0\.name: String should match pattern"),
        (("name: local,", "name: m,"), r"routes: route names must be unique; repeated: m"),
        (  # a second byoc route would name the same replicas; before, it was taken and never served
            (
                "  - {name: local, kind: byoc,",
                '  - {name: own, kind: byoc, replica_hour_usd: "1", tokens_per_replica_hour: 1}\n'
                "  - {name: local, kind: byoc,",
            ),
            r"routes: at most one byoc route, the profile's own engines; own, local are byoc\. .*`models`",
        ),
        (("http://x/v1", "ftp://x"), r"routes\.0: .*must start with http"),
        (("routes:\n", "routing: {breaker: {retry_budget_ratio: 0.2}}\nroutes:\n"), r"retry_budget_ratio"),
    ],
)
def test_bad_routes_fail_at_load_with_the_field_named(change: tuple[str, str], message: str | None) -> None:
    text = ROUTED.replace(*change)
    assert text != ROUTED
    if message is None:
        parse_profile(text, source="t")  # api_key_env is fine on a managed route
        return
    with pytest.raises(ProfileError, match=message):
        parse_profile(text, source="t")


def test_byok_route_refuses_a_profile_api_key() -> None:
    text = ROUTED.replace("kind: managed", "kind: byok").replace("model: gpt,", "model: gpt, api_key_env: K,")
    with pytest.raises(
        ProfileError, match=r"routes\.0: .*api_key_env is not allowed on a byok route .*tenant's"
    ):
        parse_profile(text, source="t")


def test_a_timeout_gives_back_the_shared_probe_it_took_and_counts_on_its_tenants_breaker() -> None:
    """A request passes the shared breaker of a route and its tenant's own. Half open, the shared
    one admits one probe: a tenant whose probe times out (its own doing, maybe) counts the
    failure on its own breaker and gives the shared probe back, so another tenant's request goes
    at once instead of waiting out a cooldown behind it; a 5xx counts on the shared one."""
    from zumik_serve.routing.scheduler import ProfileScheduler

    profile = load_builtin("local-cpu-2x")
    scheduler = ProfileScheduler(profile, replicas={})
    pick, cooldown_ms = Pick("managed", None), int(profile.routing.breaker.cooldown_s * 1000)
    scheduler.breakers["managed"] = BreakerState(BreakerStatus.OPEN, 3, opened_at_ms=0)
    now = cooldown_ms + 1  # half open
    assert scheduler.admit(pick, now, "ten_a") and not scheduler.admit(pick, now, "ten_b")
    assert scheduler.failed(pick, now, "ten_a", AttemptOutcome.TIMEOUT).state is BreakerStatus.HALF_OPEN
    assert scheduler.breakers["ten_a|managed"].consecutive_failures == 1
    assert scheduler.admit(pick, now, "ten_b")  # the shared probe came back
    assert scheduler.failed(pick, now, "ten_b", AttemptOutcome.SERVER_ERROR).state is BreakerStatus.OPEN
    assert "ten_b|managed" not in scheduler.breakers and not scheduler.admit(pick, now, "ten_c")
